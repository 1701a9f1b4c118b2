"""Logit datasets that are no distribution, found by the third audit (issue 23; docs/results/audit.md, "The third
audit"): an import refuses them naming the file, row and position, where before they were stored without a word."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdflow.logit_cache import axolotl
from kdflow.logit_cache.format import TopK, tail_from_topk
from kdflow.logit_cache.interop import LogitFileError, import_file
from kdflow.logit_cache.reader import LogitCache
from kdflow.training.tiny_models import train_tokenizer

K = 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([f"{a}+{b}={a + b}" for a in range(10) for b in range(10)], 48)


def rows(vocab: int, n: int = 3) -> list[TopK]:
    """Sequences of 8 tokens, the last 3 positions with a top-4 log-softmax of random logits."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        logits = rng.normal(size=(3, vocab))
        logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ids = np.argsort(-logprobs, axis=-1)[:, :K]
        top = np.take_along_axis(logprobs, ids, -1).astype(np.float32)
        out.append(TopK(f"r{i}", rng.integers(3, vocab, 8), 4, ids, top, tail_from_topk(top)))
    return out


def write(folder, tokenizer, plant=None):
    folder.mkdir()
    table = axolotl.table_of(rows(len(tokenizer)), K)
    records = table.to_pylist()
    if plant:
        plant(records[1]["target_token_ids"][5], records[1]["target_logprobs"][5])  # row 1, position 5 (a kept one)
    pq.write_table(type(table).from_pylist(records, schema=table.schema), folder / "data_0.parquet")
    return folder


def test_a_well_formed_file_imports(tmp_path, tokenizer):
    import_file(write(tmp_path / "ok", tokenizer), tmp_path / "cache", "axolotl", tokenizer)
    assert len(LogitCache.open(tmp_path / "cache", expect_tokenizer=tokenizer).row_ids) == 3


def test_a_repeated_top_k_id_is_refused(tmp_path, tokenizer):
    # Before: stored as it was; the student's loss then counted that token's probability twice.
    folder = write(tmp_path / "f", tokenizer, lambda ids, lps: ids.__setitem__(1, ids[0]))
    with pytest.raises(LogitFileError, match=r"data_0.parquet: row 1, position 5: top-k id \d+ appears twice"):
        import_file(folder, tmp_path / "cache", "axolotl", tokenizer)
    assert not (tmp_path / "cache").exists()


def test_a_positive_log_prob_is_refused(tmp_path, tokenizer):
    # Before: a log-prob of +5 was stored (clamped to 0 by u8: p = 1 beside the other top-k entries, and the tail).
    folder = write(tmp_path / "f", tokenizer, lambda ids, lps: lps.__setitem__(0, 5.0))
    with pytest.raises(LogitFileError, match=r"row 1, position 5: log-prob 5 is above 0 .*not log-probs"):
        import_file(folder, tmp_path / "cache", "axolotl", tokenizer)


def test_top_k_probabilities_above_one_are_refused(tmp_path, tokenizer):
    folder = write(tmp_path / "f", tokenizer, lambda ids, lps: lps.__setitem__(slice(None), [-0.1] * K))
    with pytest.raises(LogitFileError, match=r"row 1, position 5: the top-k probabilities sum to 3.619, more than 1"):
        import_file(folder, tmp_path / "cache", "axolotl", tokenizer)


@pytest.mark.parametrize("text", ["d: 48\nk: [4\n", "- 48\n- 4\n"])
def test_a_distillkit_config_that_is_not_a_yaml_mapping_is_named_with_the_fix(tmp_path, text):
    # Before: a bare yaml ParserError (or "'list' object has no attribute 'get'"), naming neither the file nor the fix.
    from kdflow.logit_cache import distillkit

    config = tmp_path / distillkit.CONFIG_FILE
    config.write_text(text)
    with pytest.raises(ValueError, match=r"compression_config.yaml: (not YAML|a list, not a mapping).*pass the "):
        distillkit.read_config(config)


def test_a_vocabulary_size_below_one_is_refused_before_any_file_is_read(tmp_path, tokenizer):
    # Before: "top-k id 3 is outside the vocabulary (0 to -6)", once the first row was read.
    with pytest.raises(ValueError, match=r"vocab_size -5: give the teacher's logits per position \(at least 1\)"):
        import_file(write(tmp_path / "f", tokenizer), tmp_path / "cache", "axolotl", tokenizer, vocab_size=-5)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("option", ["--vocab-size", "--shard-rows"])
def test_the_import_command_refuses_a_count_below_one_naming_the_option(capsys, option):
    from flows.cli import parser

    with pytest.raises(SystemExit):
        parser().parse_args(
            ["logit-cache-import", "--format", "axolotl", "in", "out", "--tokenizer", "t", option, "-5"]
        )
    assert f"argument {option}: -5 is not a count; give a whole number of at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("tail", [0.5, -0.1])
def test_a_tail_that_makes_the_mass_above_one_is_refused(tmp_path, tokenizer, tail):
    # The fourth audit (docs/results/audit.md): a kdflow_tail of +0.5, or one of -0.1 beside a top-k of most of the
    # mass, was stored as written, the position's probabilities then summing to 2.5 or 1.75.
    folder = tmp_path / "f"
    folder.mkdir()
    table = axolotl.table_of(rows(len(tokenizer)), K)
    records = table.to_pylist()
    records[1][axolotl.TAIL][5] = tail
    pq.write_table(type(table).from_pylist(records, schema=table.schema), folder / "data_0.parquet")
    with pytest.raises(
        LogitFileError, match=r"data_0.parquet: row 1, position 5: the tail \(kdflow_tail .*more than 1"
    ):
        import_file(folder, tmp_path / "cache", "axolotl", tokenizer)
    assert not (tmp_path / "cache").exists()


def test_the_import_command_names_a_tokenizer_folder_that_is_not_there(tmp_path):
    # The fourth audit: transformers' "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" instead.
    from flows.cli import main

    missing = tmp_path / "nonexist"
    with pytest.raises(FileNotFoundError, match=rf"--tokenizer {missing}: no such folder, and not a hub id"):
        main(
            [
                "logit-cache-import",
                str(tmp_path / "in"),
                str(tmp_path / "out"),
                "--format",
                "axolotl",
                "--tokenizer",
                str(missing),
            ]
        )


def planted_tail(tmp_path, tokenizer, value: float, positions=(5,)):
    folder = tmp_path / "f"
    folder.mkdir()
    table = axolotl.table_of(rows(len(tokenizer)), K)
    records = table.to_pylist()
    for j in positions:
        records[1][axolotl.TAIL][j] = value
    pq.write_table(type(table).from_pylist(records, schema=table.schema), folder / "data_0.parquet")
    return folder


def test_a_tail_far_below_the_real_one_is_refused(tmp_path, tokenizer):
    # The fifth audit: kdflow_tail -30 at every kept position was stored, leaving positions with 0.56 of the mass.
    folder = planted_tail(tmp_path, tokenizer, -30.0)
    with pytest.raises(
        LogitFileError, match=r"row 1, position 5: the tail \(kdflow_tail -30\) .* makes 0\.\d+, well under 1"
    ):
        import_file(folder, tmp_path / "cache", "axolotl", tokenizer)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_a_tail_that_is_not_finite_is_named_at_its_own_position(tmp_path, tokenizer, value):
    # The fifth audit: a NaN tail at position 6 was reported as "position 4: a log-prob is not finite".
    folder = planted_tail(tmp_path, tokenizer, value, positions=(6,))
    with pytest.raises(LogitFileError, match=r"row 1, position 6: the tail \(kdflow_tail\) is not finite"):
        import_file(folder, tmp_path / "cache", "axolotl", tokenizer)


def test_token_ids_written_as_fractions_are_refused_not_truncated(tmp_path, tokenizer):
    # The fifth audit: ids of 16.5 were imported as token 16.
    import pyarrow as pa

    folder = tmp_path / "f"
    folder.mkdir()
    table = axolotl.table_of(rows(len(tokenizer)), K)
    ids = table.column("target_token_ids").to_pylist()
    ids[1][5][0] += 0.5
    floats = pa.array(ids, type=pa.list_(pa.list_(pa.float64())))
    table = table.set_column(table.schema.get_field_index("target_token_ids"), "target_token_ids", floats)
    pq.write_table(table, folder / "data_0.parquet")
    with pytest.raises(LogitFileError, match=r"target_token_ids holds \d+\.5, not a whole number"):
        import_file(folder, tmp_path / "cache", "axolotl", tokenizer)


def test_the_same_file_twice_in_a_folder_is_refused(tmp_path, tokenizer):
    # The fifth audit: two identical files without kdflow metadata imported every sequence twice.
    import shutil

    folder = write(tmp_path / "f", tokenizer)
    shutil.copy(folder / "data_0.parquet", folder / "data_1.parquet")
    with pytest.raises(LogitFileError, match=r"data_1.parquet: the same bytes as .*data_0.parquet; .*remove the copy"):
        import_file(folder, tmp_path / "cache", "axolotl", tokenizer)


def test_a_fifo_named_like_a_data_file_is_refused_without_opening_it(tmp_path, tokenizer):
    # The fifth audit: the recipe load and the import command both waited forever on a FIFO (open blocks for a writer).
    import os

    from kdflow.config.logit_cache import data_files

    folder = write(tmp_path / "f", tokenizer)
    os.mkfifo(folder / "data_1.parquet")
    with pytest.raises(FileNotFoundError, match=r"data_1.parquet: not a regular file \(a FIFO"):
        import_file(folder, tmp_path / "cache", "axolotl", tokenizer)
    with pytest.raises(FileNotFoundError, match=r"data_1.parquet: not a regular file or a folder"):
        data_files(folder / "data_1.parquet")
