"""Shared test setup: an isolated Prefect home and a temporary local Prefect server for the session."""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Before anything imports prefect (which creates PREFECT_HOME on import).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="kdflow-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

MINI_RECIPE = ROOT / "tests" / "mini.yaml"


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # The heartbeat thread adds ~1 s to the end of every flow run and tests nothing here.
    with prefect_test_harness(), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@pytest.fixture
def mini_recipe(tmp_path) -> Path:
    """The miniature recipe, writing its run folder under this test's tmp_path."""
    text = MINI_RECIPE.read_text().replace("root: runs", f"root: {tmp_path / 'runs'}")
    path = tmp_path / "mini.yaml"
    path.write_text(text)
    return path
