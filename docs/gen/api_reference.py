"""Writes reference/api/<wing>.md: the library's docstrings (kdflow/, one page per wing, every module on it) rendered
by mkdocstrings. The wings are found on disk, so a new module or wing appears without editing the docs."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import mkdocs_gen_files

import kdflow

ROOT = Path(kdflow.__file__).parent


def wings() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())


def modules(wing: str) -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(ROOT / wing)]))


index = [
    "# API reference",
    "",
    "The `kdflow` library, from its docstrings: plain Python that imports nothing from Prefect, `tasks/` or "
    "`flows/`, grouped by wing — one subpackage per part of the pipeline.",
    "",
    "| wing | modules |",
    "|---|---|",
]
for wing in wings():
    names = modules(wing)
    index.append(f"| [`kdflow.{wing}`]({wing}.md) | {', '.join(f'`{n}`' for n in names)} |")
    lines = [
        f"# `kdflow.{wing}`",
        "",
        f"::: kdflow.{wing}",
        "    options:",
        "      members: false",
        "      show_root_heading: false",
        "",
    ]  # the package's docstring under the page's own title
    for name in names:
        lines += [f"::: kdflow.{wing}.{name}", ""]
    with mkdocs_gen_files.open(f"reference/api/{wing}.md", "w") as f:
        f.write("\n".join(lines))
with mkdocs_gen_files.open("reference/api/index.md", "w") as f:
    f.write("\n".join(index) + "\n")
