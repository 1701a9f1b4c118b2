"""One model's quality on a split, without Prefect: accuracy (greedy), pass@k where asked, perplexity on the gold
rationales and agreement with the teacher — what the evaluate stage records."""

from __future__ import annotations

import json
import time
from pathlib import Path

from kdflow.config.evaluation import EvaluationSection
from kdflow.evaluation.quality import accuracy, reference_sequences, same_vocabulary, sampled_pass_at_k, score_reference
from kdflow.evaluation.quantize import count_params, load  # load: int8 folders too (evaluated like any model)

# The evaluate stage's files, one output per model: every answer with its verdict, and the figures.
PREDICTIONS, METRICS = "predictions.parquet", "metrics.json"


def read_metrics(folder: str | Path) -> dict:
    """An evaluation output's figures, from its metrics.json: a file the manifest's sha256 covers (an edited file is
    found and the output rebuilt), not the copy in the manifest itself, which nothing checks."""
    return json.loads((Path(folder) / METRICS).read_text())


def reference_metrics(
    net,
    tokenizer,
    teacher_dir: str | None,
    rows: list[dict],
    template: str,
    batch_size: int,
    no_teacher: str | None = None,
    dtype=None,
) -> dict:
    """Perplexity on the split's gold rationales, and agreement with the teacher where the vocabularies match.
    ``teacher_dir`` None: the model is the teacher (agreement 1 and KL 0 by definition, and measured so);
    ``no_teacher``: why there are no teacher weights to agree with (an API teacher): perplexity only."""
    sequences = reference_sequences(tokenizer, rows, template)
    if no_teacher:
        return {**score_reference(net, tokenizer, sequences, batch_size), "agreement_skipped": no_teacher}
    if teacher_dir is None:
        return score_reference(net, tokenizer, sequences, batch_size, teacher=net)
    t_net, t_tokenizer = load(teacher_dir, dtype)
    if not same_vocabulary(tokenizer, t_tokenizer):
        return {
            **score_reference(net, tokenizer, sequences, batch_size),
            "agreement_skipped": "the student's tokenizer differs from the teacher's",
        }
    return score_reference(net, tokenizer, sequences, batch_size, teacher=t_net)


def evaluate(
    model_dir: str,
    teacher_dir: str | None,
    rows: list[dict],
    template: str,
    check,
    section: EvaluationSection,
    no_teacher: str | None = None,
) -> tuple[dict, list[dict]]:
    """(metrics, one prediction per row) for the model in ``model_dir``; ``check(text, gold) -> bool``;
    ``no_teacher``: as in ``reference_metrics``."""
    net, tokenizer = load(model_dir, section.dtype)
    start = time.perf_counter()
    acc, predictions = accuracy(net, tokenizer, rows, template, check, section.max_new_tokens, section.batch_size)
    metrics = {"accuracy": acc, "params": count_params(net), "rows": len(rows), "split": section.split}
    if section.pass_at_k:
        metrics["pass_at_k"], correct = sampled_pass_at_k(
            net,
            tokenizer,
            rows,
            template,
            check,
            section.pass_at_k,
            section.pass_samples,
            section.temperature,
            section.max_new_tokens,
            section.batch_size,
        )
        metrics |= {"k": section.pass_at_k, "samples": section.pass_samples}
        predictions = [{**p, "correct_samples": c} for p, c in zip(predictions, correct)]
    metrics |= reference_metrics(
        net, tokenizer, teacher_dir, rows, template, section.batch_size, no_teacher, section.dtype
    )
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    return metrics, predictions
