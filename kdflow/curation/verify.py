"""Final-answer verification for free-form and GSM8K-style answers, and self-consistency over n samples.

Equivalence is math-verify's (HF's maintained verifier: numbers, LaTeX, units and currency, ``\\boxed{}``),
not a lone regex: ``72``, ``72.0``, ``$72``, ``72 dollars`` and ``\\boxed{72}`` are one answer. What we add
is *where* the final answer is: GSM8K ends its solutions with ``#### 72``, many prompts ask for
``Answer: 72``, so the text after the last such marker is the answer when there is one; calculator
annotations ``<<48/2=24>>`` are removed first, since their numbers are intermediate results.

Every answer is bounded: math-verify runs in a worker process (``kdflow.curation.verify_worker``) that is killed and
replaced when one answer takes longer than ``TIMEOUT_S``, in whatever thread the caller runs; that answer
raises ``VerifyTimeout`` (curation drops its row as ``verify_timeout``). Workers are kept and reused, so a
call costs a pipe round trip beside math-verify's own work, and ``run_calls`` sends many in one trip.

The arithmetic demo keeps its own exact checker (``data.arithmetic``); this path is for everything else.
"""

from __future__ import annotations

import atexit
import enum
import json
import os
import select as selectmodule  # this module's select() picks samples
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from kdflow.config.filters import SelectPolicy as Policy
from kdflow.curation.verify_worker import answer_span  # noqa: F401  (where the answer is; the rest runs in the worker)

# Every parse and verify runs in a worker process (kdflow.curation.verify_worker), killed and replaced when one answer
# takes longer than TIMEOUT_S, from any thread: math-verify's own SIGALRM timeout works only in the main thread,
# and not even there against a big-integer power in C (``9^9^9^9`` froze the process for good).
TIMEOUT_S = 5.0
START_TIMEOUT_S = 120.0  # a worker imports sympy and math-verify: seconds on a loaded machine, never counted per answer
MAX_IDLE_WORKERS = max(1, os.cpu_count() or 1)  # kept for reuse; a thread that finds none free starts its own
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # where ``kdflow`` is, for the worker's imports


class Verdict(str, enum.Enum):
    correct = "correct"
    wrong = "wrong"
    no_answer = "no_answer"  # no final answer could be extracted from the text


class VerifyTimeout(RuntimeError):
    """math-verify did not finish on one answer within TIMEOUT_S (or its worker died on it). Curation drops
    the row with reason ``verify_timeout``; it is never waited for."""


class _Worker:
    """One math-verify process, spoken to in JSON lines over its stdin and stdout."""

    def __init__(self):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p),
        }
        # A session of its own: Ctrl-C in a terminal stops the caller, which closes the worker's stdin; the
        # worker then ends by itself (it is never left running, see kdflow.curation.verify_worker.serve).
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kdflow.curation.verify_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.buffer = b""
        if self._reply(START_TIMEOUT_S) != {"ok": "ready"}:
            self.kill()
            raise RuntimeError(
                f"the math-verify worker ({sys.executable} -m kdflow.curation.verify_worker) did not start "
                f"within {START_TIMEOUT_S:g} s; its stderr is above"
            )

    def _reply(self, timeout: float) -> dict | None:
        """The next reply, or None when none came within ``timeout`` seconds; {} when the worker has exited."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            if not selectmodule.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return {}
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, calls: list, timeout: float) -> tuple[list, str | None]:
        """(replies to the first calls, in order; why the next one got none: None when all were answered)."""
        try:
            self.process.stdin.write(json.dumps({"timeout": timeout, "calls": calls}).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return [], f"the worker had exited (code {self.process.wait()})"
        replies = []
        for _ in calls:
            reply = self._reply(timeout)
            if reply is None:
                return replies, f"no result within {timeout:g} s"
            if not reply:
                return replies, f"the worker died on it (exit code {self.process.wait()})"
            replies.append(reply)
        return replies, None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()

    def close(self) -> None:
        """End of stdin: the worker exits by itself (killed if it does not within a second)."""
        try:
            self.process.stdin.close()
            self.process.wait(timeout=1)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


_idle: list[_Worker] = []
_idle_lock = threading.Lock()
_idle_pid = os.getpid()


def _borrow() -> _Worker:
    global _idle_pid
    with _idle_lock:
        if _idle_pid != os.getpid():  # a forked child: those pipes lead to the parent's workers, not ours
            _idle.clear()
            _idle_pid = os.getpid()
        if _idle:
            return _idle.pop()
    return _Worker()


def _give_back(worker: _Worker) -> None:
    with _idle_lock:
        if _idle_pid == os.getpid() and len(_idle) < MAX_IDLE_WORKERS:
            _idle.append(worker)
            return
    worker.close()


@atexit.register
def close_workers() -> None:
    with _idle_lock:
        workers = list(_idle) if _idle_pid == os.getpid() else []
        _idle.clear()
    for worker in workers:
        worker.close()


def run_calls(calls: list[tuple[str, list]]) -> list:
    """Each call's result, in order, or a ``VerifyTimeout`` in place of one that ran past TIMEOUT_S. One batch
    to one worker (a round trip per batch, not per answer); a worker that runs over is killed, and the rest of
    the batch goes to a fresh one."""
    results: list = []
    while len(results) < len(calls):
        worker = _borrow()
        try:
            replies, stopped = worker.run(calls[len(results) :], TIMEOUT_S)
        except BaseException:  # interrupted mid-batch (KeyboardInterrupt too): its replies would be out of step
            worker.kill()
            raise
        if stopped is None:
            _give_back(worker)
        else:
            worker.kill()
        for reply in replies:
            if "error" in reply:  # a bug in kdflow.curation.verify_worker, not a property of the answer
                raise RuntimeError(f"math-verify failed on {_described(calls[len(results)])}: {reply['error']}")
            results.append(reply["ok"])
        if stopped is not None:
            results.append(
                VerifyTimeout(
                    f"math-verify gave no verdict on {_described(calls[len(results)])} "
                    f"({stopped}); the bound is kdflow.curation.verify.TIMEOUT_S = {TIMEOUT_S:g} s"
                )
            )
    return results


def _described(call: tuple[str, list], limit: int = 120) -> str:
    """``judge('so #### 9^9^9^9', '72')``, each text cut to ``limit`` characters."""
    op, args = call
    cut = [repr(a) if len(a) <= limit else f"{a[:limit]!r}... ({len(a)} characters)" for a in args]
    return f"{op}({', '.join(cut)})"


def _one(op: str, *args):
    (result,) = run_calls([(op, list(args))])
    if isinstance(result, VerifyTimeout):
        raise result
    return result


def final_answer(text: str) -> str | None:
    """The final answer as a string (math-verify's normalised form), or None when there is none.
    ``VerifyTimeout`` when math-verify runs past TIMEOUT_S on it."""
    if not text or not text.strip():
        return None
    return _one("final_answer", text)


def judge(text: str, gold) -> Verdict:
    """``VerifyTimeout`` when math-verify runs past TIMEOUT_S on the text or the comparison."""
    if not text or not text.strip():
        return Verdict.no_answer
    return Verdict(_one("judge", text, str(gold)))


def check_answer(text: str, gold) -> bool:
    return judge(text, str(gold)) is Verdict.correct


# ---- self-consistency -----------------------------------------------------------------------------------


def select(
    samples: list[dict], policy: Policy, k: int = 1, length: Callable[[dict], int] = lambda r: len(r["text"])
) -> list[int]:
    """Indices (into ``samples``) of the samples one prompt keeps under ``policy``; all of ``samples`` qualify.
    Shorter wins because, among equally correct rationales, the short one is the cheaper thing to imitate."""
    order = sorted(range(len(samples)), key=lambda i: (length(samples[i]), i))
    if policy is Policy.all:
        return order
    if policy is Policy.shortest:
        return order[:1]
    chosen, seen = [], set()
    for i in order:
        if samples[i]["text"] not in seen and len(chosen) < k:
            chosen.append(i)
            seen.add(samples[i]["text"])
    return chosen


def majority(
    texts: list[str],
    check: Callable[[str, object], bool],
    extract: Callable[[str], object],
    gave_up: dict[int, str] | None = None,
) -> int | None:
    """The index of one text of the strict-plurality answer class, or None (no answers, or a tie). Two texts
    vote together when ``check`` accepts one against the other's extracted answer, so with this module's
    ``check_answer`` ``72`` and ``72.0`` are one vote class, and with the demo's exact checker equal integers are.

    A text that math-verify cannot finish on (``VerifyTimeout``) casts no vote; its index and why go to
    ``gave_up``. When comparing two texts times out, each is tried alone (against ``0``) to find which one
    math-verify cannot finish, so that ``9^9^9^9`` neither wins alone nor takes a sound answer down with it."""
    gave_up = {} if gave_up is None else gave_up
    answers = {}
    for i, text in enumerate(texts):
        try:
            answers[i] = extract(text)
        except VerifyTimeout as e:
            gave_up[i] = str(e)
    while (classes := _vote(texts, answers, check, gave_up)) is None:
        pass  # a comparison timed out and someone was blamed: vote again without them
    sizes = sorted((len(members) for _, members in classes), reverse=True)
    if not sizes or (len(sizes) > 1 and sizes[0] == sizes[1]):
        return None
    return next(members[0] for _, members in classes if len(members) == sizes[0])


def _vote(
    texts: list[str], answers: dict[int, object], check: Callable[[str, object], bool], gave_up: dict[int, str]
) -> list[tuple[object, list[int]]] | None:
    """The answer classes (the first member's answer, members), or None after a timeout added to ``gave_up``."""
    classes: list[tuple[object, list[int]]] = []
    for i, answer in answers.items():
        if answer is None or i in gave_up:
            continue
        for first, members in classes:
            try:
                same = check(texts[i], first)
            except VerifyTimeout as e:
                gave_up.update(_blame([i, members[0]], texts, check) or {i: str(e)})
                return None
            if same:
                members.append(i)
                break
        else:
            classes.append((answer, [i]))
    return classes


def _blame(indices: list[int], texts: list[str], check: Callable[[str, object], bool]) -> dict[int, str]:
    """Those of ``indices`` whose text math-verify cannot finish on by itself, with why."""
    blamed = {}
    for i in indices:
        try:
            check(texts[i], "0")
        except VerifyTimeout as e:
            blamed[i] = str(e)
    return blamed
