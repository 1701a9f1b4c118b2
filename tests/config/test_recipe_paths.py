"""Where a recipe's relative paths point ("Your own teacher, end to end", item 7; the rule is
``kdflow.config.fields.PATH_RULE``): a recipe inside the project (recipes/, tests/) resolves them against the project
folder, whatever the current directory, so `make demo` writes runs/demo in the checkout and the shipped recipes' keys
stay as they were; a recipe copied outside it writes its run folder beside itself, nothing into the checkout's runs/,
and reads a template or data file from its own folder when it has one there, else from the project."""

import shutil
from pathlib import Path

import pytest

from kdflow.config.fields import PATH_RULE, ROOT
from kdflow.config.loading import RecipeError
from kdflow.config.recipe import load_recipe
from kdflow.config.sweep import load_sweep
from tasks.data import DATA, make_data
from tasks.generate import GENERATE


def copy_of(recipe: str, folder: Path, **replace: str) -> Path:
    text = (ROOT / recipe).read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = folder / "copied" / Path(recipe).name
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The current directory is neither the project nor the recipe's folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path


def test_shipped_recipes_resolve_against_the_project_from_any_directory(elsewhere):
    demo = load_recipe(ROOT / "recipes" / "demo.yaml")
    assert demo.run.root == "runs" and demo.run_dir == ROOT / "runs" / "demo"  # `make demo` writes runs/demo
    assert demo.prompts.cot == "prompts/cot.jinja"  # as written: the sections (and the keys) are unchanged
    assert load_recipe(ROOT / "tests" / "mini.yaml").run_dir == ROOT / "runs" / "mini"
    sweep = load_sweep(ROOT / "recipes" / "sweeps" / "transfer-size.yaml")
    assert sweep.recipe == "recipes/demo.yaml" and sweep.recipe_path() == ROOT / "recipes" / "demo.yaml"


def test_a_copied_recipe_writes_beside_itself_and_nothing_into_the_checkout(elsewhere):
    name = "kdflow-test-copied-recipe"
    path = copy_of("tests/mini.yaml", elsewhere, **{"name: mini": f"name: {name}"})
    r = load_recipe(path)
    assert r.run_dir == path.parent / "runs" / name
    shipped = load_recipe(ROOT / "tests" / "mini.yaml")
    # It reads the project's prompts/cot.jinja (it has none of its own): the same stage keys as the shipped recipe.
    assert r.prompts.cot == "prompts/cot.jinja" and r.prompts.cot_text() == shipped.prompts.cot_text()
    assert DATA.key(section=r.data) == DATA.key(section=shipped.data)
    ref = make_data.fn(r.run_dir, r.data)
    assert Path(ref.path).is_relative_to(path.parent / "runs" / name / "data")
    assert not (ROOT / "runs" / name).exists()


def test_a_template_and_data_beside_a_copied_recipe_are_read_from_there(elsewhere):
    path = copy_of("recipes/gsm8k-qwen7b-to-0.5b.yaml", elsewhere)
    (path.parent / "prompts").mkdir()
    (path.parent / "prompts" / "cot_gsm8k.jinja").write_text("Mine: {{ question }}")
    (path.parent / "data" / "gsm8k").mkdir(parents=True)
    r = load_recipe(path)
    assert r.prompts.cot == str(path.parent / "prompts" / "cot_gsm8k.jinja")
    assert r.prompts.cot_text() == "Mine: {{ question }}"
    assert r.data.path == str(path.parent / "data" / "gsm8k")  # data/gsm8k, beside the copy
    assert r.run_dir == path.parent / "runs" / r.run.name
    assert GENERATE.key(section=r.generation, template="t", teacher=None, data=None)  # keyable


def test_a_missing_template_says_where_it_was_looked_for(elsewhere):
    path = copy_of("recipes/demo.yaml", elsewhere, **{"cot: prompts/cot.jinja": "cot: prompts/mine.jinja"})
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert f"no template at {path.parent / 'prompts' / 'mine.jinja'} ({PATH_RULE})" in str(e.value)


def test_a_sweep_copied_with_its_recipe_uses_that_copy(elsewhere):
    recipe = copy_of("recipes/demo.yaml", elsewhere)
    sweep = recipe.parent / "sweep.yaml"
    sweep.write_text(
        (ROOT / "recipes" / "sweeps" / "transfer-size.yaml")
        .read_text()
        .replace("recipe: recipes/demo.yaml", "recipe: demo.yaml")
    )
    assert load_sweep(sweep).recipe_path() == recipe
    shutil.rmtree(recipe.parent / "runs", ignore_errors=True)
    recipe.unlink()
    with pytest.raises(RecipeError, match=f"recipe: no file {recipe} "):
        load_sweep(sweep)
