"""On-policy distillation with the teacher out of the training process (GKD, Agarwal et al. 2024; MiniLLM, Gu et
al. 2024): each step the student samples completions for a batch of prompts, the teacher scores exactly those
tokens, and the student minimises the per-token divergence (reverse KL by default)

    loss = mean over sampled completion positions t of  D(p_teacher(· | y<t) ‖ q_student(· | y<t))

over the teacher's top-k + one tail bucket (``losses.sparse_kd_loss``, the same loss offline KD uses on a logit
cache). The teacher scores in a process of its own or on a vLLM server (``kdflow.logit_cache.scoring``): its
weights are never in this process's memory, which is what lets a teacher far larger than the student be used.

With ``lmbda < 1`` a share ``1 − lmbda`` of the micro-batches trains on the same rows' cached teacher answers and
their cached top-k instead (off-policy, GKD's λ); which ones is drawn from (seed, step), so a resumed run draws the
same.

Why a Trainer subclass (of ``CachedKDTrainer``, itself TRL's SFTTrainer) and not a plain torch loop: checkpoints
with the optimizer, scheduler and RNG states, resume, the progress lines and LoRA come with it (``sft.fit``), and
the loss is the offline trainer's own. Only ``training_step`` changes: the batch it is handed (prompts) is replaced
by the student's scored samples, as TRL's GKD trainer does.

An exact step does not wait for the whole batch's scores: the teacher answers part by part (a padded batch of
its scoring process, a request to vLLM), and the student's forward and backward run on each part while the teacher
scores the next, each part's loss weighted by its share of the batch's positions — the same gradient as one
backward over the batch (``streamed_step``). Only the teacher's first part and the last part's training are not
hidden. (In distributed training each rank would then run as many backwards as its teacher sent parts — all-reduces
that differ between ranks — so there a step waits for the whole batch.)

With ``overlap`` the teacher scores batch t+1 while the student trains on batch t (asynchronous, as PipelineRL and
Noukhovitch et al. 2024's asynchronous RLHF): each step samples a new batch with the current weights, hands it to
the teacher and trains on the batch handed over the step before, whose scores came back meanwhile. The samples are
then one on-policy batch old (drawn by the weights before the last update), a deliberate change of method for
throughput: the teacher's forward, on other cores or another machine, hides behind the student's sampling and
training instead of adding to them. The first on-policy step (and the first after a resume) fills the pipeline
by sampling its prompts twice; the last batch handed over is scored and left untrained.

With several routed teachers (a recipe's ``teachers`` and ``routing``) each sample is scored by the teacher its
prompt's row is routed to: one scoring process per teacher, behind one ``RoutedScorer``; the teachers answer one
after the other, so a step waits for the sum of their times. Each sample carries its row's id for that
(``OnPolicyCollator``'s ``row_ids``).

Accounting (``OnPolicyAccounting``): student tokens sampled, teacher tokens scored (completion positions whose top-k
came back), and wall time split into sample / score / train (the rest of each optimizer step: forward, backward,
optimizer); ``score_s`` is the time training waited on the teacher, ``teacher_s`` the teacher's round trips
themselves, from the request to its last part (the part of ``teacher_s`` not in ``score_s`` was hidden: behind
training on the parts already in, or, with ``overlap``, behind the next batch's sampling and training). It is
logged with every loss, saved in each checkpoint (a resumed run continues its counts) and written to
``on_policy.json`` beside the model; with routed teachers also each teacher's samples and tokens scored
(``by_teacher``, not logged).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback
from trl import SFTConfig

from kdflow.config.fields import redact_url
from kdflow.config.kd import Divergence, OnPolicyKD, check_settings
from kdflow.logit_cache.format import TopK
from kdflow.logit_cache.reader import LogitCache
from kdflow.logit_cache.scoring import TeacherScoringError
from kdflow.logit_cache.topk import EncodedRow, encode_row
from kdflow.teacher.routing import token_shares
from kdflow.training.offline_kd import (
    CachedKDTrainer,
    CachedLogitsCollator,
    cache_rows,
    check_unpacked,
    pad_id,
    teacher_batch,
)
from kdflow.training.on_policy_scoring import live_scorer, routed_rows
from kdflow.training.topk_diagnostics import PER_POSITION

ACCOUNTING_FILE = "on_policy.json"  # in each checkpoint, and beside the trained model


@dataclasses.dataclass
class OnPolicyConfig(SFTConfig):
    """SFTConfig and on-policy KD's settings (the recipe's ``kd`` section, method on_policy, by the same names; see
    ``kdflow.config.kd.OnPolicyKD`` for each): the ``teacher``'s folder (scored as ``teacher_backend`` says, never
    loaded here), and the ``logit_cache`` folder for the off-policy share ``1 − lmbda`` of the steps."""

    teacher: str | None = dataclasses.field(default=None, metadata={"help": "the teacher's model folder"})
    logit_cache: str | None = dataclasses.field(default=None, metadata={"help": "the logit cache (lmbda < 1)"})
    divergence: Divergence = dataclasses.field(default=Divergence.reverse_kl, metadata={"help": "per-token D"})
    beta: float = dataclasses.field(default=0.5, metadata={"help": "JSD's β (divergence jsd)"})
    skew: float = dataclasses.field(default=0.1, metadata={"help": "λ of skew_kl / skew_reverse_kl"})
    lmbda: float = dataclasses.field(default=1.0, metadata={"help": "share of steps on the student's samples"})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "the student's sampling temperature"})
    max_new_tokens: int = dataclasses.field(default=128, metadata={"help": "tokens sampled per prompt"})
    k: int = dataclasses.field(default=20, metadata={"help": "the teacher's top-k kept per scored position"})
    teacher_backend: str = dataclasses.field(default="hf", metadata={"help": "hf or vllm"})
    base_url: str | None = dataclasses.field(default=None, metadata={"help": "a vLLM server serving the teacher"})
    concurrency: int = dataclasses.field(default=8, metadata={"help": "requests in flight to the vLLM server"})
    overlap: bool = dataclasses.field(default=False, metadata={"help": "score batch t+1 while training on t"})
    timeout_s: float = dataclasses.field(default=600.0, metadata={"help": "seconds the teacher may stay silent"})
    batch_tokens: int = dataclasses.field(default=1024, metadata={"help": "padded tokens per HF scoring pass"})

    def __post_init__(self):
        self.divergence = Divergence(self.divergence)
        settings = {f: getattr(self, f) for f in OnPolicyKD.model_fields if f != "method"}
        check_settings(type(self).__name__, OnPolicyKD, {"method": "on_policy", **settings})
        if self.teacher is None:
            raise ValueError("OnPolicyConfig.teacher: give the teacher's model folder")
        if self.lmbda < 1.0 and self.logit_cache is None:
            raise ValueError(f"lmbda {self.lmbda} < 1 trains a share of the steps on the logit cache: pass it")
        check_unpacked(self, "an on-policy student samples each prompt's completion on its own")
        super().__post_init__()

    def __getstate__(self):  # checkpoints pickle the config: the teacher's URL goes without user:password@
        return {**self.__dict__, "base_url": redact_url(self.base_url)}

    def to_dict(self):  # what logs and trackers show: likewise
        return {**super().to_dict(), "base_url": redact_url(self.base_url)}


@dataclasses.dataclass
class OnPolicyAccounting:
    sample_s: float = 0.0
    score_s: float = 0.0
    train_s: float = 0.0
    teacher_s: float = 0.0
    student_tokens_sampled: int = 0
    teacher_tokens_scored: int = 0
    on_policy_batches: int = 0
    off_policy_batches: int = 0
    by_teacher: dict = dataclasses.field(default_factory=dict)  # routed teachers: name -> {samples, tokens} scored

    def count(self, rows: list[EncodedRow], scored: list[TopK], routes: dict[str, str] | None) -> None:
        """The teacher's top-k of ``rows`` came back: its positions, and with ``routes`` (row id -> teacher) each
        teacher's samples and positions."""
        tokens = [len(t.ids) for t in scored]
        self.teacher_tokens_scored += sum(tokens)
        for row, n in zip(rows, tokens) if routes is not None else ():
            mine = self.by_teacher.setdefault(routes[row.row_id], {"samples": 0, "tokens": 0})
            mine["samples"], mine["tokens"] = mine["samples"] + 1, mine["tokens"] + n

    def rounded(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


class OnPolicyCollator:
    """Left-padded prompts (``prompt_ids``, ``prompt_mask``: (B, P)) for the student to continue, and their rows' ids
    (``row_ids``, which name the samples: routed teachers score each by its row); with a logit cache, also the
    rows' cached batch (``CachedLogitsCollator``) for the off-policy micro-batches."""

    def __init__(self, pad_token_id: int, cache: LogitCache | None = None):
        self.pad = pad_token_id
        self.cached = CachedLogitsCollator(cache, pad_token_id) if cache is not None else None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [e["input_ids"][: e["start"] + 1] for e in examples]
        P = max(len(p) for p in prompts)
        out = {
            "prompt_ids": torch.full((len(prompts), P), self.pad, dtype=torch.long),
            "prompt_mask": torch.zeros(len(prompts), P, dtype=torch.long),
        }
        for b, p in enumerate(prompts):
            out["prompt_ids"][b, P - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            out["prompt_mask"][b, P - len(p) :] = 1
        out["row_ids"] = [e["row_id"] for e in examples]
        return out | (self.cached(examples) if self.cached is not None else {})


def samples(prompts: torch.Tensor, mask: torch.Tensor, generated: torch.Tensor, eos_id: int) -> list[EncodedRow]:
    """``generate``'s output -> one ``EncodedRow`` per sample: its prompt without padding, then its tokens up to
    and including the first end-of-turn (all of them if it never ended). ``start`` = the prompt's length − 1."""
    rows = []
    for b in range(len(prompts)):
        prompt = prompts[b][mask[b].bool()].tolist()
        new = generated[b, prompts.shape[1] :].tolist()
        if eos_id in new:
            new = new[: new.index(eos_id) + 1]
        rows.append(EncodedRow(str(b), np.asarray(prompt + new, dtype=np.int64), len(prompt) - 1))
    return rows


class StepClock(TrainerCallback):
    """Each optimizer step's wall time, less what sampling and scoring took in it, is training time."""

    def __init__(self, accounting: OnPolicyAccounting):
        self.accounting, self.began, self.outside = accounting, 0.0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.began, self.outside = time.perf_counter(), self.accounting.sample_s + self.accounting.score_s

    def on_step_end(self, args, state, control, **kwargs):
        spent = self.accounting.sample_s + self.accounting.score_s - self.outside
        self.accounting.train_s += time.perf_counter() - self.began - spent

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / ACCOUNTING_FILE).write_text(json.dumps(self.accounting.rounded()))


class OnPolicyTrainer(CachedKDTrainer):
    """``CachedKDTrainer`` (α = 0: the divergence alone) whose batches are the student's own scored samples."""

    alpha = 0.0  # the divergence alone
    kd_temperature = 1.0  # at T = 1: the config's temperature is the student's sampling temperature

    def __init__(self, *args, scorer, eos_token_id: int, pad_token_id: int, routes: dict | None = None, **kwargs):
        """``routes``: with several routed teachers, each row id's teacher (for the accounting; ``scorer`` routes)."""
        super().__init__(*args, **kwargs)
        self.scorer, self.eos, self.pad, self.routes = scorer, eos_token_id, pad_token_id, routes
        self.accounting = OnPolicyAccounting()
        self.add_callback(StepClock(self.accounting))
        self._step, self._micro = -1, 0
        self._weight = 1.0  # the share of the micro-batch's positions in the part being trained (streamed_step)
        # overlap: one thread talks to the teacher (a pipe or HTTP: it waits without the GIL) while this one trains
        self._teacher: ThreadPoolExecutor | None = None
        self._pending: tuple[list[EncodedRow], Future] | None = None

    def train(self, resume_from_checkpoint=None, **kwargs):
        saved = Path(resume_from_checkpoint or "") / ACCOUNTING_FILE
        if resume_from_checkpoint and saved.is_file():  # the counts so far, not from zero
            self.accounting.__dict__.update(json.loads(saved.read_text()))
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            if self._teacher is not None:  # the last batch handed over: let the teacher finish it, then stop
                self._teacher.shutdown(wait=True, cancel_futures=True)
                self._teacher, self._pending = None, None

    def on_policy_now(self) -> bool:
        """This micro-batch trains on the student's samples with probability λ, drawn from (seed, step, micro)."""
        lmbda = self.args.lmbda
        if lmbda >= 1.0 or lmbda <= 0.0:
            return lmbda >= 1.0
        if self.state.global_step != self._step:
            self._step, self._micro = self.state.global_step, 0
        self._micro += 1
        return random.Random(f"{self.args.seed}:{self._step}:{self._micro}").random() < lmbda

    def training_step(self, model, inputs, num_items_in_batch=None):
        prompts, mask = inputs.pop("prompt_ids"), inputs.pop("prompt_mask")
        row_ids = inputs.pop("row_ids")  # the samples' names: routed teachers score each by its row
        if not self.on_policy_now():
            self.accounting.off_policy_batches += 1
            return super().training_step(model, inputs, num_items_in_batch)
        self.accounting.on_policy_batches += 1
        if self.args.overlap or self.accelerator.distributed_type != DistributedType.NO:
            # Streamed parts would mean a backward per part: in DDP an all-reduce each, as many as the teacher's
            # parts on that rank — which differ between ranks and would hang them. One backward per micro-batch.
            batch = self.scored_samples(model, prompts, mask, row_ids)
            return super().training_step(model, batch, num_items_in_batch)
        return self.streamed_step(model, prompts, mask, row_ids, num_items_in_batch)

    def streamed_step(
        self, model, prompts: torch.Tensor, mask: torch.Tensor, row_ids: list[str], num_items_in_batch
    ) -> torch.Tensor:
        """Exact on-policy, trained part by part as the teacher's answers come in: while the student's forward and
        backward run on one part of the samples, the teacher scores the next (``scorer.parts``: a padded batch of
        the HF scoring process, a request to vLLM). Each part's loss, a mean over its positions, is weighted by
        its share of the micro-batch's positions, so the gradients add up to the whole micro-batch's mean; only
        float rounding differs (tested). The wait is the teacher's first part and whatever training outruns."""
        rows = self.sampled(model, prompts, mask, row_ids)
        positions = sum(len(r.input_ids) - 1 - r.start for r in rows)
        began, loss, weights = time.perf_counter(), None, []
        parts = self.scorer.parts(rows)
        try:
            while True:
                waited = time.perf_counter()
                part = self.teacher_answer(lambda: next(parts, None))
                self.accounting.score_s += time.perf_counter() - waited
                if part is None:
                    break
                indices, scored = part
                self.accounting.count([rows[i] for i in indices], scored, self.routes)
                batch = teacher_batch(
                    [(torch.from_numpy(rows[i].input_ids), rows[i].start, t) for i, t in zip(indices, scored)],
                    self.args.k,
                    self.pad,
                )
                self._weight = int(batch["teacher_mask"].sum()) / positions
                weights.append(self._weight)
                part_loss = super().training_step(model, batch, num_items_in_batch)
                loss = part_loss if loss is None else loss + part_loss
        finally:
            self._weight = 1.0
            parts.close()
            self.accounting.teacher_s += time.perf_counter() - began
        if abs(sum(weights) - 1.0) > 1e-6:
            raise TeacherScoringError(
                f"the teacher scored {sum(weights):.1%} of the sampled positions at step "
                f"{self.state.global_step}; every sampled token must be scored"
            )
        # one logged value per micro-batch, as unstreamed: its weighted mean (the diagnostics are means over positions
        # too, appended with each part's kd_loss)
        for name in ("ce_loss", "kd_loss", *PER_POSITION):
            values = self._metrics["train"][name]
            values[-len(weights) :] = [sum(w * v for w, v in zip(weights, values[-len(weights) :]))]
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._weight == 1.0:
            return loss
        return (loss[0] * self._weight, loss[1]) if return_outputs else loss * self._weight

    @torch.no_grad()
    def sample(self, model, prompts: torch.Tensor, mask: torch.Tensor) -> list[EncodedRow]:
        student = self.accelerator.unwrap_model(model)
        was_training = student.training
        student.eval()
        room = self.args.max_length - prompts.shape[1] if self.args.max_length else self.args.max_new_tokens
        # top_k 0 and top_p 1: sample from the student's whole distribution (generate's defaults would cut it).
        out = student.generate(
            input_ids=prompts,
            attention_mask=mask,
            do_sample=True,
            temperature=self.args.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=min(self.args.max_new_tokens, room),
            eos_token_id=self.eos,
            pad_token_id=self.pad,
        )
        student.train(was_training)
        return samples(prompts.cpu(), mask.cpu(), out.cpu(), self.eos)

    def timed_score(self, rows: list[EncodedRow]) -> list[TopK]:
        """The teacher's top-k of ``rows``; its round trip counted in ``teacher_s``, its positions in
        ``teacher_tokens_scored`` (from the teacher's thread under ``overlap``: one request, so one writer, at a
        time)."""
        began = time.perf_counter()
        try:
            scored = self.scorer.score(rows)
        finally:
            self.accounting.teacher_s += time.perf_counter() - began
        self.accounting.count(rows, scored, self.routes)
        return scored

    def sampled(self, model, prompts: torch.Tensor, mask: torch.Tensor, row_ids: list[str]) -> list[EncodedRow]:
        """The student's samples of ``prompts``, each named by its prompt's row (``row_ids``)."""
        began = time.perf_counter()
        rows = [dataclasses.replace(r, row_id=i) for r, i in zip(self.sample(model, prompts, mask), row_ids)]
        self.accounting.sample_s += time.perf_counter() - began
        self.accounting.student_tokens_sampled += sum(len(r.input_ids) - 1 - r.start for r in rows)
        return rows

    def scored_samples(
        self, model, prompts: torch.Tensor, mask: torch.Tensor, row_ids: list[str]
    ) -> dict[str, torch.Tensor]:
        """This micro-batch's training inputs: the student's samples of ``prompts`` and the teacher's top-k of them
        — or, under ``overlap``, the samples handed to the teacher one on-policy micro-batch ago (and these
        handed over in their place)."""
        if not self.args.overlap:
            rows = self.sampled(model, prompts, mask, row_ids)
            waited = time.perf_counter()
            scored = self.teacher_answer(lambda: self.timed_score(rows))
        else:
            if self._teacher is None:
                self._teacher = ThreadPoolExecutor(1, thread_name_prefix="teacher")
            if self._pending is None:  # an empty pipeline (the first step, a resume): this batch, sampled twice
                first = self.sampled(model, prompts, mask, row_ids)
                self._pending = first, self._teacher.submit(self.timed_score, first)
            fresh = self.sampled(model, prompts, mask, row_ids)
            (rows, answer), waited = self._pending, time.perf_counter()
            # Handed over once the teacher has answered the last batch (it is busy with it until then anyway), so a
            # teacher that failed is never handed another.
            scored = self.teacher_answer(answer.result)
            self._pending = fresh, self._teacher.submit(self.timed_score, fresh)
        self.accounting.score_s += time.perf_counter() - waited
        return teacher_batch(
            [(torch.from_numpy(r.input_ids), r.start, t) for r, t in zip(rows, scored)], self.args.k, self.pad
        )

    def teacher_answer(self, answer) -> list[TopK]:
        try:
            return answer()
        except TeacherScoringError as e:
            done = self.state.global_step  # the finished steps: this one's update has not happened
            raise TeacherScoringError(
                f"{e}\nOn-policy training stopped at step {done + 1}, before its update ({done} "
                f"steps done); its checkpoints are in {self.args.output_dir}: rerun the stage "
                "once the teacher answers again and it resumes from the last one."
            ) from e

    def log(self, logs: dict, start_time=None):
        if "loss" in logs or "train_runtime" in logs:  # figures only: by_teacher goes to on_policy.json
            logs = {**logs, **{k: v for k, v in self.accounting.rounded().items() if k != "by_teacher"}}
        super().log(logs, start_time)


def prompt_rows(tokenizer, rows: list[dict], max_length: int | None) -> list[dict]:
    """The student's prompt-completion rows as ``{row_id, input_ids, start}`` (the logit cache's encoding): the
    prompt is ``input_ids[:start + 1]``. A prompt that leaves no room to sample under ``max_length`` is refused."""
    out = []
    for r in rows:
        e = encode_row(tokenizer, r["row_id"], r["prompt"], r["completion"])
        if max_length is not None and e.start + 1 >= max_length:
            raise ValueError(
                f"row {r['row_id']!r}: its prompt alone is {e.start + 1} tokens, training.max_length is "
                f"{max_length}: nothing is left to sample; raise training.max_length"
            )
        out.append({"row_id": e.row_id, "input_ids": e.input_ids.tolist(), "start": e.start})
    return out


def train_on_policy(
    model,
    tokenizer,
    rows: list[dict],
    config: OnPolicyConfig,
    out_dir: Path,
    callbacks=None,
    peft_config=None,
    teachers: dict[str, str] | None = None,
    served: dict | None = None,
) -> list[dict]:
    """Train ``model`` in place by on-policy KD from the teacher at ``config.teacher`` (scored as ``config`` says,
    never loaded here) on the prompts of ``rows`` (prompt-completion rows with ``row_id``), and save it with the
    tokenizer to ``out_dir/model``. Writes ``out_dir/on_policy.json`` (the accounting) and returns the log history.
    ``peft_config``: as in ``kdflow.training.sft.train_sft``. ``teachers``: several routed teachers' model folders
    by name, in place of ``config.teacher``; each row then names its own in ``teacher``, which scores the student's
    samples of its prompt; ``served``: with ``config.teacher_backend`` vllm, each teacher's own server by name
    (``kdflow.config.teachers.ServedTeacher``)."""
    from datasets import Dataset, disable_progress_bars

    from kdflow.training.sft import checkpoint_folder, fit

    if config.k > model.config.vocab_size:
        # Found here, before the teacher is started: its top-k would fail in the scoring process or the server, and
        # that error's advice (rerun once the teacher answers again) cannot help.
        raise ValueError(
            f"kd.k = {config.k} exceeds the student's vocabulary ({model.config.vocab_size} tokens): "
            f"the teacher's top-k cannot hold more ids than there are; use k <= {model.config.vocab_size}"
        )
    disable_progress_bars()
    cache = None
    if config.lmbda < 1.0:
        cache = LogitCache.open(
            config.logit_cache, expect_tokenizer=tokenizer, expect_vocab_size=model.config.vocab_size
        )
        data = cache_rows(cache, [r["row_id"] for r in rows], config.max_length)
    else:
        data = prompt_rows(tokenizer, rows, config.max_length)
    pad = pad_id(tokenizer)
    routes = routed_rows(rows, teachers) if teachers is not None else None
    log = (
        Path(checkpoint_folder(config) or out_dir) / "teacher-scorer.log"
    )  # kept with the checkpoints when training fails
    log.parent.mkdir(parents=True, exist_ok=True)
    threads, teacher_threads = torch.get_num_threads(), None
    if config.teacher_backend == "hf" and threads > 1:
        # Training and the scoring process run at once (an exact step trains on the parts already scored while the
        # teacher scores the next; overlap trains on one batch while it scores the next): half the cores each.
        # Each with all of them oversubscribes the machine: on 2 cores (2 + 2 threads) a demo on-policy student
        # with overlap took 5m56s for 500 steps, twice the 3m without overlap, and an exact step 452 ms, 237 split.
        teacher_threads = threads // 2
        torch.set_num_threads(threads - teacher_threads)
    with contextlib.ExitStack() as restore:
        restore.callback(torch.set_num_threads, threads)
        scorer = restore.enter_context(
            live_scorer(config, log, teacher_threads, model.config.vocab_size, teachers, routes, served)
        )
        trainer = OnPolicyTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(data),
            processing_class=tokenizer,
            data_collator=OnPolicyCollator(pad, cache),
            callbacks=callbacks,
            peft_config=peft_config,
            scorer=scorer,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
            routes=routes,
        )
        history = fit(trainer, model, tokenizer, out_dir)
    if trainer.accelerator.is_main_process:
        accounting = trainer.accounting.rounded()
        if routes is None:
            del accounting["by_teacher"]
        else:  # each teacher's share of the positions scored: the on-policy counterpart of a logit cache's
            shares = token_shares({name: n["tokens"] for name, n in accounting["by_teacher"].items()})
            for name, n in accounting["by_teacher"].items():
                n["token_share"] = shares[name]
        (out_dir / ACCOUNTING_FILE).write_text(
            json.dumps(
                {**accounting, "teacher_backend": config.teacher_backend, "overlap": config.overlap},
                indent=1,
            )
        )
    return history
