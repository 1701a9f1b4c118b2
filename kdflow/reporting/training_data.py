"""What the report says the students learnt from: the teacher's answers (generated, kept, dropped and why) and the
logit cache they read — another tool's files, named with their sha256 (what an import is keyed on), or the teacher's
top-k captured here. The cache's figures come from ``tasks.report.logit_source``."""

from __future__ import annotations


def training_data_lines(curation: dict | None, cache: dict | None) -> list[str]:
    """``curation``: the curate stage's counts, None when no teacher answers were asked for (an imported cache)."""
    if curation:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(curation["drop_reasons"].items())) or "none"
        answers = (
            f"Teacher answers: {curation['input_rows']} generated, {curation['kept']} kept, {curation['dropped']} "
            f"dropped ({reasons})."
        )
    else:
        answers = "Teacher answers: none asked for (the students learnt from an imported logit dataset)."
    return [answers, "", *logit_cache_lines(cache)]


def logit_cache_lines(cache: dict | None) -> list[str]:
    """What the students' logit cache was (``tasks.report.logit_source``): another tool's files, named with their
    sha256 (the import's identity), or the teacher's top-k captured here. None: no student read one."""
    if not cache:
        return []
    k, rows = cache.get("k"), cache["rows"]
    fmt = (cache.get("source") or "").removeprefix("import:")
    if cache.get("source", "").startswith("import:"):
        files = cache["files"]
        named = ", ".join(f"`{f['file']}` (sha256 {f['sha256'][:12]}…)" for f in files[:3])
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        teacher = f", recorded as teacher `{cache['teachers'][0]}`" if cache.get("named_teacher") else ""
        return [f"Logit cache: imported from {fmt} files {named}{more}{teacher}: {rows} rows, top-{k}.", ""]
    return [f"Logit cache: the teacher's top-{k} log-probs on {rows} rows, captured here ({fmt}).", ""]
