"""Bad inputs found by the repeat audit (issue 23; docs/results/audit.md), each made here and answered with a clear
error or handled."""

import pytest

from conftest import MINI_RECIPE
from kdflow.config import loading
from kdflow.config.loading import RecipeError, load_yaml
from kdflow.config.recipe import load_recipe, parse_recipe


def nested_aliases(levels: int) -> str:
    """``levels`` lists of ten aliases of the list before: 10^levels leaves if every alias were walked anew."""
    return "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, levels + 1)
    )


def test_nested_aliases_are_walked_once_each_and_a_repeated_key_under_an_anchor_is_still_found(monkeypatch):
    calls = []
    walk = loading._duplicate_key

    def counted(node, *args):
        calls.append(node)
        return walk(node, *args)

    monkeypatch.setattr(loading, "_duplicate_key", counted)
    assert set(load_yaml(nested_aliases(4), "bomb.yaml")) == {f"a{i}" for i in range(5)}
    assert len(calls) < 100  # one per distinct node (~30); walking each alias anew made 11,116 calls
    with pytest.raises(RecipeError, match=r"bomb.yaml:3: base.lr: set twice \(first at line 2\)"):
        load_yaml("base: &b\n  lr: 1\n  lr: 2\nother: *b\n", "bomb.yaml")


def test_a_recipe_of_nested_aliases_is_refused_naming_the_unknown_fields(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(MINI_RECIPE.read_text() + nested_aliases(8))  # walked anew: > 100 s
    with pytest.raises(RecipeError, match=r"bomb.yaml:\d+: a8: unknown field"):
        load_recipe(recipe)


def test_an_unquoted_yes_as_a_name_says_yaml_read_it_as_a_boolean():
    text = MINI_RECIPE.read_text().replace("name: seq-kd", "name: yes")
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "mini.yaml")
    assert "students.1.name: Input should be a valid string; YAML reads an unquoted yes/no" in str(e.value)
    assert "as the boolean True: quote the value" in str(e.value)


def test_a_folder_given_as_the_recipe_is_named_a_folder(tmp_path):
    with pytest.raises(RecipeError, match="a folder, not a recipe file: name the YAML file in it"):
        load_recipe(tmp_path)
