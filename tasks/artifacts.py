"""Prefect artifact keys, built in one place: stable across runs (so each run's report, table or progress bar lines
up with the last one's in the UI), and in the only characters Prefect accepts — lowercase letters, digits, dashes."""

from __future__ import annotations

import re


def artifact_key(*parts: str) -> str:
    """``parts`` joined by dashes, each other character made a dash: ``("Demo_run", "report")`` ->
    ``demo-run-report``."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())
