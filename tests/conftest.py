"""Shared test setup: an isolated Prefect home and a temporary local Prefect server for the session."""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Before anything imports prefect (which creates PREFECT_HOME on import).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="kdflow-prefect-"))
# Folder hashes and what API servers said they serve (kdflow/store/model_folders.py, kdflow/teacher/served.py): a
# record of the session's own, not the machine's ~/.cache/kdflow.
os.environ.setdefault("KDFLOW_STATE_DIR", tempfile.mkdtemp(prefix="kdflow-state-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded machine starts slowly
# A report or progress artifact is best effort, given up after 30 s without an answer (tasks/progress.py); a test that
# checks one must not miss it because a loaded machine made the server slow. (Child processes inherit it.)
os.environ.setdefault("KDFLOW_ARTIFACT_TIMEOUT_S", "900")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

MINI_RECIPE = ROOT / "tests" / "mini.yaml"


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # The heartbeat thread adds ~1 s to the end of every flow run and tests nothing here.
    # The harness gives its server 30 s by default; a loaded 2-core machine has been seen to need more, and a test
    # must not fail because the machine is slow (None would wait forever on a server that cannot start).
    with (
        prefect_test_harness(server_startup_timeout=300),
        temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        yield


def assert_rerun_report(rerun: dict, first: dict) -> None:
    """An unchanged rerun's report is the first run's, but for its cost ledger, which says when each output was made:
    on the rerun every output was reused (made by the first run), at what it cost then."""
    rerun, first = dict(rerun), dict(first)
    ledger, first_ledger = rerun.pop("ledger"), first.pop("ledger")
    assert rerun == first, "an unchanged rerun changed the report"
    assert ledger["total"] == first_ledger["total"] and ledger["outputs"]
    assert ledger["this_run"]["outputs"] == 0 and not any(o["made_in_this_run"] for o in ledger["outputs"])


@pytest.fixture
def mini_recipe(tmp_path) -> Path:
    """The miniature recipe, writing its run folder under this test's tmp_path."""
    text = MINI_RECIPE.read_text().replace("root: runs", f"root: {tmp_path / 'runs'}")
    path = tmp_path / "mini.yaml"
    path.write_text(text)
    return path


# A real vLLM server for the teacher tests (test_vllm_teacher.py) and anything else that needs one: one per
# session, on 127.0.0.1, serving a tiny local Llama from .venv-vllm (made by `make vllm`, which `make test`
# runs). Clients use model=str(vllm_model_dir) and api_key=VLLM_TEST_API_KEY: the key is a sentinel that
# tests assert appears in no run folder, log or artifact.
VLLM_TEST_API_KEY = "sk-kdflow-SENTINEL-7f3a9c1e"
# Characters the tiny teacher's tokenizer must know, so that prompts with braces reach the model as written.
TINY_TEACHER_CORPUS = [
    "Solve step by step: 7+8-5",
    "7+8=15-5",
    "15-5=10",
    "Answer: 10",
    "What is {{ 7*7 }}? (literal braces) #### 49",
    "Be brief. Question:",
]


def fake_weights(tag: bytes = b"weights") -> bytes:
    """A whole safetensors file of one uint8 tensor holding ``tag``: what a test's stand-in model folder needs to pass
    the recipe's header check (kdflow/models/model_folder.py), different bytes for a different tag."""
    import numpy as np
    from safetensors.numpy import save

    return save({"w": np.frombuffer(tag, dtype=np.uint8).copy()})


def build_tiny_teacher(folder: Path) -> Path:
    """A 1-layer Llama (head dim 32, float32) and its BPE tokenizer with a chat template, saved to ``folder``."""
    from kdflow.training.tiny_models import llama_model, train_tokenizer

    tokenizer = train_tokenizer(TINY_TEACHER_CORPUS * 20, vocab_size=64)
    model = llama_model(tokenizer, hidden=64, layers=1, heads=2, intermediate=128, seed=0, max_positions=1024)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture(scope="session")
def vllm_server_url(vllm_model_dir):
    """``http://127.0.0.1:<port>/v1`` of a vLLM server for ``vllm_model_dir`` (API key VLLM_TEST_API_KEY)."""
    from kdflow.teacher.vllm_server import vllm_python, vllm_server

    if not vllm_python().is_file():
        pytest.skip(f"no vLLM interpreter at {vllm_python()}: run `make vllm` (make test creates it)")
    # float32: logprobs comparable with the HF model's; 1 GiB of KV cache is plenty for a tiny model and
    # keeps a shared 2-core machine's memory free; eager mode starts faster than a compiled graph.
    args = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
    with vllm_server(
        vllm_model_dir,
        extra_args=args,
        api_key=VLLM_TEST_API_KEY,
        startup_timeout_s=300,
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    ) as url:
        yield url
