"""Which LM head the chunked losses (kdflow.training.chunked_loss) can run through, for the trainers that use them
(offline KD, SFT): the head of the trainer's model, wrapped or not, when its logits are ``hidden @ W.T + b`` and
the positions do not fit one chunk anyway. Otherwise the trainer takes its dense path, and says why once."""

from __future__ import annotations

import inspect
import logging

from kdflow.training.chunked_loss import chunk_rows

log = logging.getLogger(__name__)

# Logit transforms some architectures apply after the LM head; the chunked loss computes plain hidden @ W.T + b.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)
_LOGGED: set[str] = set()


def causal_lm(model):
    """The causal LM inside the trainer's ``model``: unwrapped from accelerate/DDP, and a peft model's base (whose
    decoder holds the LoRA layers, so its hidden states are the adapted model's)."""
    from accelerate.utils import extract_model_from_parallel, is_peft_model

    lm = extract_model_from_parallel(model)
    return lm.get_base_model() if is_peft_model(lm) else lm


def dense_reason(model) -> str | None:
    """Why the chunked losses cannot compute this model's logits (the trainer then takes its dense path), or None.

    ``model``: the trainer's model, maybe wrapped (accelerate, DDP) or a peft model (LoRA adapters inside the
    decoder are fine; an adapter on the LM head is not).
    """
    from torch import nn

    lm = causal_lm(model)
    config = lm.config.get_text_config()
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1.0)]
    if transforms:
        return f"{type(lm).__name__} transforms its logits after the LM head ({', '.join(transforms)})"
    head = lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"its LM head is a {type(head).__name__}, not a plain nn.Linear (an adapter on lm_head?)"
    if "logits_to_keep" not in inspect.signature(type(lm).forward).parameters:
        return f"{type(lm).__name__}.forward takes no logits_to_keep (it would compute every position's logits)"
    return None


def fused_head(model, rows: int, trainer: str = "offline KD"):
    """The LM head (``nn.Linear``) to run the chunked losses through for ``rows`` positions, or None for the dense
    path: when the model's logits need more than the head (``dense_reason``, logged once), or when one chunk holds
    every row anyway (e.g. the demo's 52-token vocabulary) — then the dense path *is* one chunk, and runs unchanged
    (the same operations, so the same figures)."""
    head = causal_lm(model).get_output_embeddings()
    if rows <= chunk_rows(head.weight.shape[0]):
        return None
    reason = dense_reason(model)
    if reason is not None:
        if reason not in _LOGGED:
            _LOGGED.add(reason)
            log.warning("%s: the dense loss path, holding (positions x vocabulary) logits, because %s", trainer, reason)
        return None
    return head


def final_hidden_states(model, inputs: dict):
    """The decoder's last hidden states (B, L, H), after its final norm, through the trainer's own (maybe wrapped)
    model so that DDP and peft see the forward; the head computes one position's logits only."""
    outputs = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    return outputs, outputs.hidden_states[-1]
