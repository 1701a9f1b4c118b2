"""Which quality metric a run's report judges models by, and how it was measured: accuracy through an answer checker,
or ROUGE-L (× 100) against the reference on free text (``source: instructions``), which has no checker. One place, so
that the tables, the summary, the seeds, the gap closed, the plot and the notes all speak of the same one."""

from __future__ import annotations

from kdflow.config.data import DataSource

QUALITY = {"accuracy": ("accuracy", ".3f"), "rouge_l": ("ROUGE-L", ".1f")}  # key -> (title, format)


def quality_key(teacher: dict) -> str:
    """``rouge_l`` where the teacher's metrics carry it (instruction data; None for a teacher known only by an imported
    logit dataset), else ``accuracy``."""
    return "rouge_l" if "rouge_l" in teacher else "accuracy"


def source_metric(source: DataSource) -> str:
    """The key the evaluate stage records a model's quality under for data of ``source``, known before any model is
    evaluated (``quality_key`` reads it from a teacher's metrics): ``rouge_l`` on instruction data, else
    ``accuracy``."""
    return "rouge_l" if source is DataSource.instructions else "accuracy"


def metric_of(report: dict) -> str:
    """A built report's quality metric (reports written before ROUGE-L came: accuracy)."""
    return report.get("gap_closure", {}).get("metric", "accuracy")


def quality_notes(report: dict) -> list[str]:
    """The report's notes on quality: the metric, pass@k, an API teacher, perplexity, agreement and KL."""
    t, free_text = report["teacher"], metric_of(report) == "rouge_l"
    models = [t, *report["students"].values()]
    if free_text:
        out = [
            f"- **ROUGE-L**: greedy answers to the `{t['split']}` split's {t['rows']} instructions, each through the "
            "model's chat template, against the reference answer: the F-measure of rougeL × 100 (rouge-score, its "
            "default tokenizer with Porter stemming, as MiniLLM reports SelfInst), averaged over the instructions."
        ]
    else:
        out = [
            f"- **Accuracy**: greedy chain-of-thought on the `{t['split']}` split ({t['rows']} questions), exact "
            "final answer through the answer checker."
        ]
    if t.get("pass_at_k") is not None:
        out.append(
            f"- **pass@{t['k']}**: unbiased estimator (Chen et al. 2021) from {t['samples']} sampled answers per "
            "question."
        )
    if t.get("api"):
        scored_how = "the same way" if free_text else "by the same answer checker"
        out.append(
            f"- **Teacher**: `{t['model']}` behind an OpenAI-compatible API ({t['api']['base_url']}), answering "
            f"the same prompts greedily through the API, scored {scored_how}. Perplexity, agreement, KL and every "
            f"cost figure are absent for it (— in the tables): {t['weights']}."
        )
    if t.get("imported"):
        out.append(
            f"- **Teacher**: `{t['model']}`, known only by the imported logit dataset the students learnt from "
            "(Logit cache, below): its weights are not here, so it was not evaluated and has no row in the tables (no "
            "gap closed, ratio to the teacher, agreement or KL)."
        )
    agreement = (
        "agreement = share of answer positions where the model's most likely next token is the teacher's; "
        "KL(teacher ‖ model) in nats per token. "
        + (
            "Agreement and KL need the teacher's weights: none for an API teacher."
            if t.get("api") or t.get("imported")
            else "The teacher against itself: 1 and 0."
        )
    )
    ppl = next((m for m in models if m.get("perplexity") is not None), None)
    if ppl is not None and not free_text:
        out.append(
            f"- **Perplexity, agreement, KL**: teacher-forced on the split's gold rationales "
            f"({ppl['reference_tokens']:,} answer tokens, prompt tokens not scored); {agreement}"
        )
    if ppl is not None and free_text:
        out.append(
            f"- **Perplexity**: teacher-forced on the split's reference answers ({ppl['reference_tokens']:,} "
            "answer tokens, prompt tokens not scored)."
        )
    # On free text, agreement and KL are measured on the teacher's answers, not on the references (free_text.py).
    agreed = next((m for m in models if m.get("teacher_answer_tokens") is not None), None) if free_text else None
    if agreed is not None:
        out.append(
            f"- **Agreement, KL**: teacher-forced on the teacher's own greedy answers to the same instructions "
            f"({agreed['teacher_answer_tokens']:,} answer tokens), which no model trained on; {agreement}"
        )
    return out
