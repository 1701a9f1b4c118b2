"""Damaged model folders named by a recipe (issue 23; the fourth audit found each accepted at load, to fail only in the
first stage that read the weights): refused when the recipe loads, naming the folder, what is missing and the fix."""

import json
from pathlib import Path

import pytest

from kdflow.config.loading import RecipeError
from kdflow.config.recipe import load_recipe
from kdflow.models.model_folder import folder_problem, token_id_count
from tests.conftest import MINI_RECIPE

TOKENIZER = {
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2}},
    "added_tokens": [{"id": 47, "content": "<x>"}],
}


def folder(tmp_path: Path, *, config=None, weights=True, tokenizer=TOKENIZER) -> Path:
    """A model folder as save_pretrained leaves one, with what the test leaves out: a 48-token tokenizer (ids 0-2 and
    an added token 47) and a config of 48 rows."""
    out = tmp_path / "teacher"
    out.mkdir()
    if config is not False:
        (out / "config.json").write_text(json.dumps(config or {"model_type": "llama", "vocab_size": 48}))
    if weights:
        (out / "model.safetensors").write_bytes(b"weights")
    if tokenizer is not None:
        (out / "tokenizer.json").write_text(tokenizer if isinstance(tokenizer, str) else json.dumps(tokenizer))
    return out


def with_teacher(tmp_path: Path, model: Path) -> Path:
    text = MINI_RECIPE.read_text().replace("root: runs", f"root: {tmp_path / 'runs'}")
    start, end = text.index("teacher:\n"), text.index("generation:")
    text = text[:start] + f"teacher:\n  model: {model}\n\n" + text[end:]
    (tmp_path / "mini.yaml").write_text(text)
    return tmp_path / "mini.yaml"


def test_a_whole_folder_passes_and_its_token_ids_are_counted_with_the_added_ones(tmp_path):
    teacher = folder(tmp_path)
    assert folder_problem(teacher) is None
    assert token_id_count(teacher) == 48


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"config": False}, r"teacher has no config.json: it is not a saved model; save the model again"),
        ({"config": {"vocab_size": 48}}, r"config.json has no model_type: it is not a transformers model config"),
        ({"weights": False}, r"teacher has no weights \(model.safetensors, .*\); save the model again"),
        ({"tokenizer": None}, r"teacher has no tokenizer files \(tokenizer.json, .*tokenizer.save_pretrained"),
        ({"tokenizer": json.dumps(TOKENIZER)[:20]}, r"tokenizer.json is not valid JSON .*the model folder is damaged"),
        (
            {"config": {"model_type": "llama", "vocab_size": 10}},
            r"the tokenizer makes token ids up to 47, but config.json's vocab_size is 10.*not this model's",
        ),
    ],
)
def test_a_damaged_teacher_folder_is_refused_at_load_with_the_fix(tmp_path, damage, message):
    with pytest.raises(RecipeError, match=r"mini.yaml:\d+: teacher: .*" + message):
        load_recipe(with_teacher(tmp_path, folder(tmp_path, **damage)))


def test_a_weights_file_given_for_the_folder_is_refused(tmp_path):
    teacher = folder(tmp_path)
    with pytest.raises(RecipeError, match=r"model.safetensors is a file, not a model folder: point it at the folder"):
        load_recipe(with_teacher(tmp_path, teacher / "model.safetensors"))


def test_a_student_fine_tuned_from_a_damaged_folder_is_refused_at_load(tmp_path):
    student = folder(tmp_path, weights=False)
    text = MINI_RECIPE.read_text().replace("root: runs", f"root: {tmp_path / 'runs'}")
    added = f"  - name: fine-tuned\n    model: {student}\n    data: teacher\n    training: {{max_steps: 1}}\n"
    text = text.replace("\nevaluation:", added + "\nevaluation:", 1)
    (tmp_path / "mini.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"students.\d+: .*model '.*teacher': .*teacher has no weights"):
        load_recipe(tmp_path / "mini.yaml")
