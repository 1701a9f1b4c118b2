"""Several teachers, each row answered by the one a recipe's ``routing`` names (kdflow/config/teachers.py): which rows
a teacher answers, and its answers joined back into one table, each row saying which teacher wrote it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdflow.config.teachers import Routing
from kdflow.store.outputs import OutputRef
from kdflow.store.run_folder import read_split

TEACHER_COLUMN = "teacher"  # the answers', kept rows' and dropped rows' column naming the teacher that wrote each


def routed_ids(data: OutputRef, splits: list[str], routing: Routing, teacher: str) -> set[tuple[str, str]]:
    """The (split, id) of every row of ``splits`` that ``routing`` sends to ``teacher``."""
    return {
        (split, r["id"])
        for split in splits
        for r in read_split(data, split)
        if routing.teacher_of({**r, "split": split}) == teacher
    }


def join_tables(files: dict[str, Path]) -> pd.DataFrame:
    """The teachers' tables (answers or failures; each a parquet file) as one, each row with its teacher's name in
    ``TEACHER_COLUMN``, in (id, sample) order: the order one teacher's answers would have."""
    tables = [pd.read_parquet(f).assign(**{TEACHER_COLUMN: name}) for name, f in files.items() if f.is_file()]
    tables = [t for t in tables if len(t)]
    if not tables:
        return pd.DataFrame(columns=[TEACHER_COLUMN])
    joined = pd.concat(tables, ignore_index=True)
    order = [c for c in ("id", "sample") if c in joined.columns]
    return joined.sort_values(order, kind="stable").reset_index(drop=True) if order else joined


def token_shares(counts: dict[str, float]) -> dict[str, float]:
    """Each teacher's share of a total (tokens, positions), rounded to 4 places; 0 for all when the total is 0."""
    total = sum(counts.values())
    return {name: round(n / total, 4) if total else 0.0 for name, n in counts.items()}
