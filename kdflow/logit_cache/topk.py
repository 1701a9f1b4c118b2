"""Capturing the teacher's top-k distributions for a logit cache (``kdflow/logit_cache/format.py``).

Teacher-forced on the exact token ids the student trains on: each row is tokenized the way TRL's
SFTTrainer tokenizes a conversational prompt-completion row (prompt with the generation prompt, then
prompt + completion, the completion starting where the two diverge), and the teacher's distribution is
kept at every position whose next token is a completion token.

Three sources, one output type (``TopK``):

- ``hf_topk``: an HF model's forward pass (batched by a token budget, no grad, in the model's dtype; the LM head
  only at answer positions, a chunk at a time; log-probs in float32); the tail from the whole distribution;
- ``vllm_topk``: a vLLM server's ``prompt_logprobs`` through the openai client's completions endpoint
  (the server must run without prefix caching and with ``--max-logprobs`` ≥ k; vLLM's default
  ``logprobs_mode`` is ``raw_logprobs``, the model's own log-softmax, not the sampler's);
- ``topk_from_api_records``: the ``top_logprobs`` (≤ 20) an API returned while generating (gray-box KD).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from kdflow.config.templates import plain_messages, special_strings
from kdflow.logit_cache.format import TAIL_FLOOR, TopK, tail_from_topk

Part = tuple[list[int], list[TopK]]  # (indices into the rows scored, their top-k): an answer, part by part
API_TOP_LOGPROBS_MAX = 20  # OpenAI's cap on top_logprobs
# Logits per top-k step in hf_topk: 16 MiB of float32, a size whose buffers the allocator reuses (at 64 MiB and
# up each chunk was mapped and page-faulted afresh, and capture ran ~10 % slower; at 1 MiB, ops' fixed costs add up).
CHUNK_LOGITS = 1 << 22


@dataclass
class EncodedRow:
    """A training sequence: ``input_ids`` (n,) and ``start``, the logit position predicting its first
    completion token (the prompt length − 1)."""

    row_id: str
    input_ids: np.ndarray
    start: int


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_row(tokenizer, row_id: str, prompt: list[dict], completion: list[dict]) -> EncodedRow:
    """Token ids exactly as TRL's SFTTrainer builds them for a conversational prompt-completion row (whose texts
    the trainers make plain the same way: ``templates.plain_rows``)."""
    specials = special_strings(tokenizer)  # data text is never chat markup
    prompt, completion = plain_messages(prompt, specials), plain_messages(completion, specials)
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    start = common_prefix_length(prompt_ids, full) - 1
    if start < 0 or start >= len(full) - 1:
        raise ValueError(f"row {row_id!r}: no completion tokens after the prompt ({len(full)} tokens in all)")
    return EncodedRow(row_id, np.asarray(full, dtype=np.int64), start)


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length so that each padded batch holds at most ``batch_tokens`` tokens
    (a single longer row still gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def topk_of_logits(
    logits: torch.Tensor, k: int, temperature: float, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, V) logits -> top-k ids (P, k), their log-probs (P, k) and the tail ``log Σ_{rest} p`` (P,) of
    ``softmax(logits / T)``.

    Two passes over V (top-k, then exp-sum) and no (P, V) log-softmax: on a small teacher these passes cost
    as much as its forward. The logsumexp is shifted by the top-1 logit, the max ``torch.logsumexp`` would
    find in a pass of its own. The tail is ``log(1 − exp(lse_top − lse))`` in float64, exact up to the
    float32 rounding of the two logsumexps (≈ 1e-6 of the mass), floored at ``TAIL_FLOOR``. The exp-sum runs in
    place on the float32 copy when there is one (bf16 logits, T ≠ 1) or ``overwrite`` allows it: at V = 151,936
    every pass over the chunk costs about as much as its share of the head's matmul on a CPU.
    """
    z = logits.float() if temperature == 1.0 else logits.float() / temperature
    top, ids = z.topk(k, dim=-1)
    best = top[:, :1]
    shifted = z.sub_(best) if overwrite or z is not logits else z - best
    lse = shifted.exp_().sum(-1, keepdim=True).log_().add_(best)
    values = top - lse
    inside = torch.logsumexp(values.double(), dim=-1).clamp(max=0.0)
    return ids, values, torch.log(-torch.expm1(inside)).clamp(min=TAIL_FLOOR).float()


def answer_positions(spans: list[tuple[int, int]], first: int, width: int) -> torch.Tensor:
    """Row indices into a batch's logits flattened to ``(B · width, V)`` (logit ``first`` at column 0) of
    every answer position: ``spans[b] = (start, end)`` of sequence ``b``, in order."""
    return torch.cat([torch.arange(b * width + s - first, b * width + e - first) for b, (s, e) in enumerate(spans)])


def padded_batch(rows: list[EncodedRow], batch: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (B, width) of ``rows[i] for i in batch``. In a causal model
    padding after a sequence does not change its earlier positions."""
    width = max(len(rows[i].input_ids) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, i in enumerate(batch):
        n = len(rows[i].input_ids)
        ids[b, :n] = torch.from_numpy(rows[i].input_ids)
        mask[b, :n] = 1
    return ids, mask


# Config fields of architectures whose logits are not just ``lm_head(final hidden state)`` (Gemma 2's soft-capping,
# Cohere's scale, Granite's divisor): for those hf_topk takes the logits from the model's own forward instead.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def head_of(model):
    """(the decoder without its LM head, the head) when the logits are the head applied to the decoder's final
    hidden states, else None."""
    head, base = model.get_output_embeddings(), getattr(model, "base_model", None)
    plain = not any(getattr(model.config, name, None) not in (None, 1.0) for name in LOGIT_TRANSFORMS)
    return (base, head) if plain and head is not None and base is not None and base is not model else None


def chunk_positions(vocab: int) -> int:
    """Answer positions per trip through the LM head: ``CHUNK_LOGITS`` logits, but at least 128 positions — with
    fewer, re-reading the whole (V, H) head for each handful of rows adds ~10 % to its matmul (at V = 151,936:
    128 positions, 39 MiB of bf16 logits). Top-k then takes them ``CHUNK_LOGITS // V`` rows at a time."""
    return max(128, CHUNK_LOGITS // vocab)


def hf_topk(
    model, rows: list[EncodedRow], k: int, temperature: float = 1.0, batch_tokens: int = 16384, pad_id: int = 0
) -> list[TopK]:
    """The teacher's top-k at every completion position of ``rows`` (returned in the same order); see
    ``hf_topk_parts``."""
    return in_order(len(rows), hf_topk_parts(model, rows, k, temperature, batch_tokens, pad_id))


def in_order(n: int, parts: Iterator[Part]) -> list[TopK]:
    """``n`` rows' top-k in the rows' order, from parts of ``(indices into the rows, their TopK)``."""
    out: list[TopK | None] = [None] * n
    for indices, scored in parts:
        for i, t in zip(indices, scored):
            out[i] = t
    missing = [i for i, t in enumerate(out) if t is None]
    if missing:
        raise ValueError(f"the teacher answered {n - len(missing)} of {n} rows (none for rows {missing[:5]})")
    return out


@torch.inference_mode()
def hf_topk_parts(
    model, rows: list[EncodedRow], k: int, temperature: float = 1.0, batch_tokens: int = 16384, pad_id: int = 0
) -> Iterator[Part]:
    """The teacher's top-k at every completion position of ``rows``, one padded batch at a time, as soon as it
    is done: ``(indices into rows, their TopK)`` per batch (rows of similar length together), so that a caller can
    use one batch's answers while the next is computed (on-policy KD trains on them as they come).

    Memory stays bounded at any vocabulary: the decoder runs on a batch of at most ``batch_tokens`` padded
    tokens in the model's own dtype; only the answer positions' final hidden states, (P, H), are gathered, and
    they go through the LM head ``chunk_positions(V)`` at a time, each chunk's logits reduced to its top-k (in
    float32, ``CHUNK_LOGITS`` at a time) before the next is made — never (B, L, V) logits, nor (P, V) at once. At
    V = 151,936 a 16k-token batch's full logits would be 10 GB in float32.
    """
    split = head_of(model)
    for batch in length_batches([len(r.input_ids) for r in rows], batch_tokens):
        ids, mask = padded_batch(rows, batch, pad_id)
        spans = [(rows[i].start, len(rows[i].input_ids) - 1) for i in batch]
        if split is None:  # logits with a transform of their own: the model's forward, from the first answer on
            first = min(s for s, _ in spans)
            logits = model(
                input_ids=ids, attention_mask=mask, logits_to_keep=torch.arange(first, ids.shape[1] - 1)
            ).logits
            states, project = logits.flatten(0, 1), lambda x: x
            positions = answer_positions(spans, first, logits.shape[1])
        else:
            base, head = split
            states, project = base(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1), head
            positions = answer_positions(spans, 0, ids.shape[1])
        vocab = model.config.vocab_size
        # Top-k 16 MiB of float32 at a time: the allocator reuses such buffers, and each pass over them stays in
        # cache; larger steps were page-faulted afresh (~10 % slower capture), smaller ones pay ops' fixed costs.
        chunks = [
            topk_of_logits(logits, k, temperature, overwrite=True)
            for part in positions.split(chunk_positions(vocab))
            for logits in project(states.index_select(0, part)).split(max(1, CHUNK_LOGITS // vocab))
        ]
        top_ids, top_lp, tail = (torch.cat(parts) for parts in zip(*chunks))
        at, scored = 0, []
        for i, (s, e) in zip(batch, spans):
            r = rows[i]
            scored.append(
                TopK(
                    r.row_id,
                    r.input_ids,
                    r.start,
                    top_ids[at : at + e - s].numpy(),
                    top_lp[at : at + e - s].numpy(),
                    tail[at : at + e - s].numpy(),
                )
            )
            at += e - s
        yield batch, scored


def topk_from_prompt_logprobs(row: EncodedRow, prompt_logprobs: list[dict | None], k: int) -> TopK:
    """A vLLM ``prompt_logprobs`` response -> ``TopK``.

    ``prompt_logprobs[t]`` (None at t = 0) maps token ids (as strings) to ``{"logprob", "rank", ...}`` for
    the distribution of token t given tokens < t: our logit position t − 1. It holds the top-k plus the
    actual token when that one ranks below k; ranks pick the top-k.
    """
    if len(prompt_logprobs) != len(row.input_ids):
        raise ValueError(f"row {row.row_id!r}: {len(prompt_logprobs)} prompt_logprobs for {len(row.input_ids)} tokens")
    L = len(row.input_ids) - 1 - row.start
    ids = np.zeros((L, k), dtype=np.int64)
    lps = np.zeros((L, k), dtype=np.float32)
    for j in range(L):
        entries = prompt_logprobs[row.start + 1 + j]
        top = sorted(
            ((int(tid), e["rank"], e["logprob"]) for tid, e in entries.items() if e["rank"] <= k), key=lambda x: x[1]
        )
        if len(top) != k:
            raise ValueError(
                f"row {row.row_id!r}, position {row.start + j}: the server returned {len(top)} "
                f"top entries, expected k={k} (start it with --max-logprobs >= {k})"
            )
        ids[j] = [t for t, _, _ in top]
        lps[j] = [lp for _, _, lp in top]
    return TopK(row.row_id, row.input_ids, row.start, ids, lps, tail_from_topk(lps))


def _field(obj, name: str):
    """A field of an openai response object that the SDK does not model (vLLM extensions)."""
    value = getattr(obj, name, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(name)
    return value


def vllm_topk(client, model: str, rows: list[EncodedRow], k: int, concurrency: int = 8) -> list[TopK]:
    """Teacher-forced top-k from a vLLM server: one completions request per row, ``max_tokens=1``.

    ``client``: an ``openai.OpenAI`` pointed at the server (its ``max_retries`` retries transient errors
    with backoff and honours Retry-After; a 400 is not retried).
    """

    def one(row: EncodedRow) -> TopK:
        response = client.completions.create(
            model=model,
            prompt=[int(t) for t in row.input_ids],
            max_tokens=1,
            temperature=0.0,
            extra_body={"prompt_logprobs": k},
        )
        prompt_logprobs = _field(response.choices[0], "prompt_logprobs")
        if prompt_logprobs is None:
            raise ValueError(f"row {row.row_id!r}: the server returned no prompt_logprobs (is it a vLLM server?)")
        return topk_from_prompt_logprobs(row, prompt_logprobs, k)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, rows))


def vllm_topk_batched(client, model: str, rows: list[EncodedRow], k: int, requests: int = 8) -> list[TopK]:
    """As ``vllm_topk``, with the rows sent in ``requests`` completions requests of many prompts each (vLLM's
    completions endpoint takes a list of token-id prompts): one round trip per chunk instead of one per row, and
    the server schedules the chunk's forwards together. For a batch scored at once (on-policy KD's samples)."""
    return in_order(len(rows), vllm_topk_parts(client, model, rows, k, requests))


def vllm_topk_parts(client, model: str, rows: list[EncodedRow], k: int, requests: int = 8) -> Iterator[Part]:
    """``vllm_topk_batched``'s requests, all sent at once, answered one request at a time in the rows' order:
    ``(indices into rows, their TopK)`` as soon as that request's answer is in (as ``hf_topk_parts``). Closing the
    generator early waits for the requests in flight."""
    size = -(-len(rows) // max(1, requests))
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]

    def one(chunk: list[EncodedRow]) -> list[TopK]:
        response = client.completions.create(
            model=model,
            prompt=[[int(t) for t in r.input_ids] for r in chunk],
            max_tokens=1,
            temperature=0.0,
            extra_body={"prompt_logprobs": k},
        )
        choices = sorted(response.choices, key=lambda c: c.index)
        if len(choices) != len(chunk):
            raise ValueError(f"the server answered {len(choices)} of {len(chunk)} prompts (is it a vLLM server?)")
        out = []
        for row, choice in zip(chunk, choices):
            prompt_logprobs = _field(choice, "prompt_logprobs")
            if prompt_logprobs is None:
                raise ValueError(f"row {row.row_id!r}: the server returned no prompt_logprobs (is it a vLLM server?)")
            out.append(topk_from_prompt_logprobs(row, prompt_logprobs, k))
        return out

    with ThreadPoolExecutor(len(chunks) or 1) as pool:
        # in submission order, not as completed: a part's place in the sum of gradients is then the same every run
        for at, answer in zip(range(0, len(rows), size), pool.map(one, chunks)):
            yield list(range(at, at + len(answer))), answer


class AlignmentError(ValueError):
    """An API's generated tokens are not the tokens the student trains on."""


def topk_from_api_records(row: EncodedRow, records: list[dict], k: int) -> TopK:
    """Gray-box KD: the ``top_logprobs`` an API returned at generation time -> ``TopK``.

    ``records``: one per generated token, ``{"token_id", "logprob", "top": [(id, logprob), ...]}``; they
    must be the row's completion tokens (``input_ids[start + 1:]``), else ``AlignmentError`` says where
    they part. An API that does not return its end-of-turn token may stop one short: the cache then covers
    every completion position but the last (``len(ids)`` says how many). ``k`` ≤ 20 (and ≤ what the
    records hold).
    """
    if k > API_TOP_LOGPROBS_MAX:
        raise ValueError(f"k={k}: APIs return at most {API_TOP_LOGPROBS_MAX} top_logprobs")
    completion = [int(t) for t in row.input_ids[row.start + 1 :]]
    generated = [int(r["token_id"]) for r in records]
    if generated not in (completion, completion[:-1]):
        at = common_prefix_length(generated, completion)
        raise AlignmentError(
            f"row {row.row_id!r}: the API's token {at} is {generated[at : at + 1]}, the student's "
            f"{completion[at : at + 1]} ({len(generated)} vs {len(completion)} tokens): re-tokenizing "
            "the answer changed its tokens; this row cannot use the API's logprobs"
        )
    ids = np.zeros((len(records), k), dtype=np.int64)
    lps = np.zeros((len(records), k), dtype=np.float32)
    for j, r in enumerate(records):
        top = sorted(((int(t), float(lp)) for t, lp in r["top"]), key=lambda x: -x[1])[:k]
        if len(top) < k:
            raise ValueError(f"row {row.row_id!r}, token {j}: {len(top)} top_logprobs recorded, k={k}")
        ids[j] = [t for t, _ in top]
        lps[j] = [lp for _, lp in top]
    return TopK(row.row_id, row.input_ids, row.start, ids, lps, tail_from_topk(lps))
