"""Writes reference/cli.md from the `kdflow` command's argparse parser (flows/cli.py): every command, its
arguments and its help text, so the reference cannot drift from the parser. Importing flows.cli starts nothing."""

from __future__ import annotations

import inspect
import os

import mkdocs_gen_files

import flows.cli as cli


def page() -> str:
    os.environ["COLUMNS"] = "110"  # argparse wraps to the terminal's width: the same page on every machine
    parser = cli.parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")  # argparse has no public accessor
    helps = {a.dest: a.help for a in subparsers._choices_actions}
    out = [
        "# CLI reference",
        "",
        "Generated from the parser in `flows/cli.py` each time the docs are built. `kdflow` is installed in "
        "`.venv` (`. .venv/bin/activate`); `python -m flows.<module> ARGS` runs the same flow with the same "
        "arguments.",
        "",
        inspect.cleandoc(cli.__doc__),
        "",
        "| command | runs | what it does |",
        "|---|---|---|",
    ]
    for name, (module, flow, what) in {**cli.COMMANDS, **cli.SHARDED}.items():
        out.append(f"| [`kdflow {name}`](#kdflow-{name}) | `{module}.{flow}` | {what} |")
    out += [
        f"| [`kdflow compare`](#kdflow-compare) | `kdflow.reporting.compare` | {helps['compare']} |",
        "",
        "## `kdflow`",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
        "",
    ]
    for name, sub in subparsers.choices.items():
        out += [f"## `kdflow {name}` {{#kdflow-{name}}}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


with mkdocs_gen_files.open("reference/cli.md", "w") as f:
    f.write(page())
