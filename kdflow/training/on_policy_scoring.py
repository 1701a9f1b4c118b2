"""The teacher's side of on-policy training (kdflow/training/on_policy.py): the scorer that answers each step's
samples for the length of training, and, with several routed teachers, which teacher scores which row's samples."""

from __future__ import annotations

import contextlib
from pathlib import Path

from kdflow.logit_cache.scoring import RoutedScorer, check_served, teacher_scorer
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
    served: dict | None = None,
):
    """The teacher's scorer (``teacher_scorer``, as ``config`` says) for the length of the block, its stderr in
    ``log``; with several routed teachers (``teachers``: folders by name, ``routes``: row id -> name), one scorer per
    teacher that has rows, as one ``RoutedScorer``, each with its own log beside ``log``. They answer one after the
    other, so each can have the ``threads`` of the one teacher. With ``teacher_backend`` vllm each routed teacher is
    its own server, ``served[name]`` (a ``ServedTeacher``: the recipe refuses one missing), checked before training
    to serve that teacher (``check_served``)."""

    def scorer(folder: str, log: Path, base_url: str | None = config.base_url):
        return teacher_scorer(
            config.teacher_backend,
            folder,
            config.k,
            log,
            base_url,
            config.concurrency,
            config.batch_tokens,
            threads,
            vocab_size=vocab_size,
            timeout_s=config.timeout_s,
        )

    def routed(name: str):
        log_n = log.with_name(f"{log.stem}-{name}{log.suffix}")
        if config.teacher_backend != "vllm":
            return scorer(teachers[name], log_n)
        where = (served or {}).get(name)
        if where is None:
            raise ValueError(
                f"teacher {name!r} scores by vLLM (kd.teacher_backend: vllm) and names no server: give its teachers "
                "entry served: {base_url: ...}"
            )
        check_served(where.base_url, teachers[name], teachers[name], name, config.timeout_s)
        return scorer(teachers[name], log_n, where.base_url)

    if teachers is None:
        with scorer(config.teacher, log) as one:
            yield one
        return
    with contextlib.ExitStack() as started:  # each stopped at the end, as one teacher's is
        scorers = {name: started.enter_context(routed(name)) for name in sorted(set(routes.values()))}
        yield RoutedScorer(scorers, lambda row: routes[row.row_id])
