"""Training one student outside Prefect (flows/train_one.py, kdflow/training/cli.py) and through `accelerate launch`.

The CLI on a run folder takes the finished inputs its recipe keys and trains like the students stage. The stage,
for a student with `launch:`, runs `accelerate launch` with accelerate/cpu_2proc.yaml: two CPU processes in one
gloo process group (DDP) train a LoRA offline-KD student; both ranks take part (each logs its rank in the group
of 2, and the epoch count shows the global batch was twice the per-process one), rank 0 alone writes, and the
stage's output is complete and reloads as a plain causal LM. A launch that fails raises with its log's tail."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from kdflow.config.student import StudentSection
from kdflow.training.tiny_models import count_params
from tests.logit_cache.test_capture import TEMPLATE
from tests.training.test_lora import setup  # noqa: F401  (the fixture: a run folder with a logit cache and a pretrained student)

torch.set_num_threads(1)
TRAINING = {
    "max_steps": 6,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-2,
    "logging_steps": 2,
    "max_length": 64,
}


def lora_kd_student(setup, **fields) -> StudentSection:
    return StudentSection(
        name="lora-kd",
        data="teacher",
        model=str(setup["base"]),
        lora={"r": 4},
        kd={"divergence": "forward_kl"},
        training=TRAINING,
        **fields,
    )


@pytest.mark.slow
def test_the_cli_trains_a_recipe_student_on_the_run_folders_inputs(prefect_server, mini_recipe, tmp_path):
    """The run folder made by the flows (data, teacher, answers, curation, top-5 cache); then an edited recipe's top-4
    cache, made last. The CLI, given the first recipe, trains on that recipe's cache, not the newest."""
    import yaml

    from flows.capture_logits import capture_logits_flow
    from flows.train_one import main, student_job
    from kdflow.config.recipe import load_recipe
    from kdflow.store import run_folder

    raw = yaml.safe_load(mini_recipe.read_text())
    raw["logit_cache"] = {"k": 5}
    raw["filters"] = {"correctness": False}  # every answer the tiny teacher writes is a row to train on
    student = {**raw["students"][1], "name": "logit-kd", "kd": {"divergence": "forward_kl"}}
    raw["students"] = [{**student, "training": {**student["training"], "max_steps": 6, "logging_steps": 2}}]
    mini_recipe.write_text(yaml.safe_dump(raw))
    captured = capture_logits_flow(str(mini_recipe))
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump({**raw, "logit_cache": {"k": 4}}))
    newer = capture_logits_flow(str(edited))  # the same run folder: its cache is the newest
    run = load_recipe(mini_recipe).run_dir
    assert run_folder.latest(run, "logit-cache").key == newer.key != captured.key

    job = student_job(str(mini_recipe), "logit-kd")
    assert job.logits.key == captured.key and job.curated == run_folder.latest(run, "curate")  # (one curation)
    main(["--recipe", str(mini_recipe), "--student", "logit-kd", "--out", str(tmp_path / "out")])
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")) is LlamaForCausalLM
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert any("kd_loss" in h for h in history) and history[-1]["step"] == 6
    with pytest.raises(SystemExit, match="no student 'nobody'.*'logit-kd'"):
        main(["--recipe", str(mini_recipe), "--student", "nobody", "--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_the_students_stage_trains_through_accelerate_launch_on_2_cpu_processes(setup):  # noqa: F811
    from tasks.students import train_student

    section = lora_kd_student(setup, launch={"accelerate_config": "accelerate/cpu_2proc.yaml"})
    ref = train_student.fn(
        setup["run_dir"], section, TEMPLATE, setup["teacher"], setup["data"], setup["curated"], setup["logits"]
    )
    out = Path(ref.path)
    log = (out.parent / f".launch-{ref.key[:16]}.log").read_text()
    for rank in (0, 1):  # each rank started, and finished as a member of a process group of 2 (torch.distributed)
        assert f"[rank {rank}/2] training 'lora-kd' on 48 rows" in log
    assert "[rank 0/2] done: wrote" in log and "[rank 1/2] done: rank 0 writes the model" in log
    history = json.loads((out / "log_history.json").read_text())
    # 6 steps of 2 processes x 4 rows = 48 rows = one epoch (one process would have seen half of them)
    assert history[-1]["step"] == 6 and history[-1]["epoch"] == 1.0
    assert any("kd_loss" in h for h in history)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert type(model) is LlamaForCausalLM and not any("lora" in k for k in model.state_dict())
    assert (
        ref.manifest()["params"]
        == count_params(model)
        == count_params(AutoModelForCausalLM.from_pretrained(setup["base"]))
    )
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out.parent / f".launch-{ref.key[:16]}.json").exists()  # the job file is removed once done
    assert not (out.parent / f".work-{ref.key[:16]}").exists()


@pytest.mark.slow
def test_a_failed_launch_raises_with_the_last_lines_of_its_log(setup):  # noqa: F811
    from tasks.students import train_student

    section = lora_kd_student(setup, launch={"accelerate_config": "accelerate/cpu_2proc.yaml"})
    # A hub id passes the recipe's checks (it may exist), and HF_HUB_OFFLINE makes the launched processes fail on it.
    section = section.model_copy(update={"model": "kdflow-tests/no-such-model", "name": "broken"})
    with pytest.raises(RuntimeError, match=r"(?s)`accelerate launch` exited with 1.*find them in the cached"):
        train_student.fn(
            setup["run_dir"], section, TEMPLATE, setup["teacher"], setup["data"], setup["curated"], setup["logits"]
        )
