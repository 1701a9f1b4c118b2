"""LoRA students (peft): a recipe's ``lora`` section as a peft ``LoraConfig``, and the trained adapter merged
into the base weights when the student is saved.

The trainers take the config as ``peft_config=`` (TRL's SFTTrainer and its subclasses wrap the student in a
``PeftModel``, which freezes every base weight), so every loss — CE, offline KD from the cache, GKD — is
computed on the adapted model's logits. Merging on save matters downstream: evaluation, the deployment
measurements and vLLM load the student's ``model/`` folder as a plain causal LM, which then runs at the base
model's speed. The adapter alone (``adapter/adapter_config.json``, ``adapter/adapter_model.safetensors``) is
kept beside it, for applying it to the base model elsewhere.
"""

from __future__ import annotations

from pathlib import Path

ADAPTER = "adapter"  # the adapter's folder inside a student's output, beside ``model/``


def linear_module_names(model) -> list[str]:
    """Full names of the model's ``nn.Linear`` modules (what LoRA can adapt)."""
    from torch import nn

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def lora_config(section, model):
    """A peft ``LoraConfig`` for ``section`` (``kdflow.config.recipe.LoraSection``) on ``model``.

    Named target modules are checked against the model first, so that a misspelt name fails with the names
    there are instead of peft's bare "not found" inside the trainer's constructor. Peft matches a target
    against the end of a module's full name, at a dot (``q_proj`` and ``self_attn.q_proj`` both match).
    """
    from peft import LoraConfig, TaskType

    targets = section.target_modules
    if isinstance(targets, list):
        names = linear_module_names(model)
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            short = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ValueError(
                f"lora.target_modules {missing} name no linear layer of this model; its linear layers "
                f"are {short} (or use 'all-linear')"
            )
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        task_type=TaskType.CAUSAL_LM,
    )


def save_merged(peft_model, out_dir: Path):
    """Save the adapter to ``out_dir/adapter``, then merge it into the base weights and return the plain model
    (the caller saves it as ``out_dir/model``). Merging replaces the LoRA layers in place: afterwards the base
    model object is an ordinary causal LM again."""
    peft_model.save_pretrained(Path(out_dir) / ADAPTER)
    return peft_model.merge_and_unload()
