"""Credentials stay out of what a run keeps (reliability issue, item 6): a password in an endpoint URL and a Hub
token in training knobs reach no cache key, manifest or file of the run folder; an API-key variable that is not
set is named as such, not reported as a rejected key. Sentinel values are searched for in every file written."""

from pathlib import Path

import pytest

from kdflow.config.evaluation import EvaluationSection
from kdflow.config.fields import redact_url
from kdflow.config.generation import GenerationSection
from kdflow.config.loading import RecipeError
from kdflow.config.recipe import parse_recipe
from kdflow.store.outputs import building, content_key, existing_output, finish
from kdflow.teacher.api_client import FatalApiError

ROOT = Path(__file__).resolve().parents[2]
DEMO = (ROOT / "recipes" / "demo.yaml").read_text()
PASSWORD = "pw-kdflow-SENTINEL-3b9d"
HUB_TOKEN = "hf_kdflow_SENTINEL_51c2"


def files_holding(folder: Path, secret: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def openai_section(base_url: str) -> GenerationSection:
    return GenerationSection(backend="openai", splits=["prompts"], api={"base_url": base_url, "model": "m"})


def test_a_password_in_the_endpoint_url_reaches_no_key_and_no_file_of_the_run_folder(tmp_path):
    section = openai_section(f"https://kd:{PASSWORD}@api.example.com/v1")
    key = content_key("generate", "2", {"section": section})
    assert key == content_key("generate", "2", {"section": openai_section("https://kd:other@api.example.com/v1")})
    assert key != content_key("generate", "2", {"section": openai_section("https://other.example.com/v1")})
    run_dir = tmp_path / "run"
    with building(run_dir, "generate", key) as tmp:
        (tmp / "answers.txt").write_text("rows")
        finish(tmp, "generate", key, inputs={"section": section}, rows=1)
    manifest = existing_output(run_dir, "generate", key).manifest()
    assert manifest["inputs"]["section"]["api"]["base_url"] == "https://***@api.example.com/v1"
    assert section.api.base_url == f"https://kd:{PASSWORD}@api.example.com/v1"  # the stage still connects with it
    assert files_holding(tmp_path, PASSWORD) == []
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert redact_url(f"https://{PASSWORD}@h/v1") == "https://***@h/v1"


def test_a_hub_token_in_training_knobs_is_refused_with_where_it_belongs_instead():
    text = DEMO.replace("      max_steps: 1500\n", f"      max_steps: 1500\n      hub_token: {HUB_TOKEN}\n", 1)
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "demo.yaml")
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "hub_token" in s)
    assert (
        f"demo.yaml:{line}: students.0.training.hub_token: remove it: a secret in a recipe reaches cache keys, "
        "manifests and logs; set HF_TOKEN in the environment"
    ) in str(e.value)
    assert HUB_TOKEN not in str(e.value)


def test_credentials_in_a_run_url_are_refused_without_being_echoed():
    text = DEMO.replace("  name: demo\n", f"  name: demo\n  root: s3://kd:{PASSWORD}@bucket/runs\n", 1)
    with pytest.raises(
        RecipeError,
        match=r"demo.yaml:7: run.root: s3://\*\*\*@bucket/runs: take the credentials out "
        r"of the URL .*AWS_ACCESS_KEY_ID",
    ) as e:
        parse_recipe(text, "demo.yaml")
    assert PASSWORD not in str(e.value)


@pytest.mark.parametrize("value, state", [(None, "is not set"), ("", "is empty"), ("  ", "is empty")])
def test_an_unset_api_key_variable_is_named_not_reported_as_a_401(monkeypatch, value, state):
    from tasks.api_keys import generation_api_key as api_key
    from tasks.evaluate import judge_api_key

    if value is None:
        monkeypatch.delenv("KDFLOW_TEST_NO_KEY", raising=False)
    else:
        monkeypatch.setenv("KDFLOW_TEST_NO_KEY", value)
    section = GenerationSection(
        backend="openai",
        splits=["prompts"],
        api={"base_url": "http://127.0.0.1:9/v1", "api_key_env": "KDFLOW_TEST_NO_KEY"},
    )
    with pytest.raises(
        FatalApiError,
        match=rf"generation.api.api_key_env: the environment variable KDFLOW_TEST_NO_KEY "
        rf"{state}; export KDFLOW_TEST_NO_KEY=<your key> .*or set "
        r"generation.api.api_key_env: null",
    ) as e:
        api_key(section)
    assert "401" not in str(e.value)
    judge = EvaluationSection.Judge(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="KDFLOW_TEST_NO_KEY")
    with pytest.raises(
        FatalApiError, match=rf"evaluation.judge.api_key_env: the environment variable KDFLOW_TEST_NO_KEY {state}"
    ):
        judge_api_key(judge)
    monkeypatch.setenv("KDFLOW_TEST_NO_KEY", "sk-set")
    assert api_key(section) == "sk-set"
    assert (
        api_key(
            GenerationSection(
                backend="openai", splits=["prompts"], api={"base_url": "http://127.0.0.1:9/v1", "api_key_env": None}
            )
        )
        is None
    )
