"""A missing API key for an API off this machine fails when the flow starts, naming the variable or Secret block
and the fix ("Your own teacher, end to end", item 8), instead of sending "EMPTY" and meeting a 401 once the stage
has started. A server on this machine (vLLM, SGLang) may take no key: no error before the run."""

from pathlib import Path

import pytest

from flows.chain import check_api_keys
from flows.distill import distill
from kdflow.config.evaluation import EvaluationSection
from kdflow.config.generation import GenerationSection
from kdflow.teacher.api_keys import MissingApiKey, is_local, key_needs

ROOT = Path(__file__).resolve().parents[2]
UNSET = "KDFLOW_TEST_PREFLIGHT_UNSET_KEY"
OPENAI = (
    "generation:\n  backend: openai\n  splits: [train, prompts]\n  max_new_tokens: 24\n"
    "  api: {{base_url: {url}, model: gpt-4o-mini, api_key_env: " + UNSET + "}}\n"
)


def openai_recipe(tmp_path: Path, url: str) -> Path:
    text = (ROOT / "tests" / "mini.yaml").read_text()
    head, rest = text.split("generation:\n", 1)
    rest = rest.split("\nstudents:", 1)[1]
    text = head.replace("root: runs", f"root: {tmp_path / 'runs'}") + OPENAI.format(url=url) + "\nstudents:" + rest
    path = tmp_path / "remote.yaml"
    path.write_text(text)
    return path


def generation(url: str | None, **api) -> GenerationSection:
    return GenerationSection(backend="openai", splits=["prompts"], api={"base_url": url, "api_key_env": UNSET, **api})


def test_distill_with_a_remote_api_and_no_key_fails_before_any_stage_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(UNSET, raising=False)
    recipe = openai_recipe(tmp_path, "https://api.example.com/v1")
    with pytest.raises(MissingApiKey) as e:
        distill.fn(str(recipe))  # the flow's body: the check runs before the first task is called
    message = str(e.value)
    assert f"generation.api.api_key_env: the environment variable {UNSET} is not set" in message
    assert "https://api.example.com/v1 is not this machine" in message
    assert f"export {UNSET}=<your key>" in message and "generation.api.api_key_secret_block" in message
    assert not (tmp_path / "runs").exists()  # no stage output, not even the data


def test_an_empty_variable_is_named_as_empty(monkeypatch):
    monkeypatch.setenv(UNSET, "  ")
    with pytest.raises(MissingApiKey, match=f"the environment variable {UNSET} is empty"):
        check_api_keys(generation("https://api.example.com/v1"))
    monkeypatch.setenv(UNSET, "sk-set")
    check_api_keys(generation("https://api.example.com/v1"))


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1"])
def test_a_server_on_this_machine_is_not_refused_for_a_missing_key(url, monkeypatch):
    monkeypatch.delenv(UNSET, raising=False)
    assert is_local(url)
    check_api_keys(generation(url), EvaluationSection.Judge(model="m", base_url=url, api_key_env=UNSET))


def test_what_is_checked(monkeypatch):
    monkeypatch.delenv(UNSET, raising=False)
    assert not is_local(None) and not is_local("https://127.0.0.1.example.com/v1")
    # OpenAI's URL is remote; `api_key_env: null` says the endpoint takes no key; hf needs none.
    assert [n.field for n in key_needs(generation("https://api.openai.com/v1"))] == ["generation.api"]
    assert key_needs(generation("https://api.example.com/v1", api_key_env=None)) == []
    assert key_needs(GenerationSection(backend="hf", splits=["prompts"])) == []
    judge = EvaluationSection.Judge(model="gpt-4o-mini", base_url="https://api.example.com/v1", api_key_env=UNSET)
    with pytest.raises(MissingApiKey, match=f"evaluation.judge.api_key_env: the environment variable {UNSET}"):
        check_api_keys(judge=judge)


def test_a_missing_secret_block_is_named_with_how_to_create_it(prefect_server, monkeypatch):
    from prefect.blocks.system import Secret

    monkeypatch.delenv(UNSET, raising=False)
    section = generation("https://api.example.com/v1", api_key_secret_block="kdflow-test-no-such-block")
    with pytest.raises(
        MissingApiKey,
        match=r"generation.api.api_key_secret_block: no Prefect Secret block named "
        r"'kdflow-test-no-such-block'.*create it",
    ):
        check_api_keys(section)
    Secret(value="sk-from-block").save("kdflow-test-preflight-block", overwrite=True)
    check_api_keys(generation("https://api.example.com/v1", api_key_secret_block="kdflow-test-preflight-block"))
