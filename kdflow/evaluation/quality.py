"""How good a model is: task accuracy through the answer checker (greedy, and pass@k from samples),
perplexity on held-out reference text, agreement with the teacher on that text, and an LLM judge's win
rate against the teacher's answers (for instruction data, where no checker exists)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

from kdflow.config.templates import plain_text, render, special_strings
from kdflow.curation.verify import VerifyTimeout
from kdflow.teacher.hf_generate import generate


def checked(check: Callable[[str, str], bool], text: str, gold) -> tuple[bool, str | None]:
    """(correct, why it could not be verified). An answer math-verify gives no verdict on within its bound
    counts as not correct, and the prediction says why, rather than ending the evaluation."""
    try:
        return bool(check(text, gold)), None
    except VerifyTimeout as e:
        return False, str(e)


def accuracy(
    model,
    tokenizer,
    rows: list[dict],
    template: str,
    check: Callable[[str, str], bool],
    max_new_tokens: int,
    batch_size: int,
) -> tuple[float, list[dict]]:
    """(accuracy, per-row predictions with ``text``, ``finish_reason``, ``correct`` and ``unverified``: None, or
    why the checker gave no verdict in time)."""
    outputs = generate(
        model, tokenizer, [render(template, question=r["question"]) for r in rows], max_new_tokens, batch_size
    )
    predictions = [
        {
            "id": r["id"],
            "answer": r["answer"],
            **o,
            **dict(zip(("correct", "unverified"), checked(check, o["text"], r["answer"]))),
        }
        for r, o in zip(rows, outputs)
    ]
    return sum(p["correct"] for p in predictions) / len(predictions), predictions


# ---- pass@k ------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021, eq. 1):
    ``1 − C(n−c, k) / C(n, k)``, as a product so that large ``n`` does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def sampled_pass_at_k(
    model,
    tokenizer,
    rows: list[dict],
    template: str,
    check: Callable[[str, str], bool],
    k: int,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
) -> tuple[float, list[int]]:
    """(mean pass@k over rows, correct samples per row) from ``samples`` sampled answers per question."""
    prompts = [render(template, question=r["question"]) for r in rows]
    outputs = generate(
        model,
        tokenizer,
        [p for p in prompts for _ in range(samples)],
        max_new_tokens,
        batch_size,
        temperature=temperature,
        seed=seed,
    )
    correct = [
        sum(checked(check, o["text"], r["answer"])[0] for o in outputs[i * samples : (i + 1) * samples])
        for i, r in enumerate(rows)
    ]
    return sum(pass_at_k(samples, c, k) for c in correct) / len(rows), correct


# ---- reference text: perplexity and agreement with the teacher ----------------------------------------


def reference_sequences(
    tokenizer, rows: list[dict], template: str, field: str = "rationale"
) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token) per row: the question through ``template`` and the
    chat template, the reference answer ``row[field]`` as the assistant turn (its end-of-turn included)."""
    out, specials = [], special_strings(tokenizer)  # data text is never chat markup (templates.plain_text)
    for r in rows:
        user = [{"role": "user", "content": plain_text(render(template, question=r["question"]), specials)}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        answer = {"role": "assistant", "content": plain_text(r[field], specials)}
        full = tokenizer.apply_chat_template([*user, answer], tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if ids[: len(p_ids)] != p_ids or len(ids) == len(p_ids):
            raise ValueError(
                f"row {r.get('id')}: the chat template's prompt is not a prefix of the full conversation; "
                "cannot tell the answer tokens apart"
            )
        out.append((ids, len(p_ids)))
    return out


def _batch(
    sequences: list[tuple[list[int], int]], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, L), attention mask (B, L), and a mask (B, L − 1) of the positions whose
    logits predict an answer token (position t predicts token t + 1)."""
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    target = torch.zeros((len(sequences), width - 1), dtype=torch.bool)
    for i, (seq, start) in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        target[i, start - 1 : len(seq) - 1] = True
    return ids.to(device), attention.to(device), target.to(device)


LOGIT_BUDGET = 1 << 30  # bytes of float32 logits per forward pass: a 150k vocabulary fits only a few rows


def _chunks(sequences: list[tuple[list[int], int]], batch_size: int, vocab: int):
    """Batches of at most ``batch_size`` rows whose logits fit ``LOGIT_BUDGET``, shortest rows first (less
    padding); the scores are sums over tokens, so the order does not change them."""
    chunk: list[tuple[list[int], int]] = []
    for seq in sorted(sequences, key=lambda s: len(s[0])):
        if chunk and (len(chunk) == batch_size or (len(chunk) + 1) * len(seq[0]) * vocab * 4 > LOGIT_BUDGET):
            yield chunk
            chunk = []
        chunk.append(seq)
    if chunk:
        yield chunk


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    """Token-level agreement needs one vocabulary: the same token id must mean the same string."""
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def answer_logprobs(
    model, ids: torch.Tensor, attention: torch.Tensor, target: torch.Tensor, vocab: int
) -> torch.Tensor:
    """(T, V) float32 log-probabilities at the ``target`` positions (the answer tokens' predictors) only.

    Through the decoder's last hidden states and the LM head at those positions when the head is a plain linear map
    (``kdflow.training.head.dense_reason``): the head and the softmax then cost nothing at the prompt's and the
    padding's positions, which on the study's evaluation (a 49k vocabulary, prompts as long as the answers) are half
    of them. Otherwise (logit soft-capping, scaling) the model's own logits at every position, then the targets."""
    from kdflow.training.head import dense_reason, final_hidden_states

    ids, attention, target = ids.to(model.device), attention.to(model.device), target.to(model.device)
    if dense_reason(model) is None:
        _, hidden = final_hidden_states(model, {"input_ids": ids, "attention_mask": attention})
        logits = model.get_output_embeddings()(hidden[:, :-1][target])[:, :vocab]
    else:
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1, :vocab][target]
    return torch.log_softmax(logits.float(), -1)


@torch.inference_mode()
def score_reference(model, tokenizer, sequences: list[tuple[list[int], int]], batch_size: int, teacher=None) -> dict:
    """Teacher-forced on the answer tokens of ``sequences`` (from ``reference_sequences``):

    - ``perplexity``: exp of the mean negative log-likelihood per answer token;
    - with a ``teacher`` sharing the tokenizer: ``agreement``, the fraction of answer positions where both
      models' most likely next token is the same, and ``kl``, the mean over those positions of
      KL(teacher ‖ student) = Σ_v p_t(v) (log p_t(v) − log p_s(v)), in nats. A ``teacher`` that is ``model`` itself
      is run once (agreement 1 and KL 0, measured from that one pass).

    Logits beyond ``len(tokenizer)`` (padding rows some models add to the embedding) are dropped first.
    """
    vocab = len(tokenizer)
    nll = agree = kl = 0.0
    tokens = 0
    for chunk in _chunks(sequences, batch_size, vocab):
        ids, attention, target = _batch(chunk, tokenizer.pad_token_id, model.device)
        logp = answer_logprobs(model, ids, attention, target, vocab)  # (T, V): answer positions only
        nll -= logp.gather(-1, ids[:, 1:][target].unsqueeze(-1)).sum().item()
        tokens += int(target.sum())
        if teacher is not None:
            t_logp = (
                logp if teacher is model else answer_logprobs(teacher, ids, attention, target, vocab).to(logp.device)
            )
            agree += (t_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            kl += (t_logp.exp() * (t_logp - logp)).sum().item()
    out = {"perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens, "reference_tokens": tokens}
    if teacher is not None:
        out |= {"agreement": agree / tokens, "kl": kl / tokens}
    return out


# ---- LLM judge: win rate against the teacher's answers ------------------------------------------------

VERDICT_RE = re.compile(r"verdict\s*:\s*\**\s*\[?\s*(a|b|tie)\b", re.IGNORECASE)
SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def parse_verdict(text: str) -> str | None:
    """ "A", "B" or "tie" from the judge's last ``Verdict: …`` line; None when there is none."""
    found = VERDICT_RE.findall(text)
    if not found:
        return None
    v = found[-1].lower()
    return "tie" if v == "tie" else v.upper()


def judge_prompts(template: str, rows: list[dict]) -> list[dict]:
    """Two judgements per row, ``{question, student, teacher}``: the student's answer first as A, then as B,
    so a judge that prefers a position scores the student 0.5, not 1 or 0."""
    out = []
    for r in rows:
        for student_is in ("A", "B"):
            a, b = (r["student"], r["teacher"]) if student_is == "A" else (r["teacher"], r["student"])
            out.append(
                {
                    "id": r.get("id"),
                    "student_is": student_is,
                    "prompt": render(template, question=r["question"], answer_a=a, answer_b=b),
                }
            )
    return out


def outcome(verdict: str | None, student_is: str) -> str | None:
    """The student's "win", "tie" or "loss" for one verdict; None when the verdict was not parsed."""
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    return "win" if verdict == student_is else "loss"


UNPARSED = "unparsed_verdict"  # the judge answered, but with no "Verdict: A|B|tie" line


def judge_pairs(questions: list[dict], student: list[dict], teacher: list[dict], limit: int | None) -> list[dict]:
    """``{id, question, student, teacher}`` for the first ``limit`` questions (all when None), in the split's
    order. ``student`` and ``teacher``: each model's answers (``id``, ``text``) to those questions."""
    answers = {
        "student": {str(p["id"]): p["text"] for p in student},
        "teacher": {str(p["id"]): p["text"] for p in teacher},
    }
    rows = questions[:limit]
    for who, by_id in answers.items():
        missing = [r["id"] for r in rows if str(r["id"]) not in by_id]
        if missing:
            raise ValueError(
                f"the {who}'s answers lack {len(missing)} of the {len(rows)} questions (first: {missing[0]}); "
                "judge answers to the same split"
            )
    return [
        {
            "id": r["id"],
            "question": r["question"],
            "student": answers["student"][str(r["id"])],
            "teacher": answers["teacher"][str(r["id"])],
        }
        for r in rows
    ]


def judgement(item: dict, reply: dict) -> dict:
    """One judgement: a ``judge_prompts`` item with the judge's raw reply, its verdict and the student's outcome.
    ``reply``: ``{"ok": True, "text"}``, or a request that failed for good (``ok`` False, ``reason``, ``error``),
    which keeps its reason code and is never scored."""
    if not reply["ok"]:
        return {
            **item,
            "text": None,
            "verdict": None,
            "outcome": None,
            "reason": reply["reason"],
            "error": reply.get("error"),
        }
    verdict = parse_verdict(reply["text"])
    return {
        **item,
        "text": reply["text"],
        "verdict": verdict,
        "outcome": outcome(verdict, item["student_is"]),
        "reason": None if verdict is not None else UNPARSED,
        "error": None,
    }


def win_rate(judgements: list[dict]) -> dict:
    """``judgements``: each with ``outcome`` (and ``reason`` when it has none). The student's mean score
    (win 1, tie ½, loss 0) over the parsed ones, with the counts behind it. A reply without a verdict
    (``unparsed``) and a request that failed for good (``failed``: a ``reason`` other than UNPARSED) are
    counted apart, never scored: judged + unparsed + failed = every judgement. ``consistent_pairs``: of the
    questions whose two orders both parsed (``pairs_parsed``), those where the student got the same outcome
    both times; a judge that follows the position, not the answer, has few."""
    scored = [j["outcome"] for j in judgements if j["outcome"] is not None]
    failed = sum(j["outcome"] is None and j.get("reason") not in (None, UNPARSED) for j in judgements)
    by_id: dict = {}
    for j in judgements:
        by_id.setdefault(j.get("id"), []).append(j["outcome"])
    both = [o for o in by_id.values() if len(o) == 2 and None not in o]
    return {
        "win_rate": sum(SCORE[o] for o in scored) / len(scored) if scored else None,
        "judged": len(scored),
        "wins": scored.count("win"),
        "ties": scored.count("tie"),
        "losses": scored.count("loss"),
        "unparsed": len(judgements) - len(scored) - failed,
        "failed": failed,
        "pairs_parsed": len(both),
        "consistent_pairs": sum(a == b for a, b in both),
    }


def judge_win_rate(
    judge, tokenizer, template: str, rows: list[dict], max_new_tokens: int, batch_size: int
) -> tuple[dict, list[dict]]:
    """(win rate summary, every judgement with the judge's raw text and its parsed verdict), the judge an HF
    model in this process."""
    items = judge_prompts(template, rows)
    outputs = generate(judge, tokenizer, [i["prompt"] for i in items], max_new_tokens, batch_size)
    judgements = [judgement(item, {"ok": True, **o}) for item, o in zip(items, outputs)]
    return win_rate(judgements), judgements
