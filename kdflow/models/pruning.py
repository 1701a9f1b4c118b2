"""Students pruned from the teacher by depth — distillation's sibling route (Minitron, ShortGPT): keep ``k`` of the
teacher's ``n`` decoder layers, then let KD recover what the removed ones did.

Two ways to choose the layers:

- ``every_other``: evenly spaced, layer ``⌊i·n/k⌋`` for ``i < k`` (at half depth: every other layer, from the first);
- ``importance``: ShortGPT's *block influence* (Men et al. 2024, eq. 2), ``BI_i = 1 − E_t[cos(x_i,t, x_i+1,t)]``, where
  ``x_i`` is the hidden state entering layer ``i`` and ``x_i+1`` the one leaving it, averaged over the real (unpadded)
  tokens of calibration rows; the ``k`` layers with the largest influence stay, in their order.

The pruned model is a plain checkpoint of the teacher's class with ``num_hidden_layers = k``: the embeddings, final
norm and head are the teacher's, and layer ``j`` is the teacher's layer ``kept[j]``.
"""

from __future__ import annotations

import copy
import enum

# torch is imported where used: the recipe models (kdflow.config) import LayerSelect, and loading a recipe stays light.

PRUNING = "pruning.json"  # the prune stage's record: the layers kept and, for importance, each one's influence


class LayerSelect(str, enum.Enum):
    every_other = "every_other"
    importance = "importance"


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` of ``n`` layer indices, ``⌊i·n/k⌋``: [0, 2, 4, …] when k = n/2."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} layers: keep between 1 and {n}")
    return [i * n // k for i in range(k)]


def most_influential(influence: list[float], k: int) -> list[int]:
    """The indices of the ``k`` largest influences, in layer order (ties: the earlier layer stays)."""
    n = len(influence)
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} layers: keep between 1 and {n}")
    ranked = sorted(range(n), key=lambda i: (-influence[i], i))
    return sorted(ranked[:k])


def decoder_layers(model):
    """The decoder's layer list (``model.model.layers`` for Llama, Qwen2, Mistral, …)."""
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no model.layers list: depth pruning supports decoder-only "
            "models laid out as Llama (model.layers)"
        )
    return layers


def block_influence(model, batches) -> list[float]:
    """ShortGPT's block influence of each decoder layer over ``batches`` (dicts with ``input_ids`` and
    ``attention_mask``, B × L): 1 − the mean cosine similarity between a layer's input and output hidden states,
    over the positions where ``attention_mask`` is 1."""
    import torch

    layers = decoder_layers(model)
    sums, count = torch.zeros(len(layers), dtype=torch.float64), 0
    seen: dict[int, torch.Tensor] = {}

    def hook(index):
        def record(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            seen[index] = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # B × L

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for batch in batches:
            mask = batch["attention_mask"].bool()
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for i in range(len(layers)):
                sums[i] += seen[i][mask].double().sum()
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("block influence needs calibration tokens: the calibration rows are empty")
    return (1.0 - sums / count).tolist()


def keep_layers(model, kept: list[int]):
    """A new model of ``model``'s class with only the layers ``kept`` (teacher indices, increasing), sharing no
    tensors with ``model``: layer ``j`` of the result is layer ``kept[j]`` of the original."""
    n = len(decoder_layers(model))
    if not kept or sorted(set(kept)) != list(kept) or kept[0] < 0 or kept[-1] >= n:
        raise ValueError(f"kept layers {kept} must be increasing indices below {n}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (sliding / full) follow the layer
        config.layer_types = [config.layer_types[i] for i in kept]
    renumber = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(kept)}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix not in renumber:
                continue
            name = renumber[prefix] + name[len(prefix) :]
        state[name] = tensor.clone()
    pruned = type(model)(config).to(next(model.parameters()).dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.tie_weights()
    return pruned
