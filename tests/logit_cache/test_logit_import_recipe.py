"""``logit_cache: {import: ...}`` in a recipe (kdflow/config/logit_import.py): what cannot work is refused at load,
naming the field and the fix; the import stage (tasks/import_logits.py) is keyed by the files' content, the settings and
the students' tokenizer, not by where the files lie. The import inside a real distill run:
tests/flows/test_logit_import_flow.py."""

import re
import shutil

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from kdflow.config.loading import RecipeError
from kdflow.config.logit_cache import ValueEncoding
from kdflow.config.recipe import parse_recipe
from kdflow.logit_cache import axolotl
from kdflow.logit_cache.interop import export_cache
from kdflow.logit_cache.reader import LogitCache
from kdflow.training.tiny_models import train_tokenizer
from tests.conftest import MINI_RECIPE, build_tiny_teacher
from tests.logit_cache.test_logit_cache import rows_of, write_cache
from tests.logit_cache.test_logit_interop import foreign, topk_rows

K = 4
OFFLINE = {
    "name": "logit-kd",
    "data": "teacher",
    "kd": {"method": "offline"},
    "architecture": {"hidden": 32, "layers": 1, "heads": 1, "intermediate": 64},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny teacher folder; its top-4 on 12 rows exported as axolotl (with kdflow's fingerprint) and DistillKit; and
    the axolotl file as another tool writes it (no fingerprint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("import-recipe")
    teacher = build_tiny_teacher(root / "teacher")
    tokenizer, model = AutoTokenizer.from_pretrained(teacher), AutoModelForCausalLM.from_pretrained(teacher).eval()
    torch.manual_seed(0)
    write_cache(root / "cache", tokenizer, model, rows_of(tokenizer, 12), K, ValueEncoding.u8, shard_rows=8)
    export_cache(root / "cache", root / "axolotl", "axolotl")
    export_cache(root / "cache", root / "distillkit", "distillkit")
    (root / "foreign").mkdir()
    cache = LogitCache.open(root / "cache")
    pq.write_table(foreign(axolotl.table_of(topk_rows(cache), K)), root / "foreign" / "data_0.parquet")
    return root


def recipe(tmp_path, files, **changes) -> str:
    raw = yaml.safe_load(MINI_RECIPE.read_text())
    raw["run"]["root"] = str(tmp_path / "runs")
    raw["teacher"] = {"model": str(files / "teacher")}
    raw["logit_cache"] = {"import": {"path": str(files / "axolotl"), "format": "axolotl"}}
    raw["students"] = [raw["students"][0], OFFLINE]
    for key, value in changes.items():
        raw[key] = value
    return yaml.safe_dump(raw, sort_keys=False)


def refused(text: str, tmp_path) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, str(tmp_path / "r.yaml"), folder=tmp_path)
    return str(e.value)


def test_an_import_recipe_loads_and_leaves_the_capture_out(tmp_path, files):
    r = parse_recipe(recipe(tmp_path, files), folder=tmp_path)
    assert r.logit_cache.imported and r.logit_cache.import_.format.value == "axolotl"
    assert [f.name for f in r.logit_cache.import_.files()] == ["data_0.parquet", "data_1.parquet"]
    dk = {"import": {"path": str(files / "distillkit"), "format": "distillkit"}, "shard_rows": 4}
    assert parse_recipe(recipe(tmp_path, files, logit_cache=dk), folder=tmp_path).logit_cache.shard_rows == 4


@pytest.mark.parametrize(
    "section, field, message",
    [
        ({"path": "no/such/folder", "format": "axolotl"}, "logit_cache.import.path", "no such file or folder"),
        ({"path": "EMPTY", "format": "axolotl"}, "logit_cache.import.path", "no .parquet files in it"),
        ({"path": "AXOLOTL", "format": "torchtune"}, "logit_cache.import.format", "'distillkit' or 'axolotl'"),
        ({"path": "FOREIGN", "format": "distillkit"}, "logit_cache.import.config", "no DistillKit compression config"),
        ({"path": "AXOLOTL", "format": "axolotl", "config": "x.yaml"}, "logit_cache.import.config", "remove it"),
        ({"path": "AXOLOTL", "format": "axolotl", "value_encoding": "u4"}, "logit_cache.import.value_encoding", "u8"),
        ({"format": "axolotl"}, "logit_cache.import.path", "required field is missing"),
    ],
    ids=["missing", "empty-folder", "format", "no-config", "axolotl-config", "encoding", "no-path"],
)
def test_a_bad_import_section_is_refused_naming_the_field(tmp_path, files, section, field, message):
    (tmp_path / "empty").mkdir()
    where = {"EMPTY": tmp_path / "empty", "AXOLOTL": files / "axolotl", "FOREIGN": files / "foreign"}
    if "path" in section:
        section = {**section, "path": str(where.get(section["path"], section["path"]))}
    error = refused(recipe(tmp_path, files, logit_cache={"import": section}), tmp_path)
    assert f"{field}: " in error and message in error, error


@pytest.mark.parametrize(
    "damage, message",
    [
        ("not-parquet", r"data_0.parquet: not a whole parquet file .*export it again"),
        ("truncated", r"data_0.parquet: not a whole parquet file .*truncated"),
        ("no-rows", r"data_0.parquet: holds no rows; export the logit dataset again, or remove the file"),
        (
            "other-format",
            r"data_0.parquet: not a distillkit logit dataset: its columns are .*target_logprobs.*"
            r"set logit_cache.import.format to the format that wrote it",
        ),
        ("vocab", r"logit_cache.import.vocab_size: .*less than or equal to 1048576"),
    ],
)
def test_files_the_import_stage_would_refuse_are_refused_at_load(tmp_path, files, damage, message):
    """The fourth audit: each loaded, to be refused by the import stage after the teacher stage had run."""
    folder, section = tmp_path / "files", {"format": "axolotl"}
    shutil.copytree(files / "axolotl", folder)
    first = folder / "data_0.parquet"
    if damage == "not-parquet":
        first.write_text("input_ids,target_token_ids\n1,2\n")
    elif damage == "truncated":
        first.write_bytes(first.read_bytes()[:-100])
    elif damage == "no-rows":
        pq.write_table(pq.read_table(first).slice(0, 0), first)
    elif damage == "other-format":
        section = {"format": "distillkit", "config": str(files / "distillkit" / "compression_config.yaml")}
    else:
        section["vocab_size"] = 10**12
    error = refused(recipe(tmp_path, files, logit_cache={"import": {"path": str(folder), **section}}), tmp_path)
    assert re.search(message, error), error


@pytest.mark.parametrize(
    "extra, field, fix",
    [
        ({"k": 20}, "logit_cache.k", "remove logit_cache.k, or remove logit_cache.import"),
        ({"source": "vllm"}, "logit_cache.source", "an imported cache is not captured"),
        ({"ensemble": [{"model": "x"}]}, "logit_cache.ensemble", "remove logit_cache.ensemble"),
        ({"value_encoding": "fp16"}, "logit_cache.value_encoding", "set logit_cache.import.value_encoding instead"),
    ],
)
def test_capture_settings_beside_an_import_are_refused(tmp_path, files, extra, field, fix):
    section = {"import": {"path": str(files / "axolotl"), "format": "axolotl"}, **extra}
    error = refused(recipe(tmp_path, files, logit_cache=section), tmp_path)
    assert f"{field}: " in error and fix in error, error


def test_students_an_import_cannot_serve_are_refused(tmp_path, files):
    base = yaml.safe_load(recipe(tmp_path, files))
    on_policy = {**OFFLINE, "name": "op", "kd": {"method": "on_policy", "lmbda": 0.5}}
    error = refused(recipe(tmp_path, files, students=[base["students"][0], OFFLINE, on_policy]), tmp_path)
    assert "students.2.kd.lmbda: " in error and "set lmbda: 1, or use kd method offline" in error, error
    error = refused(recipe(tmp_path, files, students=[base["students"][0]]), tmp_path)
    assert "logit_cache.import: no student reads the imported cache" in error, error


def test_a_student_of_another_tokenizer_than_the_exported_caches_is_refused(tmp_path, files):
    other = tmp_path / "other"
    shutil.copytree(files / "teacher", other)
    train_tokenizer(["Solve 1*2 #### 2"] * 20, vocab_size=40).save_pretrained(other)  # another vocabulary
    student = {**{k: v for k, v in OFFLINE.items() if k != "architecture"}, "model": str(other)}
    error = refused(recipe(tmp_path, files, students=[student]), tmp_path)
    assert "students.0: student 'logit-kd': its model" in error and "is not the one" in error, error
    error = refused(recipe(tmp_path, files, teacher={"model": str(other)}), tmp_path)  # an architecture student
    assert "students.1: student 'logit-kd': the teacher's" in error and "tokenizer is not the one" in error, error


def test_a_tokenizer_trained_here_cannot_read_another_tools_file(tmp_path, files):
    raw = yaml.safe_load(MINI_RECIPE.read_text())
    section = {"import": {"path": str(files / "foreign"), "format": "axolotl"}}
    error = refused(recipe(tmp_path, files, teacher=raw["teacher"], logit_cache=section), tmp_path)
    assert "students.1: student 'logit-kd' would read" in error and "set teacher.model" in error, error


def test_the_import_is_keyed_by_content_settings_and_tokenizer_not_by_path(tmp_path, files):
    from tasks.import_logits import IMPORT

    def key(path, tokenizer=files / "teacher", **settings):
        section = {"import": {"path": str(path), "format": "axolotl", **settings}}
        r = parse_recipe(recipe(tmp_path, files, logit_cache=section), folder=tmp_path)
        return IMPORT.key(section=r.logit_cache, tokenizer=str(tokenizer))

    first = key(files / "axolotl")
    moved = shutil.copytree(files / "axolotl", tmp_path / "elsewhere")
    assert key(moved) == first  # the same files elsewhere: the same import
    assert key(moved, value_encoding="fp16") != first
    other = shutil.copytree(files / "teacher", tmp_path / "other-template")
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert key(moved, tokenizer=other) != first  # another chat template: another cache
    data = moved / "data_1.parquet"
    pq.write_table(pq.read_table(data).slice(0, 1), data)  # a file changed in place
    assert key(moved) != first


def test_an_on_policy_student_with_lmbda_1_may_sit_beside_an_import(tmp_path, files):
    on_policy = {**OFFLINE, "name": "op", "kd": {"method": "on_policy", "lmbda": 1.0}}
    base = yaml.safe_load(recipe(tmp_path, files))
    r = parse_recipe(recipe(tmp_path, files, students=[*base["students"], on_policy]), folder=tmp_path)
    assert [s.name for s in r.students] == ["baseline", "logit-kd", "op"]


def test_routed_teachers_are_refused_with_an_import(tmp_path, files):
    raw = yaml.safe_load(recipe(tmp_path, files))
    raw["teachers"] = [{"name": "a", "model": str(files / "teacher")}, {"name": "b", "model": str(files / "teacher")}]
    raw["routing"] = {"column": "split", "routes": {"train": "a"}, "default": "b"}
    del raw["teacher"]
    error = refused(yaml.safe_dump(raw), tmp_path)
    assert "logit_cache.import: " in error and "remove teachers/routing" in error, error


def without_teacher(tmp_path, files, students=None, **changes) -> str:
    """The import recipe with ``teacher: {imported: true}``: both students fine-tune the file's model (the teacher
    folder the file was made with) instead of an architecture on the teacher's tokenizer."""
    base = yaml.safe_load(recipe(tmp_path, files))
    own = [
        {**{k: v for k, v in s.items() if k != "architecture"}, "model": str(files / "teacher")}
        for s in base["students"]
    ]
    return recipe(tmp_path, files, students=students or own, **{"teacher": {"imported": True}, **changes})


def test_a_run_with_only_the_teachers_logits_loads(tmp_path, files):
    r = parse_recipe(without_teacher(tmp_path, files), folder=tmp_path)
    assert r.teacher.imported and r.teacher.model is None and r.teacher.vocab() is None


@pytest.mark.parametrize(
    "case, field, fix",
    [
        ("no-import", "teacher.imported: ", "add logit_cache: {import: {path: ..."),
        ("and-model", "teacher: ", "remove teacher.model (or set imported: false"),
        ("architecture", "students.1: ", "give it model: (a pretrained model with the tokenizer"),
        ("pruned", "students.1: ", "there is no teacher to prune"),
        ("seq-kd", "students.0.data: ", "no teacher is here to answer: give it kd: {method: offline}"),
        ("online", "students.1.kd: ", "kd method online runs the teacher live"),
        ("judge", "evaluation.judge: ", "remove evaluation.judge"),
    ],
)
def test_what_needs_the_teacher_itself_is_refused_when_only_its_logits_are_here(tmp_path, files, case, field, fix):
    base = yaml.safe_load(without_teacher(tmp_path, files))
    students, changes = base["students"], {}
    if case == "and-model":
        changes["teacher"] = {"imported": True, "model": str(files / "teacher")}
    elif case == "architecture":
        students = [students[0], OFFLINE]
    elif case == "pruned":
        pruned = {k: v for k, v in students[1].items() if k != "model"}
        students = [students[0], {**pruned, "init": {"from": "teacher", "layers": 1}}]
    elif case == "seq-kd":
        students = [{**students[0], "data": "teacher"}, students[1]]
    elif case == "online":
        students = [students[0], {**students[1], "kd": {"method": "online", "divergence": "jsd"}}]
    else:
        changes["evaluation"] = {**base["evaluation"], "judge": {"base_url": "http://x/v1", "model": "m"}}
    text = without_teacher(tmp_path, files, students=students, **changes)
    if case == "no-import":  # no logit cache at all, and the gold student alone
        raw = yaml.safe_load(text)
        del raw["logit_cache"]
        raw["students"] = [raw["students"][0]]
        text = yaml.safe_dump(raw, sort_keys=False)
    error = refused(text, tmp_path)
    assert field in error and fix in error, error


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"teacher": "some/other-teacher"}, r"logit_cache.import.teacher: .*records its teachers .*would contradict"),
        ({"vocab_size": 47}, r"logit_cache.import.vocab_size: .*remove logit_cache.import.vocab_size 47 .*set it to"),
    ],
)
def test_settings_a_kdflow_export_contradicts_are_refused_at_load(tmp_path, files, setting, message):
    # The fifth audit: each loaded, to be refused by the import stage after the teacher stage had run.
    section = {"import": {"path": str(files / "axolotl"), "format": "axolotl", **setting}}
    assert re.search(message, refused(recipe(tmp_path, files, logit_cache=section), tmp_path))
