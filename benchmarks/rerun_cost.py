"""Cost of rerunning a finished distillation: the distill flow on an unchanged recipe, every stage a cache hit,
against the first run that computed everything.

Two measurements, both printed; the ratio last is the demo's when its run folder exists:

- fresh: the miniature recipe (tests/mini.yaml) run once from nothing, then rerun --reps times, in this process
  (its fixed costs weigh most here: the first run is only ~30 s).
- completed: the demo's finished run folder (runs/demo, from `make demo`), copied to a temporary folder so the
  original is not touched, rerun --reps times. Its first run is not repeated here (10+ minutes): its wall time
  is taken from the run folder, from the data stage's manifest to the last one written — a lower bound on the
  first run (it leaves out the few seconds before the data stage), so the ratio is an upper bound.

    python benchmarks/rerun_cost.py [--reps 3] [--completed recipes/demo.yaml]
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import prefect_env  # before anything imports prefect

# isort: split
from results import options, save


def recipe_copy(recipe: Path, root: Path) -> str:
    """The recipe with its run folder under ``root`` (the same run name)."""
    import yaml

    content = yaml.safe_load(recipe.read_text())
    content["run"]["root"] = str(root)
    path = root / recipe.name
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return str(path)


def timed(distill, recipe: str) -> float:
    start = time.perf_counter()
    distill(recipe)
    return time.perf_counter() - start


def first_run_span_s(run_dir: Path) -> float:
    """From the data stage's manifest to the last manifest written in the run folder."""
    stamps = [
        datetime.fromisoformat(json.loads(m.read_text())["created_at"].replace("Z", "+00:00"))
        for m in run_dir.glob("[!.]*/[!.]*/manifest.json")
    ]
    data = [
        datetime.fromisoformat(json.loads(m.read_text())["created_at"].replace("Z", "+00:00"))
        for m in run_dir.glob("data/[!.]*/manifest.json")
    ]
    return (max(stamps) - min(data)).total_seconds()


def matches(recipe: Path, run_dir: Path) -> bool:
    """The run folder holds the teacher this recipe asks for (else a "rerun" would retrain it)."""
    from kdflow.config.recipe import load_recipe
    from tasks.data import DATA
    from tasks.teacher import TEACHER

    r = load_recipe(recipe)
    data = DATA.output(run_dir, section=r.data).done
    return data is not None and (
        r.teacher.model is not None
        or TEACHER.output(run_dir, section=r.teacher, data=data, template=r.prompts.cot_text()).done is not None
    )


def main() -> None:
    args = options(__doc__, reps=3, completed="recipes/demo.yaml")  # completed: a recipe whose run folder is finished

    from flows.distill import distill
    from kdflow.config.recipe import load_recipe

    work = Path(tempfile.mkdtemp(prefix="kdflow-bench-rerun-"))
    result: dict = {"reps": args.reps}
    with prefect_env.warm_server():
        mini = recipe_copy(ROOT / "tests" / "mini.yaml", work / "fresh")
        first = timed(distill, mini)
        reruns = [timed(distill, mini) for _ in range(args.reps)]
        result["fresh"] = {
            "recipe": "tests/mini.yaml",
            "first_s": round(first, 2),
            "reruns_s": [round(t, 2) for t in reruns],
            "ratio": round(statistics.median(reruns) / first, 4),
        }
        print(f"mini, fresh: first run {first:.1f} s, rerun median {statistics.median(reruns):.2f} s")

        completed = ROOT / args.completed
        run_dir = load_recipe(completed).run_dir
        save("rerun_cost", result)  # the fresh figure is kept even if what follows is stopped
        if not matches(completed, run_dir):
            print(
                f"{run_dir} was not made with {args.completed} as it is now (its teacher differs): a rerun would "
                "recompute, so no figure for it; run `make demo` first"
            )
        elif (run_dir / "report.json").is_file():
            copy = work / "completed"
            shutil.copytree(run_dir, copy / run_dir.name)
            recipe = recipe_copy(completed, copy)
            span = first_run_span_s(copy / run_dir.name)
            reruns = [timed(distill, recipe) for _ in range(args.reps)]
            result["completed"] = {
                "recipe": args.completed,
                "first_run_span_s": round(span, 1),
                "reruns_s": [round(t, 2) for t in reruns],
                "ratio": round(statistics.median(reruns) / span, 4),
            }
            print(
                f"{args.completed}, completed: first run >= {span:.0f} s (manifests), "
                f"rerun median {statistics.median(reruns):.2f} s"
            )
        else:
            print(f"{run_dir} has no report.json: run `make demo` first for the demo's figure")

    save("rerun_cost", result)
    print(f"rerun / first run, mini: {result['fresh']['ratio']:.3f}")
    if "completed" in result:
        print(f"rerun / first run, {args.completed}: {result['completed']['ratio']:.4f}")


if __name__ == "__main__":
    main()
