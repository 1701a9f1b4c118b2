"""Several teachers, each row answered by the one a recipe's ``routing`` names (kdflow/config/teachers.py): which rows
a teacher answers, and its answers joined back into one table, each row saying which teacher wrote it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pydantic import BaseModel

from kdflow.config.teachers import Routing, ServedTeacher
from kdflow.store.model_folders import model_location
from kdflow.store.outputs import OutputRef
from kdflow.store.run_folder import read_split

TEACHER_COLUMN = "teacher"  # the answers', kept rows' and dropped rows' column naming the teacher that wrote each


class RoutedTeachers(BaseModel):
    """Several teachers' outputs by name and the rule that sends each row to one of them: what a student that has its
    own samples scored (on-policy KD) needs of them, each sample by the teacher of the row it was sampled from."""

    routing: Routing
    teachers: dict[str, OutputRef]
    # Each teacher's own vLLM server, for students scored by vLLM: where a teacher runs, not what it is, so not in the
    # students' key (tasks/students.py keys ``routing`` and ``teachers``).
    served: dict[str, ServedTeacher] = {}

    @classmethod
    def of(cls, r, teachers: dict[str, OutputRef]) -> RoutedTeachers:
        """A recipe ``r``'s routing and served teachers, with its teachers' outputs by name."""
        return cls(routing=r.routing, teachers=teachers, served={t.name: t.served for t in r.teachers if t.served})

    def folders(self) -> dict[str, str]:
        """Each teacher's model folder, by name."""
        return {name: str(model_location(ref)) for name, ref in self.teachers.items()}


def row_teachers(data: OutputRef, splits: list[str], routing: Routing) -> dict[tuple[str, str], str]:
    """The teacher ``routing`` sends each row of ``splits`` to, by (split, id)."""
    return {
        (split, r["id"]): routing.teacher_of({**r, "split": split}) for split in splits for r in read_split(data, split)
    }


def routed_ids(data: OutputRef, splits: list[str], routing: Routing, teacher: str) -> set[tuple[str, str]]:
    """The (split, id) of every row of ``splits`` that ``routing`` sends to ``teacher``."""
    return {row for row, name in row_teachers(data, splits, routing).items() if name == teacher}


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
