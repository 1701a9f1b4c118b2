"""LoRA students (kdflow/training/lora.py): a tiny pretrained student saved to a folder is trained through peft by SFT,
by offline KD from a real logit cache, and by online GKD against a live teacher. Only the adapters train (the base
weights are bit-for-bit unchanged at the end of training), the loss goes down, the saved model is the adapter merged
into the base (a plain causal LM that differs from the base and equals base + adapter), the adapter is kept beside it,
and an interrupted LoRA run resumes from its checkpoint. Also the recipe's refusals and the students stage with a LoRA
student."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaForCausalLM, TrainerCallback

from kdflow.config.kd import Divergence
from kdflow.config.logit_cache import LogitCacheSection
from kdflow.config.student import LoraSection, StudentSection
from kdflow.config.templates import chat
from kdflow.config.training import trainer_config
from kdflow.logit_cache.reader import LogitCache
from kdflow.store.model_folders import write_location
from kdflow.training.lora import lora_config
from kdflow.training.offline_kd import OfflineKDConfig, train_offline_kd
from kdflow.training.sft import train_sft
from kdflow.training.tiny_models import count_params, llama_model
from tests.logit_cache.test_capture import TEMPLATE, kept_rows, stage_ref, tiny_teacher

torch.set_num_threads(1)
TRAINING = {
    "max_steps": 30,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-2,
    "logging_steps": 5,
    "max_length": 64,
}
LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A real logit cache (a sharpened tiny teacher's top-5 on 48 kept answers) and a 2-layer pretrained
    student sharing its tokenizer, saved to a folder."""
    from tasks.capture import capture_logits

    tmp = tmp_path_factory.mktemp("lora")
    run_dir = tmp / "run"
    _, tokenizer = tiny_teacher(tmp / "teacher-model", sharpen=20.0)
    teacher = stage_ref(run_dir, "teacher", lambda d: write_location(d, str(tmp / "teacher-model")))
    curated = stage_ref(run_dir, "curate", lambda d: pd.DataFrame(kept_rows(48)).to_parquet(d / "kept.parquet"))
    logits = capture_logits.fn(
        run_dir, LogitCacheSection(k=5, shard_rows=16, value_encoding="fp16"), TEMPLATE, teacher, curated
    )
    # "Pretrained": 20 steps of full SFT on the task, so its embeddings (frozen under LoRA) already mean something.
    base = tmp / "student-base"
    student = llama_model(tokenizer, hidden=64, layers=2, heads=2, intermediate=128, seed=3)
    train_sft(
        student,
        tokenizer,
        sft_rows(),
        trainer_config({**TRAINING, "max_steps": 20}, tmp / "pretraining", 0),
        tmp / "pretraining",
    )
    student.save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = stage_ref(run_dir, "data", lambda d: None)  # the students stage's input; unread by data: teacher
    return {
        "tokenizer": tokenizer,
        "base": base,
        "run_dir": run_dir,
        "teacher": teacher,
        "curated": curated,
        "logits": logits,
        "data": data,
    }


def sft_rows():
    return [chat(TEMPLATE.replace("{{ question }}", r["question"]), r["text"]) for r in kept_rows(48)]


class Inspect(TrainerCallback):
    """At the start and the end of training: which parameters train, and the frozen ones' values."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
        self.frozen_at_start = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.frozen_at_end = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def base_key(peft_name: str) -> str:
    """The plain model's name of a frozen parameter of the peft-wrapped model."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def check_only_adapters_trained(seen: Inspect, base: LlamaForCausalLM, r: int):
    assert seen.trainable and all("lora_" in n for n in seen.trainable)
    # one A (r x in) and one B (out x r) per adapted linear layer: all-linear = 7 per Llama block, 2 blocks
    linears = {
        n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LLAMA_LINEAR
    }
    assert len(linears) == 14
    assert sum(seen.trainable.values()) == sum(r * (m.in_features + m.out_features) for m in linears.values())
    base_state = base.state_dict()
    assert set(seen.frozen_at_end) == set(seen.frozen_at_start)
    assert {base_key(n) for n in seen.frozen_at_end} == set(base_state) - {"lm_head.weight"}  # tied to embed_tokens
    for name, value in seen.frozen_at_end.items():
        assert torch.equal(value, base_state[base_key(name)]), name  # untouched by 30 optimizer steps


def check_merged_output(out, base_dir, tokenizer):
    """out/model: a plain Llama = base + adapter, different from the base; out/adapter: the adapter files."""
    from peft import PeftModel

    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (
        out / "adapter" / "adapter_config.json"
    ).is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert type(merged) is LlamaForCausalLM and not any("lora" in k for k in merged.state_dict())
    assert count_params(merged) == count_params(base)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged.state_dict()[q], base.state_dict()[q])
    assert torch.equal(merged.state_dict()["model.embed_tokens.weight"], base.state_dict()["model.embed_tokens.weight"])
    ids = tokenizer("Solve step by step: 3+4\n3+4=7", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter")
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-3)


def decreasing(losses: list[float], by: float) -> bool:
    return all(math.isfinite(x) for x in losses) and losses[-1] < (1 - by) * losses[0]


def test_lora_sft_trains_only_the_adapters_and_saves_the_merged_model(setup, tmp_path):
    tok, base_dir = setup["tokenizer"], setup["base"]
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    seen = Inspect()
    history = train_sft(
        model,
        tok,
        sft_rows(),
        trainer_config(TRAINING, tmp_path, 0),
        tmp_path,
        callbacks=[seen],
        peft_config=lora_config(LoraSection(r=4), model),
    )
    check_only_adapters_trained(seen, AutoModelForCausalLM.from_pretrained(base_dir), r=4)
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 6 and decreasing(losses, by=0.05), losses
    check_merged_output(tmp_path, base_dir, tok)


def test_lora_offline_kd_learns_from_the_cache_through_the_adapters(setup, tmp_path):
    tok, base_dir = setup["tokenizer"], setup["base"]
    cache = LogitCache.open(setup["logits"].path, expect_tokenizer=tok)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    seen = Inspect()
    history = train_offline_kd(
        model,
        tok,
        None,
        trainer_config(
            TRAINING,
            tmp_path,
            0,
            None,
            OfflineKDConfig,
            logit_cache=str(cache.folder),
            divergence=Divergence.forward_kl,
            alpha=0.5,
            temperature=1.0,
        ),
        tmp_path,
        callbacks=[seen],
        peft_config=lora_config(LoraSection(r=4), model),
    )
    check_only_adapters_trained(seen, AutoModelForCausalLM.from_pretrained(base_dir), r=4)
    logs = [h for h in history if "kd_loss" in h]
    # the KD term is computed on the adapted model's logits: only through the adapters can it go down
    # (the CE term, on the teacher's sampled tokens, pulls elsewhere than this random teacher's distributions)
    assert len(logs) == 6 and decreasing([h["kd_loss"] for h in logs], by=0.1), logs
    assert decreasing([h["ce_loss"] for h in logs], by=0.0), logs
    check_merged_output(tmp_path, base_dir, tok)


def test_named_target_modules_adapt_those_layers_only_and_a_typo_lists_the_real_names(setup):
    model = AutoModelForCausalLM.from_pretrained(setup["base"])
    config = lora_config(LoraSection(r=2, target_modules=["q_proj", "v_proj"]), model)
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.r == 2 and config.lora_alpha == 32.0
    with pytest.raises(ValueError, match=r"\['qproj'\] name no linear layer.*'q_proj'"):
        lora_config(LoraSection(target_modules=["qproj"]), model)


class StopAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 12:
            raise KeyboardInterrupt("killed at step 12")


def test_an_interrupted_lora_run_resumes_from_its_adapter_checkpoint(setup, tmp_path):
    tok, base_dir = setup["tokenizer"], setup["base"]
    training = {**TRAINING, "max_steps": 20, "save_steps": 5, "logging_steps": 1}
    checkpoints = tmp_path / "checkpoints"

    def run(out, callbacks):
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        return train_sft(
            model,
            tok,
            sft_rows(),
            trainer_config(training, out, 0, checkpoints),
            out,
            callbacks=callbacks,
            peft_config=lora_config(LoraSection(r=4), model),
        )

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "a", [StopAt()])
    assert (checkpoints / "checkpoint-10" / "adapter_model.safetensors").is_file()  # an adapter-only checkpoint
    history = run(tmp_path / "b", [])
    assert history[0] == {"resumed_from": "checkpoint-10"}
    assert [h["step"] for h in history[1:] if "loss" in h] == list(range(1, 21))
    check_merged_output(tmp_path / "b", base_dir, tok)


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"architecture": {"hidden": 32, "layers": 1, "heads": 1, "intermediate": 64}, "lora": {}},
            "set `model:` to a pretrained model folder",
        ),
        ({"model": "m", "lora": {"target_modules": []}}, "an empty list adapts nothing"),
        ({"model": "m", "lora": {"target_modules": ["q-proj"]}}, "are not module names"),
        ({"model": "m", "lora": {"r": 0}}, "greater than or equal to 1"),
        (
            {"model": "m", "data": "teacher", "kd": {"method": "feature", "feature": {}}, "lora": {}},
            "peft would freeze the learned feature projections",
        ),
        ({"model": "m", "launch": {"accelerate_config": "accelerate/multi_gpu.yaml"}}, "set launch.num_processes"),
        ({"model": "m", "launch": {"accelerate_config": "accelerate/none.yaml"}}, "no accelerate config at"),
    ],
)
def test_the_recipe_refuses_bad_lora_and_launch_settings(fields, message):
    with pytest.raises(ValidationError, match=message):
        StudentSection.model_validate({"name": "s", "data": "gold", **fields})


def test_a_lora_error_in_a_recipe_names_the_field_line_and_fix():
    from kdflow.config.loading import RecipeError
    from kdflow.config.recipe import parse_recipe
    from tests.config.test_recipe import DEMO

    text = DEMO.replace("    data: gold\n", "    data: gold\n    lora: {r: 8}\n", 1)
    assert text != DEMO
    with pytest.raises(RecipeError, match=r"demo.yaml:\d+: students.0: lora: .*set `model:`.*remove `lora:`"):
        parse_recipe(text, "demo.yaml")


def test_the_students_stage_trains_a_lora_kd_student_and_records_the_plain_model(setup):
    from tasks.students import train_student

    section = StudentSection(
        name="lora-kd",
        data="teacher",
        model=str(setup["base"]),
        lora={"r": 4},
        kd={"divergence": "forward_kl"},
        training={**TRAINING, "max_steps": 6},
    )
    ref = train_student.fn(
        setup["run_dir"], section, TEMPLATE, setup["teacher"], setup["data"], setup["curated"], setup["logits"]
    )
    manifest = ref.manifest()
    base = AutoModelForCausalLM.from_pretrained(setup["base"])
    assert manifest["name"] == "lora-kd" and manifest["rows"] == 48 and manifest["params"] == count_params(base)
    assert (Path(ref.path) / "adapter" / "adapter_model.safetensors").is_file()
    history = json.loads((Path(ref.path) / "log_history.json").read_text())
    assert any("kd_loss" in h for h in history)


def test_lora_online_gkd_trains_the_adapters_against_a_live_teacher(setup, tmp_path):
    from kdflow.store.model_folders import model_location
    from kdflow.training.online_kd import GKDConfig, train_online

    tok, base_dir = setup["tokenizer"], setup["base"]
    teacher = AutoModelForCausalLM.from_pretrained(model_location(setup["teacher"]))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    seen = Inspect()
    training = {**TRAINING, "max_steps": 4, "logging_steps": 2}
    config = trainer_config(
        training, tmp_path, 0, None, GKDConfig, lmbda=0.5, beta=0.5, temperature=1.0, max_new_tokens=8
    )
    peft = lora_config(LoraSection(r=4), model)
    history = train_online(model, teacher, tok, sft_rows()[:16], config, tmp_path, callbacks=[seen], peft_config=peft)
    check_only_adapters_trained(seen, AutoModelForCausalLM.from_pretrained(base_dir), r=4)
    assert [math.isfinite(h["loss"]) for h in history if "loss" in h] == [True, True]
    check_merged_output(tmp_path, base_dir, tok)
