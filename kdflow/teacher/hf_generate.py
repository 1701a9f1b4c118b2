"""Batched generation with HF transformers: the CPU teacher backend, and how students are evaluated."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdflow.config.precision import Dtype, load_dtype
from kdflow.config.templates import plain_text, special_strings

TOO_LONG = "prompt_too_long"  # a finish_reason: the prompt and max_new_tokens exceed the model's context


def load(model_dir: str, dtype: Dtype | None = None):
    """The model in ``dtype`` (float32 when None) and its tokenizer, padding on the left."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # decoder-only batches must end at the prompt, not at padding
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=load_dtype(dtype))
    model.eval()
    return model, tokenizer


@torch.inference_mode()
def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, temperature: float = 0.0, seed: int = 0
) -> list[dict]:
    """Answer each user prompt through the chat template.

    Returns one dict per prompt: ``text`` (special tokens removed), ``finish_reason`` ("stop" when the
    model ended its turn, "length" when it hit ``max_new_tokens``, ``TOO_LONG`` when the prompt and
    ``max_new_tokens`` do not fit the model's context: not run, an empty answer) and ``completion_tokens``.
    """
    torch.manual_seed(seed)
    # Sort by length so each batch pads little; results go back in the input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    specials = special_strings(tokenizer)  # a prompt's text is never chat markup (templates.plain_text)
    out: list[dict | None] = [None] * len(prompts)
    context = getattr(model.config, "max_position_embeddings", None)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": plain_text(prompts[i], specials)}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for i in idx
        ]
        # Positions past the model's context give garbage, and a huge prompt's attention alone takes hours: such a
        # prompt is not run (a 10 MB question to a 256-position teacher was still in generation 300 s later).
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # once: padded below, only what fits
        lengths = [len(x) for x in ids]
        fits = [n + max_new_tokens <= context for n in lengths] if context else [True] * len(idx)
        for i, n, ok in zip(idx, lengths, fits):
            if not ok:
                out[i] = {"text": "", "finish_reason": TOO_LONG, "completion_tokens": 0, "prompt_tokens": n}
        idx, ids = [i for i, ok in zip(idx, fits) if ok], [x for x, ok in zip(ids, fits) if ok]
        if not idx:
            continue
        enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        for row, i in zip(new.tolist(), idx):
            ended = tokenizer.eos_token_id in row
            tokens = row[: row.index(tokenizer.eos_token_id)] if ended else row
            tokens = [t for t in tokens if t != tokenizer.pad_token_id]
            out[i] = {
                "text": tokenizer.decode(tokens, skip_special_tokens=True),
                "finish_reason": "stop" if ended else "length",
                "completion_tokens": len(tokens) + int(ended),
            }
    return out
