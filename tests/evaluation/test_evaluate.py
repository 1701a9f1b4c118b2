"""Quality and cost metrics on cases with known answers: planted outputs, a model against itself, closed
forms, and the FLOPs formula against a hand count and torch's own FLOP counter."""

import functools
import math
from pathlib import Path

import pytest
import torch

from kdflow.evaluation import deployment
from kdflow.evaluation import quality as evaluate
from kdflow.evaluation.quality import (
    judge_prompts,
    outcome,
    parse_verdict,
    pass_at_k,
    reference_sequences,
    same_vocabulary,
    score_reference,
    win_rate,
)
from kdflow.training.tiny_models import llama_model, train_tokenizer

torch.set_num_threads(1)
COT = "Solve step by step: {{ question }}"
ROWS = [
    {"id": "t-0", "question": "12+7", "rationale": "=19\nAnswer: 19", "answer": "19"},
    {"id": "t-1", "question": "30-4+5", "rationale": "=26+5\n=31\nAnswer: 31", "answer": "31"},
    {"id": "t-2", "question": "8+8-1", "rationale": "=16-1\n=15\nAnswer: 15", "answer": "15"},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"Solve step by step: {r['question']}\n{r['rationale']}" for r in ROWS] * 20
    return train_tokenizer(texts, vocab_size=40)


def tiny(tokenizer, seed=0, hidden=64, layers=1):
    model = llama_model(tokenizer, hidden=hidden, layers=layers, heads=2, intermediate=64, seed=seed)
    return model.eval()


def check(text: str, gold: str) -> bool:
    return text.strip().endswith(f"Answer: {gold}")


# ---- accuracy and pass@k on planted outputs ----------------------------------------------------------


def planted(texts):
    """A stand-in for generate(): returns ``texts`` in order, whatever the model."""

    def fake(model, tokenizer, prompts, max_new_tokens, batch_size, temperature=0.0, seed=0):
        assert len(prompts) == len(texts)
        return [{"text": t, "finish_reason": "stop", "completion_tokens": 3} for t in texts]

    return fake


def test_accuracy_on_planted_outputs(monkeypatch):
    monkeypatch.setattr(evaluate, "generate", planted(["=19\nAnswer: 19", "=31\nAnswer: 30", "=15"]))
    acc, predictions = evaluate.accuracy(None, None, ROWS, COT, check, 8, 2)
    assert acc == pytest.approx(1 / 3)
    assert [p["correct"] for p in predictions] == [True, False, False]
    assert [p["id"] for p in predictions] == ["t-0", "t-1", "t-2"]


def test_an_answer_the_checker_cannot_finish_is_scored_wrong_and_says_why(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from data import gsm8k

    monkeypatch.setattr("kdflow.curation.verify.TIMEOUT_S", 1.0)
    monkeypatch.setattr(evaluate, "generate", planted(["#### 19", "so #### 9^9^9^9", "#### 15"]))
    with ThreadPoolExecutor(1) as pool:  # a worker thread, as Prefect runs tasks; the timeout only guards a hang
        acc, predictions = pool.submit(evaluate.accuracy, None, None, ROWS, COT, gsm8k.check_answer, 8, 2).result(300)
    assert acc == pytest.approx(2 / 3) and [p["correct"] for p in predictions] == [True, False, True]
    assert predictions[0]["unverified"] is None and "9^9^9^9" in predictions[1]["unverified"]


def test_pass_at_k_closed_forms():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(10, 4, 1) == pytest.approx(0.4)  # pass@1 is the fraction correct
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(5, 4, 2) == 1.0  # fewer wrong samples than k: some pick of k always has a right one
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(2, 1, 3)


def test_sampled_pass_at_k_counts_correct_samples_per_question(monkeypatch):
    samples = [
        "Answer: 19",
        "Answer: 1",  # question 0: 1 of 2 right
        "Answer: 31",
        "Answer: 31",  # question 1: 2 of 2
        "Answer: 0",
        "no answer",
    ]  # question 2: 0 of 2
    monkeypatch.setattr(evaluate, "generate", planted(samples))
    score, correct = evaluate.sampled_pass_at_k(
        None, None, ROWS, COT, check, k=1, samples=2, temperature=0.8, max_new_tokens=8, batch_size=4
    )
    assert correct == [1, 2, 0]
    assert score == pytest.approx((0.5 + 1 + 0) / 3)


# ---- perplexity and agreement on reference text ------------------------------------------------------


def test_reference_sequences_mark_the_answer_tokens(tokenizer):
    for (ids, start), row in zip(reference_sequences(tokenizer, ROWS, COT), ROWS):
        assert tokenizer.decode(ids[start:]) == row["rationale"] + "<|end|>"
        assert tokenizer.decode(ids[:start]).endswith("<|assistant|>")


def test_a_model_against_itself_agrees_everywhere_with_zero_kl(tokenizer):
    model = tiny(tokenizer)
    scores = score_reference(model, tokenizer, reference_sequences(tokenizer, ROWS, COT), batch_size=2, teacher=model)
    assert scores["agreement"] == 1.0
    assert scores["kl"] == pytest.approx(0.0, abs=1e-6)


def test_perplexity_is_exp_of_the_answer_tokens_mean_nll(tokenizer):
    model = tiny(tokenizer)
    sequences = reference_sequences(tokenizer, ROWS, COT)
    # By hand: HF's own loss with the prompt tokens masked out, over all rows' answer tokens at once.
    nll = tokens = 0.0
    for ids, start in sequences:
        labels = torch.tensor([[-100] * start + ids[start:]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
        nll += loss * (len(ids) - start)
        tokens += len(ids) - start
    for batch_size in (1, 3):  # right padding must not change the figure
        scores = score_reference(model, tokenizer, sequences, batch_size)
        assert scores["reference_tokens"] == tokens
        assert scores["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
        assert "agreement" not in scores


def test_logit_budget_splits_batches_without_changing_the_scores(tokenizer, monkeypatch):
    model, teacher = tiny(tokenizer, seed=1), tiny(tokenizer, seed=2)
    sequences = reference_sequences(tokenizer, ROWS, COT)
    whole = score_reference(model, tokenizer, sequences, batch_size=8, teacher=teacher)
    longest = max(len(ids) for ids, _ in sequences)
    monkeypatch.setattr(evaluate, "LOGIT_BUDGET", longest * len(tokenizer) * 4)  # one row's logits per pass
    assert [len(c) for c in evaluate._chunks(sequences, 8, len(tokenizer))] == [1, 1, 1]
    split = score_reference(model, tokenizer, sequences, batch_size=8, teacher=teacher)
    assert split == pytest.approx(whole, rel=1e-5)


def test_agreement_and_kl_between_two_different_models(tokenizer):
    sequences = reference_sequences(tokenizer, ROWS, COT)
    student, teacher = tiny(tokenizer, seed=1), tiny(tokenizer, seed=2)
    scores = score_reference(student, tokenizer, sequences, batch_size=2, teacher=teacher)
    # By hand, position by position.
    agree = kl = n = 0
    with torch.no_grad():
        for ids, start in sequences:
            x = torch.tensor([ids])
            s = torch.log_softmax(student(x).logits[0, start - 1 : len(ids) - 1], -1)
            t = torch.log_softmax(teacher(x).logits[0, start - 1 : len(ids) - 1], -1)
            agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
            kl += torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum").item()
            n += len(ids) - start
    assert scores["agreement"] == pytest.approx(agree / n)
    assert scores["kl"] == pytest.approx(kl / n, rel=1e-4) and scores["kl"] > 0


def test_scores_through_the_head_at_answer_positions_equal_the_models_own_logits(tokenizer, monkeypatch):
    # The head runs only at the answer positions when it is a plain linear map; a model whose logits need more (a
    # soft-capped head, say) takes its own full logits. Both paths must give the same figures.
    sequences = reference_sequences(tokenizer, ROWS, COT)
    student, teacher = tiny(tokenizer, seed=1), tiny(tokenizer, seed=2)
    calls = []
    real = type(student).forward

    @functools.wraps(real)  # the same signature: logits_to_keep is what tells a plain head
    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("logits_to_keep", 0))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(student), "forward", counted)
    head = score_reference(student, tokenizer, sequences, batch_size=2, teacher=teacher)
    assert calls and all(k == 1 for k in calls)  # one position's logits per row: the head ran on the answers only
    calls.clear()
    import kdflow.training.head as head_module

    monkeypatch.setattr(head_module, "dense_reason", lambda model: "a soft-capped head")
    dense = score_reference(student, tokenizer, sequences, batch_size=2, teacher=teacher)
    assert calls and all(k == 0 for k in calls)  # every position's logits
    assert dense == pytest.approx(head, rel=1e-5)


def test_same_vocabulary(tokenizer):
    other = train_tokenizer(["completely different words here"] * 5, vocab_size=30)
    assert same_vocabulary(tokenizer, tokenizer)
    assert not same_vocabulary(tokenizer, other)


# ---- LLM judge --------------------------------------------------------------------------------------


def test_parse_verdict_on_planted_judgements():
    assert parse_verdict("A is right.\nVerdict: A") == "A"
    assert parse_verdict("verdict: **b**") == "B"
    assert parse_verdict("Both are fine. Verdict: Tie") == "tie"
    assert parse_verdict("Verdict: A ... on reflection, Verdict: B") == "B"  # the last verdict counts
    assert parse_verdict("I prefer answer A") is None
    assert parse_verdict("Verdict: Apple") is None


def test_win_rate_scores_both_orders_and_keeps_unparsed_apart():
    items = judge_prompts(
        "Q: {{ question }}\nA: {{ answer_a }}\nB: {{ answer_b }}",
        [{"id": 1, "question": "2+2", "student": "4", "teacher": "5"}],
    )
    assert [i["student_is"] for i in items] == ["A", "B"]
    assert items[0]["prompt"] == "Q: 2+2\nA: 4\nB: 5" and items[1]["prompt"] == "Q: 2+2\nA: 5\nB: 4"
    # A judge that always says "A" prefers a position, not an answer: the student wins once, loses once.
    assert [outcome("A", i["student_is"]) for i in items] == ["win", "loss"]
    assert outcome("tie", "B") == "tie" and outcome(None, "A") is None
    judgements = [
        {"id": i // 2, "outcome": o, "reason": r}
        for i, (o, r) in enumerate(
            [
                ("win", None),
                ("win", None),
                ("loss", None),
                ("tie", None),
                (None, "unparsed_verdict"),
                ("tie", None),
                (None, "server_error"),
                (None, "unparsed_verdict"),
            ]
        )
    ]
    summary = win_rate(judgements)
    assert summary == {
        "win_rate": pytest.approx((1 + 1 + 0 + 0.5 + 0.5) / 5),
        "judged": 5,
        "wins": 2,
        "ties": 2,
        "losses": 1,
        "unparsed": 2,
        "failed": 1,
        "pairs_parsed": 2,
        "consistent_pairs": 1,
    }
    assert win_rate([{"outcome": None}])["win_rate"] is None


def test_judge_win_rate_with_a_tiny_model_judge(tmp_path):
    """A tiny model trained to answer every judge prompt with "Verdict: A": every judgement parses, and
    because each pair is judged in both orders, its position bias scores the student exactly ½."""
    from pathlib import Path

    from kdflow.config.templates import chat
    from kdflow.config.training import trainer_config
    from kdflow.training.sft import train_sft

    template = (Path(__file__).resolve().parents[2] / "prompts" / "judge.jinja").read_text()
    rows = [
        {"id": i, "question": f"{i}+{i}", "student": f"Answer: {2 * i}", "teacher": f"Answer: {2 * i + 1}"}
        for i in range(4)
    ]
    prompts = [j["prompt"] for j in judge_prompts(template, rows)]
    tok = train_tokenizer(prompts + ["Verdict: A"], vocab_size=120)
    judge = llama_model(tok, hidden=64, layers=1, heads=2, intermediate=64, seed=0)
    train_sft(
        judge,
        tok,
        [chat(p, "Verdict: A") for p in prompts] * 4,
        trainer_config(
            {"max_steps": 40, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 40}, tmp_path, 0
        ),
        tmp_path,
    )
    judge.eval()
    tok.padding_side = "left"
    summary, judgements = evaluate.judge_win_rate(judge, tok, template, rows, max_new_tokens=8, batch_size=8)
    assert len(judgements) == 2 * len(rows)
    assert 0.0 <= summary["win_rate"] <= 1.0
    assert (summary["win_rate"], summary["judged"], summary["unparsed"]) == (0.5, 8, 0)
    assert (summary["wins"], summary["losses"], summary["consistent_pairs"]) == (4, 4, 0)


# ---- deployment figures --------------------------------------------------------------------------------


def test_flops_per_token_against_a_hand_count():
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
        vocab_size=40,
    )
    # per layer: q 64·64 + k, v 2·64·32 + o 64·64 + gate, up, down 3·64·128 = 36,864 weights
    # 2 layers 73,728 + LM head 64·40 = 2,560 -> 76,288 multiply-adds -> 152,576 FLOPs
    # attention at 10 keys: 4 · 2 layers · 2 heads · 32 · 10 = 5,120 FLOPs
    assert deployment.flops_per_token(config, context=10) == 152_576 + 5_120
    assert deployment.flops_per_token(config, context=0) == 152_576


def test_flops_per_token_matches_torch_flop_counter(tokenizer):
    """A forward pass over n tokens with eager attention computes every query against all n keys, so its
    FLOPs are n × flops_per_token(context = n), exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    model = llama_model(tokenizer, hidden=64, layers=2, heads=2, intermediate=96, seed=0)
    model.config._attn_implementation = "eager"  # torch's counter does not see the CPU SDPA kernel
    n = 12
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, len(tokenizer), (1, n)))
    assert counter.get_total_flops() == n * deployment.flops_per_token(model.config, context=n)


def test_size_on_disk_is_the_weight_files(tokenizer, tmp_path):
    model = tiny(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    size = deployment.size_on_disk(tmp_path)
    assert size == (tmp_path / "model.safetensors").stat().st_size
    assert size >= 4 * sum(p.numel() for p in model.parameters())  # float32


def test_peak_memory_counts_weights_and_grows_with_the_batch(tokenizer):
    model = tiny(tokenizer, hidden=64, layers=2)
    one = deployment.encode(tokenizer, ["Solve step by step: 1+2"], model.device)
    many = deployment.encode(tokenizer, ["Solve step by step: 1+2"] * 32, model.device)
    peak_one = deployment.peak_generation_memory(model, tokenizer, one, tokens=16)
    peak_many = deployment.peak_generation_memory(model, tokenizer, many, tokens=16)
    assert peak_one > deployment.resident_bytes(model)
    # 31 more rows of KV cache: 2 layers × (k, v) × 64 floats × 4 bytes per token, over ~25 tokens
    assert peak_many - peak_one > 31 * 2 * 2 * 64 * 4 * 20


def test_measure_all_reports_every_figure_for_every_model(tokenizer):
    models = {
        "big": (tiny(tokenizer, hidden=64, layers=2), tokenizer),
        "small": (tiny(tokenizer, hidden=32), tokenizer),
    }
    figures = deployment.measure_all(
        models, "Solve step by step: 1+2", ["Solve step by step: 3+4"] * 4, tokens=4, repeats=2
    )
    assert set(figures) == {"big", "small"}
    for f in figures.values():
        assert f["latency_ms_per_token"] > 0 and f["throughput_tokens_per_s"] > 0 and f["peak_memory_bytes"] > 0
        assert f["context"] > 4
    assert figures["big"]["peak_memory_bytes"] > figures["small"]["peak_memory_bytes"]


def test_latency_and_throughput_from_a_scripted_clock(tokenizer, monkeypatch):
    """measure_all's arithmetic on known timings: latency = median(seconds / tokens) at batch 1, throughput =
    median(rows × tokens / seconds) at the larger batch; warm-up runs first and not counted; models alternate."""
    big, small = tiny(tokenizer, hidden=64), tiny(tokenizer, hidden=32)
    names = {id(big): "big", id(small): "small"}
    clock = {
        ("big", 1): [0.2, 0.1, 0.3],
        ("big", 4): [0.5, 0.4, 2.0],  # 10 tokens; 4 rows × 10 tokens = 40
        ("small", 1): [0.05, 0.05, 0.04],
        ("small", 4): [0.1, 0.2, 0.1],
    }
    calls = []

    def timed(model, tok, enc, tokens):
        rows = enc["input_ids"].shape[0]
        calls.append((names[id(model)], rows, tokens))
        return 99.0 if tokens == 2 else clock[(names[id(model)], rows)].pop(0)  # 2 tokens: the warm-up

    monkeypatch.setattr(deployment, "timed_generate", timed)
    monkeypatch.setattr(deployment, "peak_generation_memory", lambda model, tok, enc, tokens: 1)
    figures = deployment.measure_all(
        {"big": (big, tokenizer), "small": (small, tokenizer)},
        "Solve step by step: 1+2",
        ["Solve step by step: 3+4"] * 4,
        tokens=10,
        repeats=3,
    )
    assert figures["big"]["latency_ms_per_token"] == pytest.approx(20.0)  # median of 20, 10, 30 ms
    assert figures["big"]["throughput_tokens_per_s"] == pytest.approx(80.0)  # median of 80, 100, 20
    assert figures["small"]["latency_ms_per_token"] == pytest.approx(5.0)
    assert figures["small"]["throughput_tokens_per_s"] == pytest.approx(400.0)  # median of 400, 200, 400
    assert calls[:4] == [("big", 1, 2), ("big", 4, 2), ("small", 1, 2), ("small", 4, 2)]
    assert calls[4:8] == [("big", 1, 10), ("big", 4, 10), ("small", 1, 10), ("small", 4, 10)]  # alternating
    assert all(not v for v in clock.values())


def test_every_model_writes_exactly_the_timed_number_of_tokens(tokenizer):
    """A model that would end its turn early must not look faster: generation is forced to ``tokens``."""
    model = tiny(tokenizer)
    enc = deployment.encode(tokenizer, ["Solve step by step: 1+2", "Solve step by step: 30-4+5"], model.device)
    with torch.no_grad():
        out = deployment._generate(model, enc, 7, tokenizer.pad_token_id)
    assert out.shape == (2, enc["input_ids"].shape[1] + 7)
    # The mean context of the latency run: the prompt's tokens plus, on average, half the generated ones.
    one = deployment.encode(tokenizer, ["Solve step by step: 1+2"], model.device)
    assert deployment.context_of(one, 7) == one["input_ids"].shape[1] + 4


def test_measure_deployment_stage_writes_every_figure_with_the_formula_and_machine(tokenizer, tmp_path):
    import json

    import pandas as pd

    from kdflow.config.evaluation import EvaluationSection
    from kdflow.store.model_folders import write_location
    from kdflow.store.outputs import building, existing_output, finish
    from tasks.evaluate import measure_deployment

    def stage(name, key, build):
        key = key.ljust(64, "0")
        with building(tmp_path, name, key) as tmp:
            build(tmp)
            finish(tmp, name, key, inputs={})
        return existing_output(tmp_path, name, key)

    def saved(hidden):
        def build(tmp):
            tiny(tokenizer, hidden=hidden).save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
            write_location(tmp, "model")

        return build

    data = stage("data", "d", lambda tmp: pd.DataFrame(ROWS).to_parquet(tmp / "test.parquet"))
    models = {"teacher": stage("teacher", "t", saved(64)), "student": stage("students", "s", saved(32))}
    settings = EvaluationSection.Deployment(latency_tokens=3, throughput_batch=5, repeats=1)  # 5 > 3 rows: repeated
    ref = measure_deployment.fn(tmp_path, models, settings, COT, data, "test")
    m = ref.manifest()
    assert m["flops_formula"] == deployment.FLOPS_FORMULA and m["machine"]["cpu_count"] >= 1
    assert m["settings"] == {"latency_tokens": 3, "throughput_batch": 5, "repeats": 1}
    assert json.loads((Path(ref.path) / "deployment.json").read_text()) == m["figures"]
    for name, f in m["figures"].items():
        net = tiny(tokenizer, hidden=64 if name == "teacher" else 32)
        assert f["params"] == sum(p.numel() for p in net.parameters())
        assert f["flops_per_token"] == deployment.flops_per_token(net.config, f["context"])
        assert f["size_bytes"] == (Path(models[name].path) / "model" / "model.safetensors").stat().st_size
        assert f["latency_ms_per_token"] > 0 and f["throughput_tokens_per_s"] > 0 and f["peak_memory_bytes"] > 0
    assert m["figures"]["teacher"]["params"] > m["figures"]["student"]["params"]


# ---- the evaluate stage's body, without Prefect ---------------------------------------------------------


def test_evaluate_model_stage_with_pass_at_k(tokenizer, tmp_path):
    import pandas as pd

    from kdflow.config.data import DataSource
    from kdflow.config.evaluation import EvaluationSection
    from kdflow.store.model_folders import write_location
    from kdflow.store.outputs import building, existing_output, finish
    from tasks.evaluate import evaluate_model

    def stage(name, key, build):
        key = key.ljust(64, "0")
        with building(tmp_path, name, key) as tmp:
            build(tmp)
            finish(tmp, name, key, inputs={})
        return existing_output(tmp_path, name, key)

    def saved(seed):
        def build(tmp):
            tiny(tokenizer, seed=seed).save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
            write_location(tmp, "model")

        return build

    data = stage("data", "d", lambda tmp: pd.DataFrame(ROWS).to_parquet(tmp / "test.parquet"))
    teacher, student = stage("teacher", "t", saved(1)), stage("students", "s", saved(2))
    section = EvaluationSection(max_new_tokens=6, batch_size=4, pass_at_k=2, samples=3)
    evaluate = evaluate_model.fn(tmp_path, section, COT, DataSource.arithmetic, student, teacher, data)
    m = evaluate.manifest()["metrics"]
    assert m["rows"] == 3 and m["k"] == 2 and m["samples"] == 3
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["pass_at_k"] <= 1
    assert m["perplexity"] > 1 and 0 <= m["agreement"] <= 1 and m["kl"] > 0
    predictions = pd.read_parquet(f"{evaluate.path}/predictions.parquet")
    assert list(predictions["id"]) == ["t-0", "t-1", "t-2"] and set(predictions["correct_samples"]) <= {0, 1, 2, 3}
    itself = evaluate_model.fn(tmp_path, section, COT, DataSource.arithmetic, teacher, teacher, data).manifest()[
        "metrics"
    ]
    assert itself["agreement"] == 1.0 and itself["kl"] == pytest.approx(0.0, abs=1e-6)
