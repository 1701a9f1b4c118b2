"""The `kdflow` command: the whole distillation, one stage of it, a study, or a comparison of runs.

    kdflow distill recipes/demo.yaml [--seeds 0 1 2]
    kdflow preflight recipes/demo.yaml                         # check the teacher before any spend
    kdflow students recipes/demo.yaml --run-dir runs/demo      # retrain the students of a finished run
    kdflow compare runs/a runs/b
    kdflow logit-cache-export --format axolotl runs/demo exported/      # or distillkit; also `logit-cache export`
    kdflow logit-cache-import --format distillkit exported/ cache/ --tokenizer models/student

A single stage takes its inputs from the run folder's finished outputs. Each command is a Prefect flow (flows/),
so it shows in the UI and can be deployed like ``distill``. ``--help`` (of the command or of one of them) starts
nothing: Prefect and torch are imported only once the arguments are read.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from flows import STARTUP_TIMEOUT_ENV
from flows.local_server import NO_SERVER, local_server


def _positive(text: str) -> int:
    """argparse type: a whole number of at least 1 (the message names the value; argparse names the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count; give a whole number of at least 1")
    return value


# command -> (module, flow function, what it does); the stage commands are named after the run folder's stages.
COMMANDS = {
    "distill": (
        "flows.distill",
        "distill",
        "the whole distillation: data, teacher, answers, curation, logit cache, students, evaluation, report",
    ),
    "preflight": (
        "flows.preflight",
        "preflight",
        "check the teacher before any spend: repeatable answers, HF vs vLLM log-probs, tokenizers, top-k, "
        "prefix caching",
    ),
    "teacher": ("flows.train_teacher", "train_teacher", "train the teacher (or record the one the recipe names)"),
    "generate": ("flows.generate", "generate", "the teacher's answers (hf, vllm or an OpenAI-compatible API)"),
    "curate": ("flows.curate", "curate", "filter the teacher's answers; every drop kept with its reason"),
    "logit-cache": (
        "flows.capture_logits",
        "capture_logits_flow",
        "capture the teacher's top-k distributions "
        "(other tools' logit datasets: logit-cache-export, logit-cache-import)",
    ),
    "students": ("flows.train_students", "train_students", "train every student of the recipe"),
    "evaluate": ("flows.evaluate", "evaluate", "evaluate the teacher and the students, and write the report"),
    "sweep": ("flows.kd_sweep", "kd_sweep", "transfer-set sizes x methods x seeds (a sweep recipe)"),
    "curves": (
        "flows.learning_curves",
        "learning_curves",
        "learning curves: accuracy vs student steps and wall time, per arm and seed (a study recipe)",
    ),
    "self-instruct": ("flows.self_instruct", "self_instruct", "self-instruct expansion (a self-instruct recipe)"),
    "classifier": (
        "flows.distill_classifier",
        "distill_classifier",
        "Hinton's classic KD of a classifier (a classifier recipe)",
    ),
    "classifier-sweep": ("flows.classifier_sweep", "classifier_sweep", "classic KD over temperatures and seeds"),
}
# Sharded over a Dask cluster: a local one of --workers processes, or an existing one at --address.
SHARDED = {
    "generate-sharded": (
        "flows.generate_sharded",
        "generate_sharded",
        "the teacher's requests sharded over a Dask cluster",
    ),
    "logit-cache-sharded": (
        "flows.capture_sharded",
        "capture_sharded",
        "the logit capture sharded over a Dask cluster",
    ),
}
TAKES_RUN_DIR = {"generate", "curate", "students", "evaluate", *SHARDED}  # the others recompute their inputs (cached)


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="kdflow", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = cli.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, what) in {**COMMANDS, **SHARDED}.items():
        sub = commands.add_parser(name, help=what, description=what)
        sub.add_argument("recipe", help="the recipe YAML")
        if name in TAKES_RUN_DIR:
            sub.add_argument(
                "--run-dir", help="the run folder to take inputs from and write to (default: the recipe's)"
            )
        if name in SHARDED:
            sub.add_argument("--workers", type=_positive, default=2, help="local cluster size (without --address)")
            sub.add_argument("--address", help="scheduler of an existing Dask cluster, e.g. tcp://10.0.0.5:8786")
            sub.add_argument("--parts", type=_positive, help="how many parts the work is cut into (default: --workers)")
        if name == "distill":
            sub.add_argument(
                "--seeds",
                type=int,
                nargs="+",
                help="train and evaluate every student once per seed (overrides the recipe's run.seeds)",
            )
            sub.add_argument(
                "--students",
                nargs="+",
                metavar="NAME",
                help="only these students of the recipe (the teacher, the floors and their cached stages "
                "are shared with the full run)",
            )
    interop_commands(commands)
    compare = commands.add_parser("compare", help="compare two or more runs in one table (their report.json)")
    compare.add_argument("runs", nargs="+", help="run folders (runs/<name>) or their report.json files")
    compare.add_argument("--out", help="also write the table to this Markdown file")
    return cli


def interop_commands(commands) -> None:
    """Logit datasets in and out (kdflow/logit_cache/interop.py): plain commands, no Prefect."""
    formats = ("distillkit", "axolotl")
    export = commands.add_parser(
        "logit-cache-export",
        help="write a logit cache as DistillKit's compressed parquet or "
        "axolotl's KD columns (also: logit-cache export)",
    )
    export.add_argument("cache", help="a logit cache folder, or a run folder holding one")
    export.add_argument("out", help="the folder to write (must not exist)")
    export.add_argument("--format", required=True, choices=formats)
    export.add_argument(
        "--layout",
        choices=("lossless", "budget"),
        default="lossless",
        help="distillkit: every log-prob as float16 (exact for kdflow's u8 and fp16 caches), or "
        "DistillKit's README budget pick (top-1 bf16, a polynomial for the rest: lossy)",
    )
    export.add_argument(
        "--no-tail",
        action="store_true",
        help="leave out kdflow_tail (the tail mass per position, "
        "which the other tools ignore and a re-import reads back)",
    )
    imp = commands.add_parser(
        "logit-cache-import",
        help="read a DistillKit or axolotl logit dataset into a kdflow "
        "logit cache a student trains from (also: logit-cache import)",
    )
    imp.add_argument("file", help="a parquet file, or a folder of them")
    imp.add_argument("out", help="the cache folder to write (must not exist)")
    imp.add_argument("--format", required=True, choices=formats)
    imp.add_argument(
        "--tokenizer",
        required=True,
        help="the tokenizer the file's token ids are from (a model folder "
        "or hub id): recorded in the cache, and checked against the student's when it trains",
    )
    imp.add_argument(
        "--vocab-size",
        type=_positive,
        help="the teacher's logits per position, i.e. the student's vocab_size "
        "(default: what a kdflow export recorded, DistillKit's d, or the tokenizer's length)",
    )
    imp.add_argument("--distillkit-config", help="DistillKit's compression_config.yaml (default: beside the files)")
    imp.add_argument(
        "--teacher",
        help="the teacher's name, recorded in the cache's manifest (a kdflow export "
        "records its own; another is refused)",
    )
    imp.add_argument(
        "--value-encoding",
        choices=("u8", "fp16"),
        help="how the cache stores log-probs (default: what a kdflow export recorded, else u8)",
    )
    imp.add_argument("--shard-rows", type=_positive, default=1024, help="rows per cache shard")


def run_interop(args) -> dict:
    from kdflow.logit_cache import interop

    if args.command == "logit-cache-export":
        from kdflow.logit_cache import distillkit

        layout = None
        if args.layout == "budget":
            from kdflow.logit_cache.reader import LogitCache

            k = LogitCache.open(interop.find_cache(args.cache)).k
            layout = distillkit.Layout(k=k)
        return interop.export_cache(args.cache, args.out, args.format, layout, with_tail=not args.no_tail)
    from transformers import AutoTokenizer

    from kdflow.config.logit_cache import ValueEncoding
    from kdflow.models.model_folder import NOT_THERE, maybe_hub_id

    if not Path(args.tokenizer).exists() and not maybe_hub_id(args.tokenizer):
        raise FileNotFoundError(
            f"--tokenizer {args.tokenizer}: {NOT_THERE}; pass the folder (or hub "
            "id) of the model whose tokens the file holds"
        )
    manifest = interop.import_file(
        args.file,
        args.out,
        args.format,
        AutoTokenizer.from_pretrained(args.tokenizer),
        vocab_size=args.vocab_size,
        config=args.distillkit_config,
        teacher=args.teacher,
        encoding=ValueEncoding(args.value_encoding) if args.value_encoding else None,
        shard_rows=args.shard_rows,
    )
    return {key: manifest[key] for key in ("rows", "positions", "bytes", "k", "vocab_size", "value_encoding", "tail")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["logit-cache"] and argv[1:2] in (["export"], ["import"]):  # the spelling issue 26 asked for
        argv = [f"logit-cache-{argv[1]}", *argv[2:]]
    args = parser().parse_args(argv)
    if args.command == "compare":
        from kdflow.reporting.compare import main as compare

        return compare([*args.runs, *(["--out", args.out] if args.out else [])])
    if args.command in ("logit-cache-export", "logit-cache-import"):
        print(json.dumps(run_interop(args), indent=2))
        return 0
    module, name, _ = {**COMMANDS, **SHARDED}[args.command]
    stage_flow = getattr(importlib.import_module(module), name)  # imported late: Prefect and torch take seconds
    if args.command in SHARDED:
        from prefect_dask import DaskTaskRunner

        runner = (
            DaskTaskRunner(address=args.address)
            if args.address
            else DaskTaskRunner(cluster_kwargs={"n_workers": args.workers, "threads_per_worker": 1, "processes": True})
        )
        result = started(
            args.command,
            stage_flow.with_options(task_runner=runner),
            args.recipe,
            args.run_dir,
            args.parts or args.workers,
        )
    elif args.command == "distill":
        result = started(args.command, stage_flow, args.recipe, args.seeds, args.students)
    elif getattr(args, "run_dir", None):
        result = started(args.command, stage_flow, args.recipe, args.run_dir)
    else:
        result = started(args.command, stage_flow, args.recipe)
    if args.command != "distill":  # distill prints its own summary
        print(json.dumps(result, indent=2, default=lambda o: o.model_dump() if hasattr(o, "model_dump") else str(o)))
    return 0


def started(command: str, stage_flow, *inputs):
    """Runs the flow on the command's own temporary server (flows/local_server.py: group signals, Ctrl-C among them,
    do not take it down before the flow has reported its end); one that never answered ends the command with the fix,
    not a traceback."""
    try:
        with local_server():
            return stage_flow(*inputs)
    except KeyboardInterrupt:  # Ctrl-C: the flow has reported itself crashed; no traceback for what the user asked
        print(
            f"kdflow {command}: interrupted. Finished stages are kept in the run folder (a student's training in its "
            "checkpoints): the same command goes on from them.",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except RuntimeError as e:
        if not str(e).startswith(NO_SERVER):
            raise
        sys.exit(
            f"kdflow {command}: Prefect's temporary local server did not answer within "
            f"{os.environ.get(STARTUP_TIMEOUT_ENV)} s (the machine is busy?), so no stage ran. Set "
            f"{STARTUP_TIMEOUT_ENV} higher, or start a server once (`prefect server start`) and point every "
            "run at it with PREFECT_API_URL=http://127.0.0.1:4200/api."
        )


def run_as_script(command: str) -> None:
    """``python -m flows.<module> ARGS`` is ``kdflow <command> ARGS`` (the same arguments and --help)."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
