"""Logit datasets in and out (kdflow/logit_cache/interop.py): a kdflow cache exported as DistillKit's compressed
parquet and as axolotl's KD columns, imported back exactly, a student trained from an import matching one trained
from the original, files the other tools write (no kdflow metadata, no tail) imported with the tail stated, bytes per
token printed for each format, and bad input refused naming the file, the row and the fix."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdflow.config.kd import Divergence
from kdflow.config.logit_cache import ValueEncoding
from kdflow.config.training import trainer_config
from kdflow.logit_cache import axolotl, distillkit
from kdflow.logit_cache.format import TAIL_FLOOR, CacheMismatch, TopK, tail_from_topk
from kdflow.logit_cache.interop import LogitFileError, export_cache, import_file
from kdflow.logit_cache.reader import LogitCache
from kdflow.training.offline_kd import OfflineKDConfig, train_offline_kd
from kdflow.training.tiny_models import llama_model, train_tokenizer
from tests.logit_cache.test_logit_cache import rows_of, write_cache

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
K = 5
TRAINING = {
    "max_steps": 6,
    "per_device_train_batch_size": 8,
    "learning_rate": 3e-3,
    "logging_steps": 1,
    "max_length": 64,
}


@pytest.fixture(scope="module")
def teacher():
    corpus = [f"Solve step by step: {a}+{b}\n{a}+{b}={a + b}\nAnswer: {a + b}" for a in range(10) for b in range(10)]
    tokenizer = train_tokenizer(corpus, 48)
    model = llama_model(tokenizer, hidden=64, layers=1, heads=2, intermediate=128, seed=0).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)  # peaked distributions, as a trained teacher's are
    return tokenizer, model


@pytest.fixture(scope="module", params=["u8", "fp16"])
def cache(request, teacher, tmp_path_factory):
    """A real cache: the tiny teacher's top-5 on 40 answers, 3 shards."""
    tokenizer, model = teacher
    folder = tmp_path_factory.mktemp(f"cache-{request.param}") / "cache"
    write_cache(folder, tokenizer, model, rows_of(tokenizer, 40), K, ValueEncoding(request.param), shard_rows=16)
    return LogitCache.open(folder, expect_tokenizer=tokenizer)


def same_rows(a: LogitCache, b: LogitCache) -> None:
    assert a.row_ids == b.row_ids
    for row_id in a.row_ids:
        x, y = a[row_id], b[row_id]
        assert torch.equal(x.input_ids, y.input_ids) and x.start == y.start, row_id
        assert torch.equal(x.ids, y.ids), row_id
        assert torch.equal(x.logprobs, y.logprobs), row_id
        assert torch.equal(x.tail, y.tail), row_id


@pytest.mark.parametrize("fmt", ["axolotl", "distillkit"])
def test_a_round_trip_through_each_format_is_exact_and_its_bytes_per_token_are_reported(cache, teacher, fmt, tmp_path):
    tokenizer, _ = teacher
    sizes = export_cache(cache.folder, tmp_path / "out", fmt)
    import_file(tmp_path / "out", tmp_path / "back", fmt, tokenizer)
    back = LogitCache.open(tmp_path / "back", expect_tokenizer=tokenizer)
    same_rows(cache, back)  # ids identical; u8 steps and fp16 values come back bit for bit, and so does the tail
    assert back.manifest["value_encoding"] == cache.manifest["value_encoding"]
    assert back.manifest["teachers"] == cache.manifest["teachers"] and back.manifest["source"] == f"import:{fmt}"
    assert json.loads((tmp_path / "back" / "manifest.json").read_text())["rows"] == 40  # a finished stage output
    # another teacher named at import contradicts the export's record: refused (the fourth audit found it ignored)
    with pytest.raises(LogitFileError, match=r"a kdflow export, which records its teachers .*drop the teacher name"):
        import_file(tmp_path / "out", tmp_path / "named", fmt, tokenizer, teacher="qwen-7b")
    assert not (tmp_path / "named").exists()
    print(
        f"\n{fmt} export of a {cache.manifest['value_encoding']} cache (V {cache.vocab_size}, k {K}, "
        f"{sizes['positions']} answer positions): {sizes['bytes']} bytes = {sizes['bytes_per_position']} B per answer "
        f"token, {sizes['bytes_per_token']} B per sequence token; the kdflow cache: {sizes['cache_bytes_per_position']}"
        " B per answer token"
    )


def test_the_budget_layout_keeps_ids_and_the_top1_and_fits_the_rest(cache, teacher, tmp_path):
    """DistillKit's README budget pick: ids exact, the top-1 in bf16, the other k − 1 a 3-term polynomial."""
    tokenizer, _ = teacher
    export_cache(cache.folder, tmp_path / "out", "distillkit", distillkit.Layout(k=K))
    import_file(tmp_path / "out", tmp_path / "back", "distillkit", tokenizer, encoding=ValueEncoding.fp16)
    back = LogitCache.open(tmp_path / "back")
    errors = []
    for row_id in cache.row_ids:
        x, y = cache[row_id], back[row_id]
        assert torch.equal(x.ids, y.ids) and torch.equal(x.tail, y.tail)
        torch.testing.assert_close(y.logprobs[:, 0], x.logprobs[:, 0], atol=0.0, rtol=2**-8 + 2**-11)  # bf16, fp16
        errors.append((y.logprobs[:, 1:] - x.logprobs[:, 1:]).abs())
    errors = torch.cat(errors)
    print(f"\nbudget layout, k {K}: |Δ log p| of ranks 2..k: mean {errors.mean():.3f}, max {errors.max():.3f} nats")
    assert errors.max() < 2.0


def student_run(tokenizer, cache_dir, out):
    model = llama_model(tokenizer, hidden=32, layers=1, heads=1, intermediate=64, seed=0)
    history = train_offline_kd(
        model,
        tokenizer,
        None,
        trainer_config(
            TRAINING,
            out,
            0,
            None,
            OfflineKDConfig,
            logit_cache=str(cache_dir),
            divergence=Divergence.forward_kl,
            alpha=0.5,
            temperature=2.0,
        ),
        out,
    )
    return [(h["ce_loss"], h["kd_loss"]) for h in history if "kd_loss" in h], model.state_dict()


@pytest.mark.parametrize("fmt", ["axolotl", "distillkit"])
def test_a_student_trained_from_an_import_matches_one_trained_from_the_original(cache, teacher, fmt, tmp_path):
    tokenizer, _ = teacher
    export_cache(cache.folder, tmp_path / "out", fmt, with_tail=True)
    import_file(tmp_path / "out", tmp_path / "imported", fmt, tokenizer)
    original, original_weights = student_run(tokenizer, cache.folder, tmp_path / "a")
    imported, imported_weights = student_run(tokenizer, tmp_path / "imported", tmp_path / "b")
    assert len(original) == 6
    torch.testing.assert_close(torch.tensor(imported), torch.tensor(original), rtol=1e-5, atol=1e-6)
    for name, value in original_weights.items():
        torch.testing.assert_close(imported_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def foreign(table: pa.Table) -> pa.Table:
    """What another tool writes: the columns without kdflow's tail and metadata."""
    return table.drop_columns([c for c in table.column_names if c.startswith("kdflow")]).replace_schema_metadata(None)


def topk_rows(cache) -> list[TopK]:
    return [
        TopK(r.row_id, r.input_ids.numpy(), r.start, r.ids.numpy(), r.logprobs.numpy(), r.tail.numpy())
        for r in cache.iter_rows()
    ]


def test_an_axolotl_file_without_kdflows_tail_gets_one_minus_the_top_k_mass(cache, teacher, tmp_path):
    tokenizer, _ = teacher
    rows = topk_rows(cache)
    pq.write_table(foreign(axolotl.table_of(rows, K)), tmp_path / "raw.parquet")
    # axolotl's own data renormalise the top-k to sum 1: nothing is left for the tail
    renormalised = [
        TopK(
            r.row_id,
            r.input_ids,
            r.start,
            r.ids,
            r.logprobs - np.log(np.exp(r.logprobs.astype(np.float64)).sum(-1, keepdims=True)),
            r.tail,
        )
        for r in rows
    ]
    pq.write_table(foreign(axolotl.table_of(renormalised, K)), tmp_path / "normalised.parquet")
    import_file(tmp_path / "raw.parquet", tmp_path / "a", "axolotl", tokenizer, encoding=ValueEncoding.fp16)
    import_file(tmp_path / "normalised.parquet", tmp_path / "b", "axolotl", tokenizer)
    raw, normalised = LogitCache.open(tmp_path / "a"), LogitCache.open(tmp_path / "b")
    assert raw.row_ids[:2] == ["raw/0", "raw/1"]  # no kdflow row ids in the file: named by file and row
    for r, row_id in zip(rows, raw.row_ids):
        got = raw[row_id]
        assert np.array_equal(got.ids.numpy(), r.ids)
        expected = torch.from_numpy(tail_from_topk(got.logprobs.numpy())).half().float()
        assert torch.equal(got.tail, expected)  # the tail stated: log(1 - sum of the top-k p)
        assert (normalised[normalised.row_ids[0]].tail <= TAIL_FLOOR + 0.1).all()  # renormalised: the floor
    assert "computed from the top-k log-probs of the axolotl file" in raw.manifest["tail"]


def test_a_distillkit_file_from_its_own_capture_reads_with_its_config_defaults(cache, teacher, tmp_path):
    """DistillKit's capture: n − 1 positions per row from position 0, no labels, delta encoding (its default), the
    config beside data_0.parquet. Every position is imported; the answer positions match the cache."""
    tokenizer, _ = teacher
    layout = distillkit.Layout(k=K, exact_k=K, exact_dtype="float32", terms=(), delta_encoding=True)
    rows = topk_rows(cache)
    table = foreign(distillkit.table_of(rows, layout, cache.vocab_size)).drop_columns(["labels"])
    (tmp_path / "dk").mkdir()
    pq.write_table(table, tmp_path / "dk" / "data_0.parquet")
    config = distillkit.config_of(layout, cache.vocab_size)
    del config["delta_encoding"]  # left out: DistillKit's default (on) applies
    (tmp_path / "dk" / distillkit.CONFIG_FILE).write_text(json.dumps(config))  # JSON is YAML
    import_file(tmp_path / "dk", tmp_path / "back", "distillkit", tokenizer, encoding=ValueEncoding.fp16)
    back = LogitCache.open(tmp_path / "back")
    for r, row_id in zip(rows, back.row_ids):
        got = back[row_id]
        assert got.start == 0 and len(got.ids) == len(r.input_ids) - 1  # every position, the prompt's too
        span = slice(r.start, r.start + len(r.ids))
        assert np.array_equal(got.ids[span].numpy(), r.ids)
        assert torch.equal(got.tail, torch.from_numpy(tail_from_topk(got.logprobs.numpy())).half().float())
        np.testing.assert_allclose(got.logprobs[span].numpy(), r.logprobs, atol=2e-2)  # fp16 of float32 deltas
        assert (got.ids[: r.start, 0].numpy() == r.input_ids[1 : r.start + 1]).all()  # the prompt: its own tokens


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.fixture
def axolotl_file(cache, tmp_path):
    table = foreign(axolotl.table_of(topk_rows(cache)[:6], K))
    pq.write_table(table, tmp_path / "file.parquet")
    return tmp_path / "file.parquet", table


def rewrite(path, table, column, row, change):
    values = table.column(column).to_pylist()
    values[row] = change(values[row])
    pq.write_table(
        table.set_column(
            table.column_names.index(column), column, pa.array(values, type=table.schema.field(column).type)
        ),
        path,
    )


def test_another_tokenizer_is_refused_for_a_kdflow_export_for_a_foreign_file_and_at_training(cache, teacher, tmp_path):
    tokenizer, _ = teacher
    other = train_tokenizer([f"{a}*{b}={a * b}" for a in range(10) for b in range(10)], 40)
    export_cache(cache.folder, tmp_path / "out", "axolotl")
    with pytest.raises(CacheMismatch, match=r"data_0\.parquet: tokenizer mismatch"):
        import_file(tmp_path / "out", tmp_path / "x", "axolotl", other)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))  # nothing half-written left
    small = train_tokenizer(["ab"], 12)  # fewer tokens than the file's ids
    pq.write_table(foreign(axolotl.table_of(topk_rows(cache)[:2], K)), tmp_path / "f.parquet")
    with pytest.raises(
        LogitFileError,
        match=r"f\.parquet: row 0, position \d+: input token \d+ is not in the "
        r"tokenizer .* pass --tokenizer",
    ):
        import_file(tmp_path / "f.parquet", tmp_path / "y", "axolotl", small, vocab_size=cache.vocab_size)
    import_file(tmp_path / "out", tmp_path / "imported", "axolotl", tokenizer)
    with pytest.raises(CacheMismatch, match="tokenizer mismatch"):  # the student's check, as for a captured cache
        train_offline_kd(
            llama_model(other, 32, 1, 1, 64, 0),
            other,
            None,
            trainer_config(TRAINING, tmp_path / "s", 0, None, OfflineKDConfig, logit_cache=str(tmp_path / "imported")),
            tmp_path / "s",
        )


@pytest.mark.parametrize("fmt", ["axolotl", "distillkit"])
def test_a_truncated_file_is_refused_naming_it(cache, teacher, fmt, tmp_path):
    export_cache(cache.folder, tmp_path / "out", fmt)
    data = tmp_path / "out" / "data_1.parquet"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(LogitFileError, match=r"data_1\.parquet: not a whole parquet file .*truncated"):
        import_file(tmp_path / "out", tmp_path / "x", fmt, teacher[0])
    assert not (tmp_path / "x").exists()


def test_columns_of_unequal_length_are_refused_naming_file_and_row(axolotl_file, teacher, tmp_path):
    path, table = axolotl_file
    rewrite(path, table, "target_logprobs", 3, lambda v: v[:-1])
    with pytest.raises(
        LogitFileError,
        match=r"file\.parquet: row 3: columns of unequal length \(input_ids (\d+), "
        r"target_token_ids \1, target_logprobs \d+, target_mask \1\)",
    ):
        import_file(path, tmp_path / "x", "axolotl", teacher[0])


def test_distillkit_columns_of_unequal_length_and_a_wrong_config_are_refused(cache, teacher, tmp_path):
    export_cache(cache.folder, tmp_path / "out", "distillkit")
    path = tmp_path / "out" / "data_0.parquet"
    table = pq.read_table(path)
    rewrite(path, table, "bytepacked_indices", 2, lambda v: v[:-1])
    with pytest.raises(LogitFileError, match=r"data_0\.parquet: row 2: columns of unequal length \(bytepacked_indices"):
        import_file(tmp_path / "out", tmp_path / "x", "distillkit", teacher[0])
    pq.write_table(table, path)
    distillkit.write_config(tmp_path / "out" / distillkit.CONFIG_FILE, distillkit.lossless(K + 1), cache.vocab_size)
    with pytest.raises(
        LogitFileError,
        match=r"row 0: bytepacked_indices has \d+ bytes per position, the compression "
        r"config \(k=6.*wrong compression_config\.yaml",
    ):
        import_file(tmp_path / "out", tmp_path / "x", "distillkit", teacher[0])


def test_ids_at_or_above_the_vocabulary_are_refused_naming_row_position_and_fix(axolotl_file, cache, teacher, tmp_path):
    path, table = axolotl_file
    start = topk_rows(cache)[2].start
    rewrite(path, table, "target_token_ids", 2, lambda v: v[: start + 1] + [[cache.vocab_size] * K] + v[start + 2 :])
    with pytest.raises(
        LogitFileError,
        match=rf"row 2, position {start + 1}: top-k id {cache.vocab_size} is outside the "
        r"vocabulary .* pass --vocab-size",
    ):
        import_file(path, tmp_path / "x", "axolotl", teacher[0])


@pytest.mark.parametrize(
    "mask, message",
    [
        (lambda m, s: m[: s + 1] + [[1] * 2 + [0] * (K - 2)] + m[s + 2 :], "keeps 2 of 5 entries"),
        (lambda m, s: m[: s + 1] + [[0] * K] + m[s + 2 :], "target_mask has a gap"),
        (lambda m, s: m[:s] + [[0] * K] + m[s:-1], "the last position is kept.*aligned one position off"),
    ],
    ids=["partial", "gap", "off-by-one"],
)
def test_a_target_mask_kdflow_cannot_store_says_why(axolotl_file, cache, teacher, tmp_path, mask, message):
    path, table = axolotl_file
    rewrite(path, table, "target_mask", 1, lambda m: mask(m, topk_rows(cache)[1].start))
    with pytest.raises(LogitFileError, match=rf"file\.parquet: row 1.*{message}"):
        import_file(path, tmp_path / "x", "axolotl", teacher[0])


# ---- the command ---------------------------------------------------------------------------------------------


def test_the_commands_export_and_import_and_their_help_imports_no_torch(cache, teacher, tmp_path):
    from flows.cli import main

    tokenizer, _ = teacher
    tokenizer.save_pretrained(tmp_path / "tok")
    assert main(["logit-cache", "export", "--format", "distillkit", str(cache.folder), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / distillkit.CONFIG_FILE).is_file()
    assert (
        main(
            [
                "logit-cache-import",
                "--format",
                "distillkit",
                str(tmp_path / "out"),
                str(tmp_path / "back"),
                "--tokenizer",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    same_rows(cache, LogitCache.open(tmp_path / "back", expect_tokenizer=tokenizer))
    with pytest.raises(FileExistsError, match="exists"):
        main(["logit-cache-export", "--format", "axolotl", str(cache.folder), str(tmp_path / "out")])
    code = (
        "import sys; from flows.cli import main\n"
        "for c in ('logit-cache-export', 'logit-cache-import'):\n"
        "    try: main([c, '--help'])\n"
        "    except SystemExit: pass\n"
        "print('torch' in sys.modules, 'prefect' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_an_exports_rows_reordered_or_relabelled_after_it_was_written_are_refused(cache, teacher, tmp_path):
    # The fifth audit: rows of a kdflow export reordered with its metadata kept imported with exit 0, each row id then
    # naming another row's sequence; DistillKit labels that start a position later than the metadata's span lost that
    # position without a word.
    export_cache(cache.folder, tmp_path / "axolotl", "axolotl")
    path = tmp_path / "axolotl" / "data_0.parquet"
    table = pq.read_table(path)
    order = [1, 0, *range(2, table.num_rows)]  # rows 0 and 1 hold answers of other lengths
    pq.write_table(table.take(order).replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(LogitFileError, match=r"data_0\.parquet: row 0: its tokens are not the sequence .* reordered"):
        import_file(tmp_path / "axolotl", tmp_path / "x", "axolotl", teacher[0])
    # an export written before the rows' digests: the spans still tell rows of other lengths apart
    meta = json.loads(table.schema.metadata[b"kdflow"])
    del meta["tokens_sha256"]
    older = table.schema.metadata | {b"kdflow": json.dumps(meta).encode()}
    pq.write_table(table.take(order).replace_schema_metadata(older), path)
    with pytest.raises(LogitFileError, match=r"data_0\.parquet: row 0: positions .* the rows were reordered or edited"):
        import_file(tmp_path / "axolotl", tmp_path / "x", "axolotl", teacher[0])
    # rows of equal spans swapped: only the digests see it
    spans = meta["spans"]
    same = next((i, j) for i in range(len(spans)) for j in range(i + 1, len(spans)) if spans[i] == spans[j])
    order = list(range(table.num_rows))
    order[same[0]], order[same[1]] = order[same[1]], order[same[0]]
    pq.write_table(table.take(order).replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(LogitFileError, match=rf"row {same[0]}: its tokens are not the sequence"):
        import_file(tmp_path / "axolotl", tmp_path / "x", "axolotl", teacher[0])

    export_cache(cache.folder, tmp_path / "dk", "distillkit")
    path = tmp_path / "dk" / "data_0.parquet"
    table = pq.read_table(path)

    def later(labels):
        first = next(i for i, t in enumerate(labels) if t >= 0)
        return [*labels[:first], -100, *labels[first + 1 :]]  # the first trained label masked: one later

    rewrite(path, table, "labels", 0, later)
    with pytest.raises(LogitFileError, match=r"row 0: the kdflow metadata's span starts at position \d+, the labels"):
        import_file(tmp_path / "dk", tmp_path / "y", "distillkit", teacher[0])


def test_an_exports_metadata_of_another_row_count_is_refused_naming_the_file(cache, teacher, tmp_path):
    # The seventh audit: a tokens_sha256 list cut to one entry gave a bare IndexError naming no file.
    export_cache(cache.folder, tmp_path / "axolotl", "axolotl")
    path = tmp_path / "axolotl" / "data_0.parquet"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"kdflow"])
    meta["tokens_sha256"] = meta["tokens_sha256"][:1]
    pq.write_table(table.replace_schema_metadata(table.schema.metadata | {b"kdflow": json.dumps(meta).encode()}), path)
    with pytest.raises(
        LogitFileError, match=r"data_0\.parquet: its kdflow metadata lists tokens_sha256 for 1 rows, and the"
    ):
        import_file(tmp_path / "axolotl", tmp_path / "x", "axolotl", teacher[0])
