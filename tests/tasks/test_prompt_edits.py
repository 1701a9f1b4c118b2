"""Every prompt text a stage uses is part of its content: editing one prompt file a recipe names changes the key of
exactly the stages that read it (the key Prefect's cache policy and the stage body share: Stage.key), so exactly
those rerun; stages downstream then rerun because their inputs' hashes change, never because of the file itself."""

import shutil
from pathlib import Path

import pytest
import yaml

from kdflow.config.recipe import load_recipe
from kdflow.store.outputs import OutputRef

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "tests" / "mini.yaml"
# prompt file -> the stages that read it
DEPENDENTS = {
    "cot.jinja": {"teacher", "generate", "logit-cache", "students", "evaluate", "deployment"},
    "instruct.jinja": {"generate"},
    "few_shot.jinja": {"generate"},
    "judge_filter.jinja": {"curate"},
    "judge.jinja": {"judge"},
}


def recipe_naming_every_prompt(folder: Path) -> Path:
    for name, source in (
        ("cot.jinja", "cot.jinja"),
        ("instruct.jinja", "cot.jinja"),
        ("few_shot.jinja", "few_shot.jinja"),
        ("judge_filter.jinja", "judge_filter.jinja"),
        ("judge.jinja", "judge.jinja"),
    ):
        shutil.copy(ROOT / "prompts" / source, folder / name)
    r = yaml.safe_load(MINI.read_text())
    r["run"]["root"] = str(folder / "runs")
    r["prompts"] = {"cot": str(folder / "cot.jinja")}
    r["generation"].update(
        template=str(folder / "instruct.jinja"), icl={"k": 1, "template": str(folder / "few_shot.jinja")}
    )
    r["filters"] = {"judge": {"template": str(folder / "judge_filter.jinja")}}
    r["evaluation"]["judge"] = {"backend": "hf", "model": "some/judge", "template": str(folder / "judge.jinja")}
    r["logit_cache"] = {"k": 5}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def ref(stage: str) -> OutputRef:
    return OutputRef(stage=stage, key=stage, path=f"/{stage}", sha256=stage)


def stage_keys(recipe: Path) -> dict[str, str]:
    """Every LM stage's key for the recipe as it is on disk now, with the arguments its flows pass it."""
    from tasks.capture import CAPTURE
    from tasks.curate import CURATE
    from tasks.evaluate import DEPLOYMENT, EVALUATE, JUDGE
    from tasks.generate import GENERATE
    from tasks.students import STUDENTS
    from tasks.teacher import TEACHER

    r = load_recipe(recipe)
    cot, student = r.prompts.cot_text(), r.students[1]
    return {
        "teacher": TEACHER.key(section=r.teacher, data=ref("data"), template=cot),
        "generate": GENERATE.key(section=r.generation, template=cot, teacher=ref("teacher"), data=ref("data")),
        "curate": CURATE.key(section=r.filters, source=r.data.source, answers=ref("generate"), teacher=ref("teacher")),
        "logit-cache": CAPTURE.key(section=r.logit_cache, template=cot, teacher=ref("teacher"), curated=ref("curate")),
        "students": STUDENTS.key(
            section=student, template=cot, teacher=ref("teacher"), data=ref("data"), curated=ref("curate"), logits=None
        ),
        "evaluate": EVALUATE.key(
            section=r.evaluation,
            template=cot,
            source=r.data.source,
            model=ref("students"),
            teacher=ref("teacher"),
            data=ref("data"),
        ),
        "deployment": DEPLOYMENT.key(
            models={"teacher": ref("teacher")},
            settings=r.evaluation.deployment,
            template=cot,
            data=ref("data"),
            split=r.evaluation.split,
        ),
        "judge": JUDGE.key(
            section=r.evaluation.judge,
            students={"seq-kd": ref("evaluate")},
            teacher=ref("evaluate"),
            data=ref("data"),
            split=r.evaluation.split,
        ),
    }


@pytest.mark.parametrize("prompt", sorted(DEPENDENTS))
def test_editing_a_prompt_file_changes_exactly_the_stages_that_read_it(prompt, tmp_path):
    recipe = recipe_naming_every_prompt(tmp_path)
    before = stage_keys(recipe)
    assert stage_keys(recipe) == before  # keys are stable: nothing reruns on an unchanged recipe
    with open(tmp_path / prompt, "a") as f:
        f.write("\n{# edited #}\n")
    after = stage_keys(recipe)
    assert {stage for stage in before if before[stage] != after[stage]} == DEPENDENTS[prompt]
