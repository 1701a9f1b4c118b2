"""One model's quality on free text (``source: instructions``), without Prefect: ROUGE-L of its greedy answers against
the references, the references' perplexity, and top-1 agreement and KL(teacher ‖ model) on the teacher's own greedy
answers to the same held-out prompts — what the evaluate stage records for instruction data.

Why the teacher's answers and not the references for agreement and KL: the references are human text neither model
wrote; the teacher's answers are the sequences a distilled student was trained to imitate (on other prompts), so
agreement on them measures how much of the teacher's behaviour it took on, where no student trained on these prompts.
"""

from __future__ import annotations

import time

from rouge_score import rouge_scorer

from kdflow.config.evaluation import EvaluationSection
from kdflow.config.templates import render
from kdflow.evaluation.quality import reference_sequences, same_vocabulary, score_reference
from kdflow.evaluation.quantize import count_params, load  # load: int8 folders too (evaluated like any model)
from kdflow.teacher.hf_generate import generate

# As MiniLLM's evaluation (microsoft/LMOps, minillm/rouge_metric.py): rouge_score's RougeScorer(["rougeL"],
# use_stemmer=True) with the package's default tokenizer (lower-cased, every run of [a-z0-9] a token, the rest
# dropped, tokens longer than 3 characters Porter-stemmed), the F-measure of rougeL per answer against its one
# reference, the answer stripped of surrounding white space; × 100 and averaged over the rows.
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
TEACHER_ANSWER = "teacher_answer"  # the field the teacher's answer is scored from, beside the row's own fields


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure × 100 of one answer against its reference: 2PR / (P + R) with P = LCS / answer tokens and
    R = LCS / reference tokens (LCS: the longest common subsequence of tokens); 0 when either has no token."""
    return 100 * SCORER.score(target=reference, prediction=prediction.strip())["rougeL"].fmeasure


def scored(predictions: list[dict]) -> tuple[float, list[dict]]:
    """(mean ROUGE-L, each prediction with its ``rouge_l``). ``predictions``: ``text`` (None for a request that failed
    for good, which scores 0, as a wrong answer does for accuracy) and ``answer``, the reference."""
    out = [{**p, "rouge_l": 0.0 if p["text"] is None else rouge_l(p["text"], p["answer"])} for p in predictions]
    return sum(p["rouge_l"] for p in out) / max(len(out), 1), out


def greedy_rouge_l(
    model, tokenizer, rows: list[dict], template: str, max_new_tokens: int, batch_size: int
) -> tuple[float, list[dict]]:
    """(mean ROUGE-L, per-row predictions with ``text``, ``finish_reason``, ``completion_tokens``, ``rouge_l``): greedy
    answers to each question through ``template`` and the model's chat template."""
    outputs = generate(
        model, tokenizer, [render(template, question=r["question"]) for r in rows], max_new_tokens, batch_size
    )
    return scored([{"id": r["id"], "answer": r["answer"], **o} for r, o in zip(rows, outputs)])


def with_teacher_answers(rows: list[dict], answers: list[dict]) -> list[dict]:
    """``rows`` with the teacher's greedy answer (``answers``: its predictions, ``id`` and ``text``) under
    ``TEACHER_ANSWER``; every row must have one (the teacher's evaluation of the same split)."""
    by_id = {str(a["id"]): a["text"] for a in answers}
    missing = [r["id"] for r in rows if by_id.get(str(r["id"])) is None]
    if missing:
        raise ValueError(
            f"the teacher's evaluation has no answer for {len(missing)} of the {len(rows)} rows (first: "
            f"{missing[0]}); evaluate the teacher on the same split first"
        )
    return [{**r, TEACHER_ANSWER: by_id[str(r["id"])]} for r in rows]


def teacher_answer_metrics(
    net,
    tokenizer,
    teacher_dir: str | None,
    rows: list[dict],
    template: str,
    section: EvaluationSection,
    answers: list[dict],
) -> dict:
    """Top-1 ``agreement`` and ``kl`` (KL(teacher ‖ model), nats per token) teacher-forced on the teacher's answers,
    with the model's perplexity of them. ``teacher_dir`` None: the model is the teacher (1 and 0, measured so)."""
    if teacher_dir is None:
        teacher = net
    else:
        teacher, t_tokenizer = load(teacher_dir, section.dtype)
        if not same_vocabulary(tokenizer, t_tokenizer):
            return {"agreement_skipped": "the student's tokenizer differs from the teacher's"}
    sequences = reference_sequences(tokenizer, with_teacher_answers(rows, answers), template, field=TEACHER_ANSWER)
    s = score_reference(net, tokenizer, sequences, section.batch_size, teacher=teacher)
    return {
        "agreement": s["agreement"],
        "kl": s["kl"],
        "teacher_answer_tokens": s["reference_tokens"],
        "teacher_answer_perplexity": s["perplexity"],
        "agreement_on": "the teacher's greedy answers",
    }


def evaluate_free_text(
    model_dir: str,
    teacher_dir: str | None,
    rows: list[dict],
    template: str,
    section: EvaluationSection,
    teacher_answers: list[dict] | None,
    no_teacher: str | None = None,
) -> tuple[dict, list[dict]]:
    """(metrics, one prediction per row) for the model in ``model_dir``: ``rouge_l``; ``perplexity`` (with
    ``nll_per_token`` and ``reference_tokens``) of the split's references; ``agreement`` and ``kl`` on the teacher's
    answers (``teacher_answer_metrics``). ``teacher_dir`` None: the model is the teacher, scored on its own answers;
    otherwise ``teacher_answers`` are the teacher evaluation's predictions on this split. ``no_teacher``: why there
    are no teacher weights to agree with (an API teacher): ROUGE-L and perplexity only."""
    if teacher_dir is not None and teacher_answers is None and not no_teacher:
        raise ValueError(
            "a student's evaluation on instruction data scores it on the teacher's answers: pass the "
            "teacher's evaluation of the same split (evaluate the teacher first)"
        )
    net, tokenizer = load(model_dir, section.dtype)
    start = time.perf_counter()
    rouge, predictions = greedy_rouge_l(net, tokenizer, rows, template, section.max_new_tokens, section.batch_size)
    metrics = {"rouge_l": rouge, "params": count_params(net), "rows": len(rows), "split": section.split}
    metrics |= score_reference(net, tokenizer, reference_sequences(tokenizer, rows, template), section.batch_size)
    if no_teacher:
        metrics["agreement_skipped"] = no_teacher
    else:
        answers = predictions if teacher_dir is None else teacher_answers
        metrics |= teacher_answer_metrics(net, tokenizer, teacher_dir, rows, template, section, answers)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    return metrics, predictions
