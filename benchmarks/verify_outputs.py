"""Cost of checking every reused output against its manifest: an unchanged rerun of a finished distillation with
verification (the default: each file's size, and the content hash of outputs under the hash budget) against the
same rerun with it off (``KDFLOW_VERIFY_OUTPUTS=off``: only that the manifest is there, as before).

The run folder is the demo's (runs/demo from `make demo`), copied to a temporary folder so the original is not
touched; without it, the miniature recipe (tests/mini.yaml) is run once first. The two modes alternate, --reps
times each, in one process; before each verified rerun the in-process memo of verified folders is cleared, as a
fresh `make demo` process starts with none. Goal: ratio <= 1.5 and the verified rerun under 60 s.

    python benchmarks/verify_outputs.py [--reps 3] [--recipe recipes/demo.yaml]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import prefect_env  # before anything imports prefect

# isort: split
from results import options, save


def folder_bytes(run_dir: Path) -> tuple[int, int]:
    """(files, bytes) of the finished stage outputs in the run folder."""
    files = [f for m in run_dir.glob("[!.]*/[!.]*/manifest.json") for f in m.parent.rglob("*") if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def main() -> None:
    args = options(__doc__, reps=3, recipe="recipes/demo.yaml")  # recipe: one whose run folder is finished

    from flows.distill import distill
    from kdflow.config.recipe import load_recipe
    from kdflow.store import outputs
    from rerun_cost import matches, recipe_copy

    work = Path(tempfile.mkdtemp(prefix="kdflow-bench-verify-"))
    completed = ROOT / args.recipe
    run_dir = load_recipe(completed).run_dir
    with prefect_env.warm_server():
        if (run_dir / "report.json").is_file() and matches(completed, run_dir):
            shutil.copytree(run_dir, work / "copy" / run_dir.name)
            recipe, name = recipe_copy(completed, work / "copy"), args.recipe
        else:
            print(
                f"{run_dir} is not a finished run of {args.recipe} as it is now: measuring tests/mini.yaml instead "
                "(run `make demo` first for the demo's figure)"
            )
            recipe, name = recipe_copy(ROOT / "tests" / "mini.yaml", work / "mini"), "tests/mini.yaml"
            distill(recipe)  # the first run, not timed
        files, size = folder_bytes(load_recipe(recipe).run_dir)

        times: dict[str, list[float]] = {"off": [], "full": []}
        for _ in range(args.reps):
            for mode in ("off", "full"):
                os.environ[outputs.VERIFY_ENV] = mode
                outputs._verified.clear()
                start = time.perf_counter()
                distill(recipe)
                times[mode].append(time.perf_counter() - start)
        os.environ.pop(outputs.VERIFY_ENV)

    off, full = statistics.median(times["off"]), statistics.median(times["full"])
    result = {
        "recipe": name,
        "reps": args.reps,
        "outputs_files": files,
        "outputs_bytes": size,
        "hash_budget_bytes": outputs.HASH_BUDGET_BYTES,
        "off_s": [round(t, 2) for t in times["off"]],
        "full_s": [round(t, 2) for t in times["full"]],
        "ratio": round(full / off, 3),
    }
    save("verify_outputs", result)
    print(
        f"{name}: {files} output files, {size / 2**20:.1f} MiB; unchanged rerun median: "
        f"verification off {off:.2f} s, on {full:.2f} s (goal: on < 60 s)"
    )
    print(f"rerun with verification / without: {full / off:.3f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
