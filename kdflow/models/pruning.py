"""Students pruned from the teacher — distillation's sibling route (Minitron, ShortGPT): keep ``k`` of the teacher's
``n`` decoder layers (depth), optionally only the ``w`` most important MLP channels of each kept layer (width), then let
KD recover what the removed parts did.

Two ways to choose the layers:

- ``every_other``: evenly spaced, layer ``⌊i·n/k⌋`` for ``i < k`` (at half depth: every other layer, from the first);
- ``importance``: ShortGPT's *block influence* (Men et al. 2024, eq. 2), ``BI_i = 1 − E_t[cos(x_i,t, x_i+1,t)]``, where
  ``x_i`` is the hidden state entering layer ``i`` and ``x_i+1`` the one leaving it, averaged over the real (unpadded)
  tokens of calibration rows; the ``k`` layers with the largest influence stay, in their order.

Width (Minitron, Muralidharan et al. 2024, §2.2): an MLP channel (intermediate neuron) ``c`` of a layer is scored by
the magnitude of its activation ``a_c`` — for a gated MLP the input of ``down_proj``, ``act(gate_c·x) · (up_c·x)`` —
averaged over a row's real tokens and aggregated over rows by the L2 norm (the paper's best aggregation, batch = L2,
sequence = mean; NVIDIA ModelOpt's Minitron does the same): ``F_c = sqrt(Σ_rows (mean_t |a_c,t|)²)``. The scores are
measured on the teacher in one pass, before any layer is removed (as Minitron's one-shot importance), and each kept
layer keeps its ``w`` highest-scoring channels: rows of ``gate_proj`` and ``up_proj``, columns of ``down_proj``.

The pruned model is a plain checkpoint of the teacher's class with ``num_hidden_layers = k`` (and
``intermediate_size = w``): the embeddings, final norm and head are the teacher's, and layer ``j`` is the teacher's
layer ``kept[j]`` (with its kept channels, in their order).
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
    return _largest(influence, k, "layers")


def top_channels(importance: list[float], width: int) -> list[int]:
    """The indices of the ``width`` most important channels, in channel order (ties: the earlier channel stays)."""
    return _largest(importance, width, "MLP channels")


def _largest(scores: list[float], k: int, what: str) -> list[int]:
    n = len(scores)
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} {what}: keep between 1 and {n}")
    ranked = sorted(range(n), key=lambda i: (-scores[i], i))
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


def gated_mlps(model) -> list:
    """Each decoder layer's MLP, checked to be a gated MLP of ``config.intermediate_size`` channels (``gate_proj``,
    ``up_proj``, ``down_proj``: Llama, Qwen2, Mistral, …), the layout width pruning slices."""
    mlps = [getattr(layer, "mlp", None) for layer in decoder_layers(model)]
    width = getattr(model.config, "intermediate_size", None)
    for mlp in mlps:
        parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if any(p is None for p in parts) or not parts[0].out_features == parts[1].out_features == width:
            raise ValueError(
                f"{type(model).__name__}: width pruning supports gated MLPs (gate_proj, up_proj, down_proj) of "
                f"config.intermediate_size channels, as Llama and Qwen2 have; remove init.mlp_width to prune by "
                "depth only"
            )
    return mlps


def channel_importance(model, batches) -> list[list[float]]:
    """Minitron's activation importance of every MLP channel of every decoder layer over ``batches`` (dicts with
    ``input_ids`` and ``attention_mask``, B × L): ``sqrt(Σ_rows (mean over the row's real tokens of |a_c|)²)``, where
    ``a`` is the input of ``down_proj`` (B × L × intermediate). One list of ``intermediate_size`` scores per layer."""
    import torch

    mlps = gated_mlps(model)
    squares, count = torch.zeros(len(mlps), model.config.intermediate_size, dtype=torch.float64), 0
    real = torch.zeros(0)

    def hook(index):
        def record(module, args):
            per_row = (args[0].float().abs() * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)  # B × intermediate
            squares[index] += per_row.double().pow(2).sum(dim=0)

        return record

    handles = [mlp.down_proj.register_forward_pre_hook(hook(i)) for i, mlp in enumerate(mlps)]
    try:
        model.eval()
        for batch in batches:
            real = batch["attention_mask"].float().unsqueeze(-1)  # B × L × 1: padding adds nothing, counts nowhere
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            count += int(batch["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("MLP channel importance needs calibration tokens: the calibration rows are empty")
    return squares.sqrt().tolist()


def keep_channels(model, channels: list[list[int]]):
    """A new model of ``model``'s class whose layer ``j`` keeps only the MLP channels ``channels[j]`` (increasing
    indices, the same count ``w`` in every layer), with ``intermediate_size = w``, sharing no tensors with ``model``:
    the rows of ``gate_proj`` and ``up_proj`` and the columns of ``down_proj`` at those indices."""
    import torch

    mlps = gated_mlps(model)
    n, width = model.config.intermediate_size, len(channels[0]) if channels else 0
    if len(channels) != len(mlps) or any(
        len(c) != width or not c or sorted(set(c)) != list(c) or c[0] < 0 or c[-1] >= n for c in channels
    ):
        raise ValueError(
            f"kept channels must be, for each of the {len(mlps)} layers, the same number of increasing "
            f"indices below {n}"
        )
    config = copy.deepcopy(model.config)
    config.intermediate_size = width
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")  # model.layers.<j>.mlp.<proj>.<weight|bias>
        if name.startswith("model.layers.") and parts[3] == "mlp" and parts[4] in ("gate_proj", "up_proj", "down_proj"):
            index = torch.tensor(channels[int(parts[2])])
            if parts[4] != "down_proj":
                tensor = tensor.index_select(0, index)  # one row per channel (and its bias)
            elif parts[5] == "weight":
                tensor = tensor.index_select(1, index)  # one column per channel; down_proj's bias is the output's
        state[name] = tensor.clone()
    pruned = type(model)(config).to(next(model.parameters()).dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.tie_weights()
    return pruned


def prune(model, layers: int, select: LayerSelect, mlp_width: int | None = None, batches=None) -> tuple[object, dict]:
    """(the pruned model, its record for ``pruning.json``): ``layers`` of the teacher's layers chosen by ``select``,
    then, with ``mlp_width``, that many MLP channels in each kept layer, the scores of both measured on the teacher
    over ``batches`` (needed by ``importance`` and by ``mlp_width``). The record holds what was kept and why: every
    layer's influence, and for each kept layer its kept channels and every channel's importance."""
    n = len(decoder_layers(model))
    record: dict = {"select": select.value, "teacher_layers": n}
    if (select is LayerSelect.importance or mlp_width is not None) and batches is None:
        raise ValueError("pruning by importance or MLP width needs calibration batches")
    if mlp_width is not None and not 1 <= mlp_width <= model.config.intermediate_size:
        raise ValueError(
            f"mlp_width {mlp_width}: keep between 1 and the teacher's {model.config.intermediate_size} MLP channels"
        )
    if select is LayerSelect.importance:
        record["influence"] = block_influence(model, batches)
        kept = most_influential(record["influence"], layers)
    else:
        kept = evenly_spaced(n, layers)
    scores = channel_importance(model, batches) if mlp_width is not None else None
    pruned = keep_layers(model, kept)
    record["kept"] = kept
    if scores is not None:
        channels = [top_channels(scores[i], mlp_width) for i in kept]
        pruned = keep_channels(pruned, channels)
        record |= {
            "mlp_width": mlp_width,
            "teacher_mlp_width": model.config.intermediate_size,
            "channels": [{"layer": i, "kept": c, "importance": scores[i]} for i, c in zip(kept, channels, strict=True)],
        }
    return pruned, record
