"""Run the whole distillation or one stage of it from a shell:

    python -m kdflow.cli distill recipes/demo.yaml
    python -m kdflow.cli students recipes/demo.yaml --run-dir runs/demo   # retrain the students of a run

A single stage takes its inputs from the run folder's finished outputs (kdflow.store.run_folder). Each stage is a
Prefect flow of its own (flows/), so it shows in the UI and can be deployed like ``distill``.
"""

from __future__ import annotations

import argparse
import importlib
import json

# stage -> (module, flow function); the stage names are the run folder's stage folder names.
FLOWS = {
    "distill": ("flows.distill", "distill"),
    "teacher": ("flows.train_teacher", "train_teacher"),
    "generate": ("flows.generate", "generate"),
    "curate": ("flows.curate", "curate"),
    "logit-cache": ("flows.capture_logits", "capture_logits_flow"),
    "students": ("flows.train_students", "train_students"),
    "evaluate": ("flows.evaluate", "evaluate"),
}
TAKES_RUN_DIR = {"generate", "curate", "students", "evaluate"}  # the others recompute their inputs (cached)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdflow.cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=FLOWS)
    parser.add_argument("recipe", help="the recipe YAML")
    parser.add_argument("--run-dir", help=f"run folder to use instead of the recipe's ({', '.join(sorted(TAKES_RUN_DIR))})")
    args = parser.parse_args(argv)
    if args.run_dir and args.stage not in TAKES_RUN_DIR:
        parser.error(f"--run-dir applies to {', '.join(sorted(TAKES_RUN_DIR))}; {args.stage} uses the recipe's run folder")
    module, name = FLOWS[args.stage]
    stage_flow = getattr(importlib.import_module(module), name)  # imported late: Prefect and torch take seconds
    result = stage_flow(args.recipe, args.run_dir) if args.run_dir else stage_flow(args.recipe)
    if args.stage != "distill":  # distill prints its own summary
        print(json.dumps(result, indent=2, default=lambda o: o.model_dump() if hasattr(o, "model_dump") else str(o)))


if __name__ == "__main__":
    main()
