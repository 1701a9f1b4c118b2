"""The teacher's side of on-policy training (kdflow/training/on_policy.py): the scorer that answers each step's
samples for the length of training, and, with several routed teachers, which teacher scores which row's samples."""

from __future__ import annotations

import contextlib
from pathlib import Path

from kdflow.logit_cache.scoring import RoutedScorer, teacher_scorer
from kdflow.teacher.routing import TEACHER_COLUMN


def routed_rows(rows: list[dict], teachers: dict[str, str]) -> dict[str, str]:
    """Each row id -> the teacher (a name in ``teachers``) its row names in ``teacher``: who scores its samples."""
    routes = {r["row_id"]: r.get(TEACHER_COLUMN) for r in rows}
    if unknown := sorted({str(name) for name in routes.values() if name not in teachers}):
        raise ValueError(
            f"rows are routed to {unknown}, which are not among the teachers given ({', '.join(teachers)}): "
            "each row's `teacher` must name one (kdflow.training.student.student_rows with the recipe's routing)"
        )
    return routes


@contextlib.contextmanager
def live_scorer(
    config,  # an OnPolicyConfig (kdflow/training/on_policy.py imports this module)
    log: Path,
    threads: int | None,
    vocab_size: int,
    teachers: dict[str, str] | None = None,
    routes: dict[str, str] | None = None,
):
    """The teacher's scorer (``teacher_scorer``, as ``config`` says) for the length of the block, its stderr in
    ``log``; with several routed teachers (``teachers``: folders by name, ``routes``: row id -> name), one scorer per
    teacher that has rows, as one ``RoutedScorer``, each with its own log beside ``log``. They answer one after the
    other, so each can have the ``threads`` of the one teacher."""

    def scorer(folder: str, log: Path):
        return teacher_scorer(
            config.teacher_backend,
            folder,
            config.k,
            log,
            config.base_url,
            config.concurrency,
            config.batch_tokens,
            threads,
            vocab_size=vocab_size,
            timeout_s=config.timeout_s,
        )

    if teachers is None:
        with scorer(config.teacher, log) as one:
            yield one
        return
    with contextlib.ExitStack() as started:  # each stopped at the end, as one teacher's is
        scorers = {
            name: started.enter_context(scorer(teachers[name], log.with_name(f"{log.stem}-{name}{log.suffix}")))
            for name in sorted(set(routes.values()))
        }
        yield RoutedScorer(scorers, lambda row: routes[row.row_id])
