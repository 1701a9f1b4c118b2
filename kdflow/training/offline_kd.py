"""Offline white-box KD: a TRL SFTTrainer that trains a student from a logit cache (kdflow/logit_cache/format.py).

TRL's distillation trainers all need a live teacher; this one reads the teacher's top-k distributions from
disk, so the teacher is never in memory while the student trains. Per batch:

    loss = α · CE(teacher's tokens) + (1 − α) · T² · D(teacher ‖ student)

at the completion positions only (the prompt and padding are masked out of both terms, which are averaged
over the same positions), with D one of ``losses.Divergence`` and the top-k tail handled as in
``losses.sparse_kd_loss`` (k + 1 buckets). Both terms are logged apart, per logging step (``ce_loss``,
``kd_loss``, and their ratio ``kd_ce_ratio``), so a KD term 1000× smaller than the CE is seen, not guessed; so are
the top-k diagnostics (``kdflow.training.topk_diagnostics``: the teacher's kept and tail mass, the share of positions
whose student top-1 lies outside the teacher's top-k), from tensors the loss already holds, under no_grad.

At a large vocabulary the logits are never built whole: the decoder runs without its LM head, the answer positions'
hidden states are gathered, and both terms come from kdflow.training.chunked_loss, one chunk of positions at a
time (same values). Where one chunk would hold every position anyway (the demo's 52-token vocabulary), or where the
model's logits need more than its head (a logit softcap or scale; ``kdflow.training.head.dense_reason``), the loss is
the dense one.

Alignment: the training rows *are* the cache's rows — each row's token ids come from the cache, and the
collator fetches the teacher's distributions by row id (never by step or batch position), checking the
ids again, so shuffling, epochs and resumes cannot misalign them. Packing would merge rows and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

from kdflow.config.kd import Divergence, OfflineKD, check_settings
from kdflow.logit_cache.reader import LogitCache
from kdflow.training.chunked_loss import Teacher, head_losses
from kdflow.training.head import final_hidden_states, fused_head
from kdflow.training.losses import IGNORE_INDEX, cross_entropy, reduce, sparse_kd_loss
from kdflow.training.topk_diagnostics import outside_topk, position_means, window_ratio

TEACHER_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_tail", "teacher_mask")


def check_unpacked(config, why: str) -> None:
    """Rows stay whole: TRL keeps the extra columns (row id, start) and neither re-tokenizes nor packs them."""
    if config.packing:
        raise ValueError(f"training.packing: true merges rows into one sequence; {why}: set packing: false")
    config.remove_unused_columns = False
    config.dataset_kwargs = {"skip_prepare_dataset": True}


KD_SETTINGS = ("divergence", "alpha", "temperature", "beta", "skew")  # the recipe's names, checked by its model


@dataclass
class OfflineKDConfig(SFTConfig):
    """SFTConfig and the offline KD loss's settings (the recipe's ``kd`` section, method offline, by the same names):

    ``alpha · CE(teacher's tokens) + (1 − alpha) · T² · D(teacher ‖ student)`` at ``temperature`` T, with D the
    ``divergence`` (``beta``: JSD's β; ``skew``: the λ of skew_kl / skew_reverse_kl), the teacher's side read from
    the logit cache in ``logit_cache``.
    """

    logit_cache: str | None = field(default=None, metadata={"help": "the logit cache's folder"})
    divergence: Divergence = field(default=Divergence.forward_kl, metadata={"help": "D(teacher ‖ student)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the cross-entropy term; 1 - alpha on KD"})
    temperature: float = field(default=1.0, metadata={"help": "softmax(z / T) on both sides, KD scaled by T²"})
    beta: float = field(default=0.5, metadata={"help": "JSD's β (divergence jsd)"})
    skew: float = field(default=0.1, metadata={"help": "λ of skew_kl / skew_reverse_kl"})

    def __post_init__(self):
        self.divergence = Divergence(self.divergence)
        check_settings(type(self).__name__, OfflineKD, {n: getattr(self, n) for n in KD_SETTINGS})
        if self.logit_cache is None:
            raise ValueError("OfflineKDConfig.logit_cache: give the logit cache's folder (the capture stage's output)")
        check_unpacked(self, "that breaks their alignment with the cached teacher logits")
        super().__post_init__()


def cache_rows(cache: LogitCache, row_ids: list[str] | None = None, max_length: int | None = None) -> list[dict]:
    """The training rows of a cache: ``{row_id, input_ids, start}``, truncated to ``max_length`` tokens.

    ``row_ids``: a subset (e.g. a transfer-set size), default every row. A row whose completion would be cut
    away entirely by ``max_length`` is an error, not a silently empty example.
    """
    wanted = set(row_ids) if row_ids is not None else None
    rows = []
    for r in cache.iter_rows():
        if wanted is not None and r.row_id not in wanted:
            continue
        ids = r.input_ids.tolist()
        if max_length is not None and len(ids) > max_length:
            if r.start + 1 >= max_length:
                raise ValueError(
                    f"row {r.row_id!r}: its prompt alone is {r.start + 1} tokens, max_length is "
                    f"{max_length}; raise training.max_length"
                )
            ids = ids[:max_length]
        rows.append({"row_id": r.row_id, "input_ids": ids, "start": r.start})
    if wanted is not None and len(rows) != len(wanted):
        missing = sorted(wanted - {r["row_id"] for r in rows})[:5]
        raise KeyError(f"{len(wanted) - len(rows)} requested rows are not in the cache {cache.folder}, e.g. {missing}")
    return rows


class CachedLogitsCollator:
    """Pads a batch of cache rows and carries the teacher's top-k, aligned to the logit positions.

    Out: ``input_ids``, ``attention_mask``, ``labels`` (B, L) — labels are the completion tokens, -100
    elsewhere, unshifted as in transformers — and ``teacher_ids``, ``teacher_logprobs`` (B, L, k),
    ``teacher_tail`` (B, L), ``teacher_mask`` (B, L): True at logit position t where the cache holds the
    teacher's distribution of token t + 1.
    """

    def __init__(self, cache: LogitCache, pad_token_id: int):
        self.cache, self.pad = cache, pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = []
        for e in examples:
            ids, row = torch.as_tensor(e["input_ids"], dtype=torch.long), self.cache[e["row_id"]]
            if not torch.equal(row.input_ids[: len(ids)], ids):
                raise ValueError(
                    f"row {e['row_id']!r}: its token ids differ from the logit cache's; the dataset "
                    "and the cache are out of step (rebuild the rows with kd_trainer.cache_rows)"
                )
            rows.append((ids, e["start"], row))
        return teacher_batch(rows, self.cache.k, self.pad)


def teacher_batch(rows: list[tuple[torch.Tensor, int, object]], k: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Sequences and the teacher's top-k at their completion positions -> a padded batch (the collator's "Out").

    ``rows``: ``(input_ids (n,), start, teacher)`` with ``teacher.ids``, ``teacher.logprobs`` (m, k) and
    ``teacher.tail`` (m,) tensors for logit positions ``start … start + m − 1``; positions past the
    (truncated) sequence are dropped. Shared by the cache's rows and on-policy samples scored live."""
    B, L = len(rows), max(len(ids) for ids, _, _ in rows)
    out = {
        "input_ids": torch.full((B, L), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(B, L, dtype=torch.long),
        "labels": torch.full((B, L), IGNORE_INDEX, dtype=torch.long),
        "teacher_ids": torch.zeros(B, L, k, dtype=torch.long),
        "teacher_logprobs": torch.zeros(B, L, k),
        "teacher_tail": torch.zeros(B, L),
        "teacher_mask": torch.zeros(B, L, dtype=torch.bool),
    }
    for b, (ids, start, row) in enumerate(rows):
        n = len(ids)
        out["input_ids"][b, :n], out["attention_mask"][b, :n] = ids, 1
        out["labels"][b, start + 1 : n] = ids[start + 1 :]
        # teacher position j is logit position start + j; positions cut off by truncation are dropped
        keep = min(len(row.ids), n - 1 - start)
        span = slice(start, start + keep)
        out["teacher_ids"][b, span] = torch.as_tensor(row.ids[:keep])
        out["teacher_logprobs"][b, span] = torch.as_tensor(row.logprobs[:keep])
        out["teacher_tail"][b, span] = torch.as_tensor(row.tail[:keep])
        out["teacher_mask"][b, span] = True
    return out


class CachedKDTrainer(SFTTrainer):
    """SFTTrainer whose loss mixes CE on the teacher's tokens with a KD term on its cached distributions, as its
    ``args`` (an ``OfflineKDConfig``) say."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The loss is a mean over this micro-batch's positions: let Trainer divide it by the accumulation steps
        # (it skips that for models that take num_items_in_batch, which this loss does not use).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

    @property
    def alpha(self) -> float:
        return self.args.alpha

    @property
    def kd_temperature(self) -> float:
        return self.args.temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = {key: inputs.pop(key) for key in TEACHER_KEYS}
        labels = inputs.pop("labels")
        targets = labels[:, 1:]  # logits[:, t] predicts token t + 1
        kd_at = teacher["teacher_mask"][:, :-1] if self.alpha < 1.0 else torch.zeros_like(targets, dtype=torch.bool)
        at = (targets != IGNORE_INDEX) | kd_at
        head = None if return_outputs else fused_head(model, int(at.sum()))
        if head is not None:
            # The decoder without the LM head (the head sees one position); then the head on the answer positions
            # only, chunk by chunk (kdflow.training.chunked_loss): never (B, L, V) logits, nor (N, V) at once.
            outputs, hidden = final_hidden_states(model, inputs)
            kd_teacher = (
                None
                if self.alpha == 1.0
                else Teacher(
                    *(teacher[key][:, :-1][at] for key in TEACHER_KEYS[:3]),
                    self.args.divergence,
                    self.kd_temperature,
                    self.args.beta,
                    self.args.skew,
                )
            )
            ce_rows, kd_rows = head_losses(
                hidden[:, :-1][at], head.weight, head.bias, labels=targets[at], teacher=kd_teacher
            )
            ce = reduce(ce_rows, targets[at] != IGNORE_INDEX, "mean")
            kd = None if kd_rows is None else reduce(kd_rows, kd_at[at], "mean")
            if kd_teacher is not None:  # where the student's top-1 lies came out of the same chunks
                diagnostics = position_means(
                    kd_teacher.logprobs, kd_teacher.tail, kd_teacher.student_outside, head.weight.shape[0], kd_at[at]
                )
        else:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            logits = outputs.logits[:, :-1]
            ce = cross_entropy(logits, targets)
            kd = None
            if self.alpha < 1.0:
                # only the completion positions' logits: (N, V), never the whole batch's (B, L, V) twice over
                kd_teacher = [teacher[key][:, :-1][kd_at] for key in TEACHER_KEYS[:3]]
                kd = sparse_kd_loss(
                    logits[kd_at],
                    *kd_teacher,
                    self.args.divergence,
                    self.kd_temperature,
                    beta=self.args.beta,
                    skew=self.args.skew,
                )
                with torch.no_grad():  # the argmax of the logits already there: (B, L) ids, no (N, V) copy
                    outside = outside_topk(logits.argmax(-1)[kd_at], kd_teacher[0])
                    diagnostics = position_means(*kd_teacher[1:], outside, logits.shape[-1])
        loss = ce if kd is None else self.alpha * ce + (1.0 - self.alpha) * kd
        mode = "train" if model.training else "eval"
        self._metrics[mode]["ce_loss"].append(ce.item())
        if kd is not None:
            self._metrics[mode]["kd_loss"].append(kd.item())
            for name, value in diagnostics.items():
                self._metrics[mode][name].append(value)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time=None):
        """TRL averages each metric over the logging window; the KD/CE ratio is taken of those means, not averaged."""
        mode = "train" if self.model.training else "eval"
        prefix = "" if mode == "train" else "eval_"
        ratio = window_ratio(self._metrics[mode])
        super().log({**logs, **{prefix + k: v for k, v in ratio.items()}}, start_time)


def train_offline_kd(
    model,
    tokenizer,
    rows: list[dict] | None,
    config: OfflineKDConfig,
    out_dir: Path,
    callbacks: list | None = None,
    peft_config=None,
) -> list[dict]:
    """Train ``model`` in place from the logit cache at ``config.logit_cache`` on the cache's rows named by
    ``rows`` (dicts with a ``row_id``; None: every row), save it and the tokenizer to ``out_dir/model``; returns the
    log history (``loss``, ``ce_loss``, ``kd_loss`` per logging step).

    The cache must have been captured with this tokenizer and chat template (checked before any work).
    ``peft_config``: train LoRA adapters only; both loss terms then come from the adapted model's logits.
    """
    from datasets import Dataset, disable_progress_bars

    from kdflow.training.sft import fit

    disable_progress_bars()
    cache = LogitCache.open(config.logit_cache, expect_tokenizer=tokenizer, expect_vocab_size=model.config.vocab_size)
    data = cache_rows(cache, None if rows is None else [r["row_id"] for r in rows], config.max_length)
    trainer = CachedKDTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(data),
        processing_class=tokenizer,
        data_collator=CachedLogitsCollator(cache, pad_id(tokenizer)),
        callbacks=callbacks,
        peft_config=peft_config,
    )
    return fit(trainer, model, tokenizer, out_dir)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
