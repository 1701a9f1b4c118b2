"""How the flows are wired, without running them: what a stage flow rerun alone takes from the run folder, and
the `kdflow` command (whose --help starts nothing)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows import STARTUP_TIMEOUT_ENV
from kdflow.config.kd import OfflineKD
from kdflow.config.recipe import load_recipe
from kdflow.store import run_folder

ROOT = Path(__file__).resolve().parents[2]
ONLINE_STUDENT = """  - name: gkd
    data: teacher
    architecture: {hidden: 32, layers: 1, heads: 1, intermediate: 64}
    training: {max_steps: 10, per_device_train_batch_size: 16, learning_rate: 3.0e-3, logging_steps: 5}
    kd: {method: online, divergence: jsd}
"""


def finished(run_dir: Path, stage: str, key: str | None = None):
    """A finished output of ``stage`` under ``key`` (the recipe's, as a stage rerun alone looks it up)."""
    from kdflow.store.outputs import building, existing_output, finish

    key = key or f"{stage}-fixture".ljust(64, "0")
    with building(run_dir, stage, key) as tmp:
        (tmp / "x").write_text(f"{stage} {key}")  # outputs of other keys differ in content, as real ones would
        finish(tmp, stage, key, inputs={})
    return existing_output(run_dir, stage, key)


def finished_upstream(r) -> None:
    """The data, a teacher, its answers and their curation, each under the key the recipe gives it."""
    from tasks.curate import CURATE
    from tasks.data import DATA
    from tasks.generate import GENERATE
    from tasks.teacher import TEACHER

    cot = r.prompts.cot_text()
    data = finished(r.run_dir, "data", DATA.key(section=r.data))
    teacher = finished(r.run_dir, "teacher", TEACHER.key(section=r.teacher, data=data, template=cot))
    answers = finished(
        r.run_dir, "generate", GENERATE.key(section=r.generation, template=cot, teacher=teacher, data=data)
    )
    finished(r.run_dir, "curate", CURATE.key(section=r.filters, source=r.data.source, answers=answers, teacher=teacher))


def test_students_alone_need_no_logit_cache_for_online_kd(mini_recipe):
    """An online-KD student runs the teacher live: retraining it on a run without a logit cache must not demand one
    (it did: any `kd:` section asked for the logit-cache stage's output)."""
    from flows.train_students import inputs_from_run

    text = mini_recipe.read_text().replace("\nevaluation:", ONLINE_STUDENT + "\nevaluation:", 1)
    mini_recipe.write_text(text)
    r = load_recipe(mini_recipe)
    finished_upstream(r)
    data, teacher, curated, logits = inputs_from_run(r.run_dir, r, r.students)
    assert logits is None and curated is not None and {data.stage, teacher.stage} == {"data", "teacher"}

    # each method is its own model (kdflow/config/kd.py): the same student with an offline section
    offline = [s.model_copy(update={"kd": OfflineKD()}) if s.kd else s for s in r.students]
    with pytest.raises(run_folder.MissingStage, match="logit-cache"):  # an offline student does need it
        inputs_from_run(r.run_dir, r, offline)


def kdflow_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )  # only stops a hang (see below)


def test_kdflow_help_lists_the_stages_and_starts_nothing():
    done = kdflow_command("--help")
    assert done.returncode == 0
    for command in ("distill", "teacher", "generate", "curate", "logit-cache", "students", "evaluate", "compare"):
        assert command in done.stdout
    probe = (
        "import sys, flows.cli; flows.cli.parser(); print(sorted(m for m in ('prefect', 'torch') if m in sys.modules))"
    )
    assert (
        subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True).stdout.strip() == "[]"
    )


@pytest.mark.parametrize("module", ["flows.distill", "flows.train_teacher", "flows.train_students", "flows.generate"])
def test_a_flow_module_run_as_a_script_answers_help_without_starting_work(module, tmp_path):
    # The timeout only stops a hang: a flow module imports Prefect and torch before it reads its arguments, which
    # took 60 s on a loaded 2-core machine (120 s was once too little).
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "PREFECT_HOME": str(tmp_path)},
    )
    assert done.returncode == 0 and "usage: kdflow" in done.stdout
    assert "Starting temporary server" not in done.stdout + done.stderr and "RecipeError" not in done.stderr


def test_kdflow_distill_takes_seeds_and_students_a_run_dir():
    from flows.cli import parser

    args = parser().parse_args(["distill", "recipes/demo.yaml", "--seeds", "0", "1", "2"])
    assert args.seeds == [0, 1, 2]
    assert parser().parse_args(["students", "recipes/demo.yaml", "--run-dir", "runs/x"]).run_dir == "runs/x"
    with pytest.raises(SystemExit):
        parser().parse_args(["teacher", "recipes/demo.yaml", "--run-dir", "runs/x"])  # the teacher has no run dir


def test_kdflow_compare_compares_reports(tmp_path):
    import json

    for name, acc in (("a", 0.5), ("b", 0.75)):
        (tmp_path / name).mkdir()
        report = {
            "run": name,
            "teacher": {"accuracy": 0.9, "params": 10},
            "students": {"s": {"accuracy": acc, "params": 1}},
        }
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    done = kdflow_command("compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    assert "0.5" in done.stdout and "0.75" in done.stdout


def test_a_stage_rerun_alone_finds_a_gguf_teachers_import(tmp_path):
    """A GGUF teacher is the import-gguf stage's output, not a teacher stage's: `kdflow generate|curate|students|
    evaluate` on such a run found no teacher (they looked for the teacher stage only)."""
    from flows.lookups import run_teacher
    from kdflow.models.smollm2 import link
    from kdflow.store.outputs import building, finish
    from tasks.models import IMPORT_GGUF

    link(ROOT)  # what `make smollm2` links: the recipe names models/SmolLM2-135M-Instruct.Q4_1.gguf
    r = load_recipe(ROOT / "recipes" / "smollm2.yaml")
    run = tmp_path / "runs" / "smollm2"
    with pytest.raises(
        run_folder.MissingStage,
        match=r"no finished import of the teacher models/SmolLM2-135M-"
        r"Instruct.Q4_1.gguf of this recipe's settings in .*: run `kdflow teacher <recipe>`",
    ):
        run_teacher(run, r)
    finished(run, "teacher")  # a teacher stage's output is not this teacher
    finished(run, "import-gguf")  # nor another file's import
    with pytest.raises(run_folder.MissingStage):
        run_teacher(run, r)
    key = IMPORT_GGUF.key(gguf=r.teacher.model, dtype=r.teacher.dtype)
    with building(run, "import-gguf", key) as tmp:
        finish(tmp, "import-gguf", key, inputs={})
    assert run_teacher(run, r).key == key
    mini = load_recipe(ROOT / "tests" / "mini.yaml")
    with pytest.raises(run_folder.MissingStage, match="no finished 'data' output of this recipe's settings"):
        run_teacher(run, mini)  # a trained teacher is keyed by the recipe's data, which is not there


def test_a_flow_gives_prefects_temporary_server_minutes_to_start_unless_told_otherwise():
    """Prefect's 20 s were too short on a loaded 2-core machine (a flow ended in Prefect's traceback before any
    stage); flows/__init__.py sets a longer default before Prefect reads its settings, and a value set wins."""
    probe = (
        "import flows.distill; from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as S; "
        "print(S.value())"
    )
    env = {k: v for k, v in os.environ.items() if k != STARTUP_TIMEOUT_ENV}
    for extra, expected in (({}, "600"), ({STARTUP_TIMEOUT_ENV: "45"}, "45")):
        done = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == expected


def test_a_temporary_server_that_never_answers_ends_the_command_with_the_fix(mini_recipe, tmp_path):
    """A start-up allowance of 0 s makes Prefect's real timeout at once, on any machine: the command says what to
    set, prints no traceback and writes nothing."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({STARTUP_TIMEOUT_ENV: "0", "PREFECT_HOME": str(tmp_path / "prefect")})
    done = subprocess.run(
        [sys.executable, "-m", "flows.distill", str(mini_recipe)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "temporary local server did not answer within 0 s" in done.stderr, done.stderr[-2000:]
    assert f"Set {STARTUP_TIMEOUT_ENV} higher" in done.stderr and "PREFECT_API_URL=" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_stage_rerun_alone_takes_the_recipes_outputs_not_the_newest(mini_recipe):
    """The eighth audit: `kdflow evaluate` after an edit and its revert reported the edited recipe's students and
    curation (the newest of each name) as this recipe's. Each is now the output the recipe's settings key; a student
    made only with other settings is missing, with the reason."""
    from flows.lookups import found_upstream, run_teacher, trained_students
    from tasks.students import STUDENTS

    r = load_recipe(mini_recipe)
    finished_upstream(r)
    edited = r.model_copy(update={"filters": r.filters.model_copy(update={"truncated": False})})
    finished_upstream(edited)  # the edited recipe's curation, made last
    teacher, cot = run_teacher(r.run_dir, r), r.prompts.cot_text()
    up = found_upstream(r.run_dir, r, teacher, curated=True, logits=False)
    assert up.curated.key == found_upstream(r.run_dir, r, teacher, curated=True, logits=False).curated.key
    assert up.curated.key != found_upstream(r.run_dir, edited, teacher, curated=True, logits=False).curated.key
    assert up.curated.key != run_folder.latest(r.run_dir, "curate").key  # the newest is the edited one

    def student_key(s, upstream) -> str:
        curated = upstream.curated if s.data.value == "teacher" else None
        return STUDENTS.key(section=s, template=cot, teacher=teacher, data=upstream.data, curated=curated)

    seq_kd = next(s for s in r.students if s.name == "seq-kd")
    changed = seq_kd.model_copy(update={"training": {**seq_kd.training, "learning_rate": 2.0e-3}})
    for s in r.students:
        finished(r.run_dir, "students", student_key(s, up))
    finished(r.run_dir, "students", student_key(changed, up))  # the edited seq-kd, made last
    # finish() records no name here; the lookup is by key alone, so the names do not matter to it.
    trained = trained_students(r.run_dir, r.students, cot, up)
    assert trained["seq-kd"].key == student_key(seq_kd, up) != student_key(changed, up)

    with pytest.raises(run_folder.MissingStage, match="of other settings: the recipe was edited since"):
        trained_students(r.run_dir, [changed.model_copy(update={"training": {"max_steps": 3}})], cot, up)

    # the recipe's own student damaged (its files no longer hash to its manifest's sha256): set aside, and the error
    # says so instead of blaming an edit that did not happen (the ninth audit's #31)
    (Path(trained["seq-kd"].path) / "x").write_text("damaged")
    with pytest.raises(run_folder.MissingStage, match=f"its output {trained['seq-kd'].key[:16]} was damaged"):
        trained_students(r.run_dir, [seq_kd], cot, up)


def test_a_stage_rerun_alone_takes_the_recipes_teacher_not_the_newest(mini_recipe):
    """The eighth audit left the teacher as the newest of its stage: after a teacher edit and its revert, a stage
    rerun alone read the edited recipe's teacher (and everything keyed by it). It is now the output the recipe's
    teacher section keys; a folder with only another teacher's says so."""
    from flows.lookups import found_upstream, run_teacher

    r = load_recipe(mini_recipe)
    finished_upstream(r)
    edited = r.model_copy(update={"teacher": r.teacher.model_copy(update={"training": {"max_steps": 7}})})
    finished_upstream(edited)  # the edited teacher, its answers and curation, made last
    teacher = run_teacher(r.run_dir, r)
    assert teacher.key != run_folder.latest(r.run_dir, "teacher").key == run_teacher(r.run_dir, edited).key
    up = found_upstream(r.run_dir, r, teacher, curated=True, logits=False)
    assert up.curated.key != found_upstream(r.run_dir, edited, run_teacher(r.run_dir, edited), True, False).curated.key
    assert up.curated.manifest()["inputs"] == {} and up.teacher == teacher  # (the fixture's) under r's own key

    other = r.model_copy(update={"teacher": r.teacher.model_copy(update={"training": {"max_steps": 9}})})
    with pytest.raises(run_folder.MissingStage, match=r"no finished 'teacher' .*\(2 of other settings: the recipe"):
        run_teacher(r.run_dir, other)


def routed_chain(r, cache: bool = True) -> dict:
    """Several teachers' outputs, each under the key ``upstream`` gives it: the data, each teacher, each one's answers
    to its rows, their join and curation, and (``cache``) each one's logit cache and their join."""
    from flows.chain import answering_teachers
    from flows.train_teacher import as_teacher
    from tasks.capture import CAPTURE, JOIN_CACHES
    from tasks.curate import CURATE
    from tasks.data import DATA
    from tasks.generate import GENERATE, JOIN_ANSWERS
    from tasks.teacher import TEACHER

    run, cot = r.run_dir, r.prompts.cot_text()
    data = finished(run, "data", DATA.key(section=r.data))
    teachers = {
        t.name: finished(
            run, "teacher", TEACHER.key(section=as_teacher(r, t).teacher, data=data, template=cot, train_on=t.train_on)
        )
        for t in r.teachers
    }
    answering = answering_teachers(r)
    parts = {
        t.name: finished(
            run,
            "generate",
            GENERATE.key(
                section=t.generation or r.generation,
                template=cot,
                teacher=teachers[t.name],
                data=data,
                routing=r.routing,
                routed_to=t.name,
            ),
        )
        for t in answering
    }
    answers = finished(run, "generate-routed", JOIN_ANSWERS.key(parts=parts))
    default = teachers[r.routing.default]
    kept = finished(
        run, "curate", CURATE.key(section=r.filters, source=r.data.source, answers=answers, teacher=default)
    )
    out = {"teachers": teachers, "curated": kept, "logits": None}
    if cache:
        caches = {
            t.name: finished(
                run,
                "logit-cache",
                CAPTURE.key(
                    section=r.logit_cache, template=cot, teacher=teachers[t.name], curated=kept, routed_to=t.name
                ),
            )
            for t in answering
        }
        out["logits"] = finished(run, "logit-cache-routed", JOIN_CACHES.key(parts=caches))
    return out


def test_a_stage_rerun_alone_takes_several_teachers_outputs_by_their_keys(mini_recipe):
    """With several teachers, a stage rerun alone took the newest curation and joined logit cache, and an on-policy
    student of them the newest of its name. Each is now the output ``upstream`` keys: the teachers, their joined
    answers' curation, their joined cache, and the student, whose key holds every teacher."""
    from flows.lookups import found_upstream, run_teacher, trained_students
    from tasks.students import STUDENTS
    from tests.teacher.test_teachers import two_teachers, with_logit_student

    on_policy = (
        "  - name: op\n    data: teacher\n    kd: {method: on_policy, k: 4, max_new_tokens: 8}\n"
        "    architecture: {hidden: 32, layers: 1, heads: 1, intermediate: 64}\n    training: {max_steps: 2}\n"
    )
    text = with_logit_student(two_teachers(mini_recipe.read_text()))
    mini_recipe.write_text(text.replace("students:\n", "students:\n" + on_policy, 1))
    r = load_recipe(mini_recipe)
    mine = routed_chain(r)
    edited = r.model_copy(update={"filters": r.filters.model_copy(update={"truncated": False})})
    theirs = routed_chain(edited)  # the edited recipe's curation and caches, made last
    assert theirs["curated"].key == run_folder.latest(r.run_dir, "curate").key != mine["curated"].key

    teacher = run_teacher(r.run_dir, r)
    assert teacher.key == mine["teachers"][r.routing.default].key
    up = found_upstream(r.run_dir, r, teacher, curated=True, logits=True)
    assert (up.curated.key, up.logits.key) == (mine["curated"].key, mine["logits"].key)
    assert {n: t.key for n, t in up.teachers.items()} == {n: t.key for n, t in mine["teachers"].items()}

    # an on-policy student of both teachers: found under its key (which holds every teacher), not the newest
    on_policy = next(s for s in r.students if s.name == "op")
    cot, routed = r.prompts.cot_text(), up.routed(r)

    def student_key(s, upstream, scorers) -> str:
        return STUDENTS.key(
            section=s,
            template=cot,
            teacher=upstream.teacher,
            data=upstream.data,
            curated=upstream.curated,
            routed=scorers,
        )

    finished(r.run_dir, "students", student_key(on_policy, up, routed))
    other = found_upstream(r.run_dir, edited, teacher, curated=True, logits=False)
    finished(r.run_dir, "students", student_key(on_policy, other, other.routed(edited)))  # made last
    found_ = trained_students(r.run_dir, [on_policy], cot, up, routed)
    assert found_["op"].key == student_key(on_policy, up, routed) != run_folder.latest(r.run_dir, "students").key


def test_the_sharded_stages_refuse_several_teachers_before_any_work(mini_recipe):
    """The ninth audit: `kdflow logit-cache-sharded` (and generate-sharded) on a recipe of two routed teachers ran
    the default teacher on every row, exit 0. They run one teacher, so they refuse, naming the teachers and the fix."""
    from flows.capture_sharded import capture_sharded
    from flows.generate_sharded import generate_sharded
    from tests.teacher.test_teachers import two_teachers, with_logit_student

    mini_recipe.write_text(with_logit_student(two_teachers(mini_recipe.read_text())))
    for flow, command in ((capture_sharded, "logit-cache-sharded"), (generate_sharded, "generate-sharded")):
        with pytest.raises(ValueError, match=rf"`kdflow {command}` runs one teacher, .* 2 teachers \(add, sub\)"):
            flow.fn(str(mini_recipe))
    assert not load_recipe(mini_recipe).run_dir.exists()  # nothing was made


def test_the_one_student_command_starts_a_pruned_student_from_the_prune_stage_and_refuses_a_chained_one(mini_recipe):
    """The ninth audit: `python -m kdflow.training.cli --student more` (a student started from another student) ended
    in an AttributeError, its start unresolved. A pruned start is the prune stage's model folder, found by its key;
    a student started from another one is refused with the command that trains both."""
    from flows.lookups import run_teacher
    from flows.train_one import student_job
    from kdflow.store.model_folders import write_location
    from kdflow.store.outputs import building, finish
    from tasks.data import DATA
    from tasks.models import PRUNE
    from tests.conftest import fake_weights

    students = (
        "  - name: pruned\n    data: teacher\n    init: {from: teacher, layers: 1}\n    training: {max_steps: 2}\n"
        "  - name: more\n    data: teacher\n    init: {from: student, student: pruned}\n    training: {max_steps: 2}\n"
    )
    text = mini_recipe.read_text()
    mini_recipe.write_text(text.replace("students:\n", "students:\n" + students, 1))
    r = load_recipe(mini_recipe)
    finished_upstream(r)
    with pytest.raises(SystemExit, match=r"student 'more' starts from the trained student 'pruned': train both with"):
        student_job(str(mini_recipe), "more")
    with pytest.raises(run_folder.MissingStage, match="no finished 'prune' output of this recipe's settings"):
        student_job(str(mini_recipe), "pruned")
    init, data = next(s for s in r.students if s.name == "pruned").init, run_folder.latest(r.run_dir, "data")
    key = PRUNE.key(init=init, teacher=run_teacher(r.run_dir, r), data=data, template=r.prompts.cot_text())
    assert data.key == DATA.key(section=r.data)
    with building(r.run_dir, "prune", key) as tmp:
        write_location(tmp, "model")
        (tmp / "model").mkdir()
        (tmp / "model" / "config.json").write_text('{"model_type": "llama"}')
        (tmp / "model" / "model.safetensors").write_bytes(fake_weights())
        (tmp / "model" / "tokenizer.json").write_text("{}")  # the checks read names and headers, not the tokenizer
        finish(tmp, "prune", key, inputs={})
    job = student_job(str(mini_recipe), "pruned")
    assert job.section.init is None and job.section.model.endswith(f"prune/{key[:16]}/model")
