"""Bad inputs found by the third audit (issue 23; docs/results/audit.md, "The third audit"): routed teachers' recipes
and logit datasets, each made here and answered with a clear error naming the field or the file."""

import pytest

from kdflow.config.loading import RecipeError
from kdflow.config.recipe import load_recipe
from tests.conftest import MINI_RECIPE, fake_weights
from tests.teacher.test_teachers import two_teachers


def recipe(tmp_path, old: str, new: str):
    text = two_teachers()
    assert old in text
    path = tmp_path / "routed.yaml"
    path.write_text(text.replace(old, new, 1).replace("root: runs", f"root: {tmp_path / 'runs'}"))
    return path


def test_two_teachers_of_one_name_are_refused_as_such_not_as_an_unknown_default(tmp_path):
    # Before: "routing.default 'sub' is not a teacher's name; name one of ['add']", where 'sub' was never written.
    with pytest.raises(RecipeError, match=r"routed.yaml:\d+: teachers: teachers.name must be unique; rename \['add'\]"):
        load_recipe(recipe(tmp_path, "- name: sub", "- name: add"))


def test_a_routing_default_that_is_not_one_name_is_refused_at_its_line(tmp_path):
    # Before: a bare "TypeError: unhashable type: 'list'", naming neither the file nor the field.
    with pytest.raises(
        RecipeError, match=r"routed.yaml:\d+: routing.default: .*name one teacher, one of \['add', 'sub'\]"
    ):
        load_recipe(recipe(tmp_path, "default: sub", "default: [sub, add]"))


@pytest.mark.parametrize("count", ['""', '"-*"', '"(x)?"'])
def test_a_routing_count_that_matches_the_empty_string_is_refused(tmp_path, count):
    # Before: accepted; re.findall counts an empty match at every position, so '' keyed each row by its length + 1
    # and no route ever matched: every row went to the default teacher without a word.
    with pytest.raises(RecipeError, match=r"routing.count: count .* matches the empty string"):
        load_recipe(recipe(tmp_path, 'count: "-"\n  routes', f"count: {count}\n  routes"))
    with pytest.raises(RecipeError, match=r"teachers.0.train_on.count: count .* matches the empty string"):
        load_recipe(
            recipe(tmp_path, 'train_on: {column: question, count: "-"', f"train_on: {{column: question, count: {count}")
        )


MINI_TEACHER = (
    "  - name: sub\n    architecture: {hidden: 64, layers: 1, heads: 2, intermediate: 128}\n    vocab_size: 48\n"
)


@pytest.mark.parametrize("model", ["/nonexistent/teacher", "./models/missing", "../missing/teacher"])
def test_a_teacher_folder_that_is_not_there_and_no_hub_id_is_refused_at_load(tmp_path, model):
    # Before: accepted; the teacher stage "completed", recording it, and the generate stage then failed with
    # transformers' "Repo id must be in the form 'repo_name' or 'namespace/repo_name'".
    path = recipe(tmp_path, MINI_TEACHER, f"  - name: sub\n    model: {model}\n")
    with pytest.raises(RecipeError, match=r"routed.yaml:\d+: teachers.1: .*no such folder, and not a hub id"):
        load_recipe(path)


def test_a_hub_id_teacher_is_still_taken_as_one(tmp_path):
    r = load_recipe(recipe(tmp_path, MINI_TEACHER, "  - name: sub\n    model: HuggingFaceTB/SmolLM2-135M-Instruct\n"))
    assert r.teachers[1].model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_teacher_folder_whose_config_is_not_json_is_named_with_the_file(tmp_path):
    # Before: "(top level): Expecting property name enclosed in double quotes: line 2 column 1", naming no file.
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", \n')
    (folder / "tokenizer.json").write_text("{}")  # present, so the config is what is wrong with the folder
    text = MINI_RECIPE.read_text().replace("root: runs", f"root: {tmp_path / 'runs'}")
    start, end = text.index("teacher:\n"), text.index("generation:")
    text = text[:start] + f"teacher:\n  model: {folder}\n\nlogit_cache: {{k: 4}}\n\n" + text[end:]
    (tmp_path / "mini.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"teacher/config.json is not valid JSON .*the model folder is damaged"):
        load_recipe(tmp_path / "mini.yaml")


def test_a_routing_key_written_as_a_yaml_number_says_to_quote_it(tmp_path):
    # Before: "Input should be a valid string" at its line, without saying why a 0 is no string.
    with pytest.raises(
        RecipeError,
        match=r"routed.yaml:\d+: routing.routes.0.\[key\]: .*YAML reads an unquoted 0 "
        r"as a number: quote it \('0'\)",
    ):
        load_recipe(recipe(tmp_path, 'routes: {"0": add}', "routes: {0: add}"))


def test_a_teacher_folder_without_tokenizer_files_is_refused_at_load(tmp_path):
    # Before: refused as "tokenizes otherwise" than the other teacher, with the hash of no files.
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(fake_weights())
    path = recipe(tmp_path, MINI_TEACHER, f"  - name: sub\n    model: {folder}\n")
    with pytest.raises(
        RecipeError,
        match=r"routed.yaml:\d+: teachers.1: .*teacher has no tokenizer files "
        r"\(tokenizer.json, .*tokenizer.save_pretrained",
    ):
        load_recipe(path)


def test_a_routing_key_written_as_a_yaml_null_says_to_quote_it(tmp_path):
    # The fourth audit: "Input should be a valid string" without the hint the other scalars get.
    with pytest.raises(
        RecipeError, match=r"routing.routes.None.\[key\]: .*YAML reads an unquoted ~ or null as nothing"
    ):
        load_recipe(recipe(tmp_path, 'routes: {"0": add}', "routes: {~: add}"))


def test_a_teacher_no_row_goes_to_is_refused(tmp_path):
    # The fourth audit: `routes: {}` loaded; every row went to the default, the other teacher trained for nothing.
    with pytest.raises(RecipeError, match=r"routed.yaml:\d+: routing.routes: no row goes to \['add'\]"):
        load_recipe(recipe(tmp_path, 'routes: {"0": add}', "routes: {}"))


@pytest.mark.parametrize("key", ["zero", "-1", "00"])
def test_a_route_key_no_count_can_equal_is_refused(tmp_path, key):
    # The fourth audit: with count, keys like these loaded and no row ever took their route.
    with pytest.raises(RecipeError, match=rf"routing.routes.{key}: with count, .*no row has the key '{key}'"):
        load_recipe(recipe(tmp_path, 'routes: {"0": add}', f'routes: {{"0": add, "{key}": sub}}'))


@pytest.mark.parametrize("seeds", ["[1, 1]", "[-1]", "[1180591620717411303424]"])
def test_seeds_a_run_cannot_train_with_are_refused(tmp_path, seeds):
    # The fourth audit: loaded; [1, 1] listed baseline@1 twice, and numpy takes no seed outside 0 to 2**32 - 1.
    text = MINI_RECIPE.read_text().replace("root: runs", f"root: {tmp_path / 'runs'}")
    text = text.replace("  name: mini\n", f"  name: mini\n  seeds: {seeds}\n", 1)
    (tmp_path / "mini.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"mini.yaml:\d+: run.seeds: seed .* (is given twice|is outside 0 to)"):
        load_recipe(tmp_path / "mini.yaml")


def test_seeds_from_the_command_line_are_checked_too():
    with pytest.raises(ValueError, match=r"--seeds: seed 1 is given twice; list each seed once"):
        load_recipe(MINI_RECIPE).with_seeds([1, 1])
    assert load_recipe(MINI_RECIPE).with_seeds([2, 0]).run.seeds == [2, 0]


def test_a_students_own_seed_beside_run_seeds_is_refused(tmp_path):
    # The tenth audit (#31): run.seeds trained `kd1@0` and `kd1@1` from a student that set `seed: 1`, without a word.
    text = MINI_RECIPE.read_text().replace("root: runs", f"root: {tmp_path / 'runs'}")
    text = text.replace("  - name: seq-kd\n", "  - name: seq-kd\n    seed: 1\n", 1)
    (tmp_path / "mini.yaml").write_text(text)
    assert load_recipe(tmp_path / "mini.yaml").students[1].seed == 1  # alone, a student's own seed is its seed
    with pytest.raises(ValueError, match=r"--seeds: student 'seq-kd' sets its own seed, which .* would replace"):
        load_recipe(tmp_path / "mini.yaml").with_seeds([0, 1])
    (tmp_path / "mini.yaml").write_text(text.replace("  name: mini\n", "  name: mini\n  seeds: [0, 1]\n", 1))
    with pytest.raises(RecipeError, match=r"mini.yaml:\d+: students.1.seed: student 'seq-kd' sets its own seed"):
        load_recipe(tmp_path / "mini.yaml")
