"""Depth and width pruning (kdflow/models/pruning.py) on closed forms: which layers each rule keeps, ShortGPT's block
influence (0 for a layer that passes its input through; equal to the cosine computed from the model's own hidden
states), a pruned model that computes exactly what the teacher computes with the removed layers made identities;
Minitron's MLP channel importance (proportional to a channel's scale, 0 for a dead channel), a width-pruned model
that computes what the teacher computes with the dropped channels silenced, its size by closed form, and the recipe
checks."""

import copy
from pathlib import Path

import pytest
import torch

from kdflow.config.loading import RecipeError
from kdflow.config.recipe import parse_recipe
from kdflow.models.pruning import (
    LayerSelect,
    block_influence,
    channel_importance,
    evenly_spaced,
    keep_channels,
    keep_layers,
    most_influential,
    prune,
    top_channels,
)
from kdflow.training.tiny_models import llama_model, train_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 20, vocab_size=48)
    model = llama_model(tokenizer, hidden=64, layers=4, heads=2, intermediate=128, seed=0)
    for p in model.parameters():  # a freshly initialised Llama's layers barely move the residual: make them count
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    return model.eval(), tokenizer


def as_identity(model, layers: list[int]):
    """A copy of ``model`` in which each of ``layers`` adds nothing to the residual stream (its output projections
    zeroed): a pre-norm Llama layer is then the identity."""
    model = copy.deepcopy(model)
    for i in layers:
        model.model.layers[i].self_attn.o_proj.weight.data.zero_()
        model.model.layers[i].mlp.down_proj.weight.data.zero_()
    return model


def batch(tokenizer):
    enc = tokenizer(["the cat sat on the mat", "a dog ran"], return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_evenly_spaced_keeps_every_other_layer_at_half_depth():
    assert evenly_spaced(30, 15) == list(range(0, 30, 2))
    assert evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced(6, 4) == [0, 1, 3, 4]  # floor(i * 6 / 4)
    with pytest.raises(ValueError, match="cannot keep 31 of 30 layers"):
        evenly_spaced(30, 31)


def test_most_influential_keeps_the_largest_in_layer_order_earlier_on_ties():
    assert most_influential([0.9, 0.1, 0.5, 0.3], 2) == [0, 2]
    assert most_influential([0.2, 0.2, 0.2], 2) == [0, 1]
    with pytest.raises(ValueError, match="cannot keep 0 of 3"):
        most_influential([0.1, 0.2, 0.3], 0)


def test_block_influence_is_zero_for_a_pass_through_layer_and_matches_the_hidden_states(tiny):
    model, tokenizer = tiny
    b = batch(tokenizer)
    influence = block_influence(as_identity(model, [2]), [b])
    assert influence[2] == pytest.approx(0.0, abs=1e-6)
    assert min(influence[i] for i in (0, 1, 3)) > 1e-3

    # Against the definition, from the model's own hidden states (entry i enters layer i; the last entry is after the
    # final norm, so only layers 0..n-2 can be checked this way): 1 - mean over real tokens of cos(x_i, x_i+1).
    influence = block_influence(model, [b])
    with torch.no_grad():
        hidden = model(**b, output_hidden_states=True).hidden_states
    mask = b["attention_mask"].bool()
    for i in range(len(influence) - 1):
        cos = torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)[mask]
        assert influence[i] == pytest.approx(1 - cos.double().mean().item(), abs=1e-5)


def test_a_pruned_model_computes_what_the_teacher_does_with_the_removed_layers_as_identities(tiny):
    model, tokenizer = tiny
    pruned = keep_layers(model, [0, 3])
    assert pruned.config.num_hidden_layers == 2 and len(pruned.model.layers) == 2
    assert torch.equal(pruned.model.layers[1].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    assert pruned.model.layers[1].mlp.up_proj.weight.data_ptr() != model.model.layers[3].mlp.up_proj.weight.data_ptr()
    ids = batch(tokenizer)["input_ids"][:1]
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, as_identity(model, [1, 2])(ids).logits, atol=1e-5)
        assert torch.equal(keep_layers(model, [0, 1, 2, 3])(ids).logits, model(ids).logits)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in model.parameters()) - 2 * per_layer
    with pytest.raises(ValueError, match="increasing indices below 4"):
        keep_layers(model, [2, 1])


# ---- width: MLP channels (Minitron) ------------------------------------------------------------------------------

HIDDEN, LAYERS, INTERMEDIATE = 64, 4, 128  # the tiny fixture's shape


def silenced(model, channels: list[list[int]]):
    """A copy of ``model`` in which every channel of layer ``j`` not in ``channels[j]`` adds nothing (its column of
    ``down_proj`` zeroed): what a width-pruned model must compute."""
    model = copy.deepcopy(model)
    for j, kept in enumerate(channels):
        dropped = sorted(set(range(INTERMEDIATE)) - set(kept))
        model.model.layers[j].mlp.down_proj.weight.data[:, dropped] = 0
    return model


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_top_channels_keeps_the_largest_in_channel_order_earlier_on_ties():
    assert top_channels([0.1, 3.0, 0.0, 2.0, 2.0], 3) == [1, 3, 4]
    assert top_channels([1.0, 1.0, 1.0], 2) == [0, 1]
    with pytest.raises(ValueError, match="cannot keep 4 of 3 MLP channels"):
        top_channels([0.1, 0.2, 0.3], 4)


def test_a_width_pruned_model_has_the_new_intermediate_size_and_the_closed_form_parameter_count(tiny, tmp_path):
    model, tokenizer = tiny
    width = 32
    pruned = keep_channels(keep_layers(model, [0, 3]), [list(range(width))] * 2)
    assert pruned.config.intermediate_size == width and pruned.config.num_hidden_layers == 2
    mlp = pruned.model.layers[1].mlp
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (width, HIDDEN)
    assert mlp.down_proj.weight.shape == (HIDDEN, width)
    # each kept layer loses 3 · hidden · (intermediate − width) weights (no MLP biases in Llama); two layers are gone
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert params(pruned) == params(model) - 2 * per_layer - 2 * 3 * HIDDEN * (INTERMEDIATE - width)
    # a normal Hugging Face folder: it saves, and reloads with the new size and the same logits
    from transformers import AutoModelForCausalLM

    pruned.save_pretrained(tmp_path / "model")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(again).__name__ == "LlamaForCausalLM" and again.config.intermediate_size == width
    ids = batch(tokenizer)["input_ids"][:1]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, pruned(ids).logits)


def test_a_width_pruned_model_computes_what_the_teacher_does_with_the_dropped_channels_silenced(tiny):
    model, tokenizer = tiny
    generator = torch.Generator().manual_seed(0)
    channels = [sorted(torch.randperm(INTERMEDIATE, generator=generator)[:40].tolist()) for _ in range(LAYERS)]
    pruned = keep_channels(model, channels)
    assert torch.equal(pruned.model.layers[2].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight[channels[2]])
    ids = batch(tokenizer)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, silenced(model, channels)(ids).logits, atol=1e-5)
        everything = keep_channels(model, [list(range(INTERMEDIATE))] * LAYERS)
        assert torch.equal(everything(ids).logits, model(ids).logits)  # all channels kept: the teacher, exactly
    with pytest.raises(ValueError, match="same number of increasing indices below 128"):
        keep_channels(model, [[0, 1]] * 3 + [[1, 0]])


def scaled_channels(model, layer: int, scale: torch.Tensor):
    """A copy of ``model`` whose ``layer`` has every channel a copy of channel 0 scaled by ``scale`` (its ``up_proj``
    row times ``scale[c]``): then ``a_c = scale[c] · a_0`` at every token, so the importance is ``|scale[c]| · F_0``."""
    model = copy.deepcopy(model)
    mlp = model.model.layers[layer].mlp
    mlp.gate_proj.weight.data[:] = mlp.gate_proj.weight.data[0]
    mlp.up_proj.weight.data[:] = scale[:, None] * mlp.up_proj.weight.data[0]
    return model


def test_channel_importance_follows_each_channels_scale_and_the_top_ones_are_kept(tiny):
    model, tokenizer = tiny
    scale = torch.randperm(INTERMEDIATE, generator=torch.Generator().manual_seed(1)).float() - 40.0  # some negative
    scores = channel_importance(scaled_channels(model, 1, scale), [batch(tokenizer)])
    assert len(scores) == LAYERS and all(len(s) == INTERMEDIATE for s in scores)
    base = scores[1][int((scale == 1).nonzero())]  # the channel of scale 1: F_0
    assert base > 0
    assert torch.allclose(torch.tensor(scores[1], dtype=torch.float64), scale.abs().double() * base, rtol=1e-4)
    assert top_channels(scores[1], 10) == sorted(scale.abs().argsort(descending=True)[:10].tolist())


def test_channel_importance_is_minitrons_aggregate_mean_over_real_tokens_then_l2_over_rows(tiny):
    model, tokenizer = tiny
    b = batch(tokenizer)
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(**b)
    handle.remove()
    mask = b["attention_mask"].bool()
    rows = torch.stack([seen[0][r][mask[r]].abs().mean(dim=0) for r in range(len(mask))])  # rows × intermediate
    expected = rows.double().pow(2).sum(dim=0).sqrt()
    # padding changes nothing: the same rows in two batches of one give the same scores
    one_by_one = [{k: v[r : r + 1, mask[r]] for k, v in b.items()} for r in range(len(mask))]
    assert any(not m.all() for m in mask)  # the batch of two has padding
    for batches in ([b], one_by_one):
        scores = torch.tensor(channel_importance(model, batches)[0], dtype=torch.float64)
        assert torch.allclose(scores, expected, rtol=1e-5)


def test_a_dead_channel_is_dropped_first(tiny):
    model, tokenizer = tiny
    dead = copy.deepcopy(model)
    dead.model.layers[3].mlp.up_proj.weight.data[77] = 0  # its activation act(gate)·up is 0 at every token
    scores = channel_importance(dead, [batch(tokenizer)])
    assert scores[3][77] == 0.0 and min(s for c, s in enumerate(scores[3]) if c != 77) > 0
    pruned, record = prune(dead, 2, LayerSelect.every_other, INTERMEDIATE - 1, [batch(tokenizer)])
    assert record["kept"] == [0, 2]
    assert 77 in record["channels"][0]["kept"]  # layer 0's channel 77 is alive
    assert record["channels"][1]["layer"] == 2
    dead_layer = prune(dead, 4, LayerSelect.every_other, INTERMEDIATE - 1, [batch(tokenizer)])[1]["channels"][3]
    assert dead_layer["layer"] == 3 and dead_layer["kept"] == [c for c in range(INTERMEDIATE) if c != 77]


def test_prune_records_depth_and_width_and_keeps_every_channel_at_full_width(tiny):
    model, tokenizer = tiny
    b = [batch(tokenizer)]
    pruned, record = prune(model, 3, LayerSelect.importance, 48, b)
    assert record["kept"] == most_influential(block_influence(model, b), 3)
    assert pruned.config.intermediate_size == 48 and record["mlp_width"] == 48 and record["teacher_mlp_width"] == 128
    scores = channel_importance(model, b)
    for j, layer in enumerate(record["channels"]):
        assert layer["layer"] == record["kept"][j]
        assert (
            layer["kept"] == top_channels(scores[layer["layer"]], 48) and layer["importance"] == scores[layer["layer"]]
        )
    full, record = prune(model, 4, LayerSelect.every_other, INTERMEDIATE, b)
    ids = b[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(full(ids).logits, model(ids).logits)
    assert "channels" in record and "influence" not in record
    assert "channels" not in prune(model, 2, LayerSelect.every_other)[1]  # depth only: no calibration needed
    with pytest.raises(ValueError, match="keep between 1 and the teacher's 128 MLP channels"):
        prune(model, 2, LayerSelect.every_other, 129, b)


ROOT = Path(__file__).resolve().parents[2]
PRUNED = """  - name: pruned
    data: teacher
    init: {from: teacher, layers: 1, mlp_width: WIDTH}
    training: {max_steps: 2}

evaluation:"""


def recipe_with_width(width: str):
    return parse_recipe(
        (ROOT / "tests" / "mini.yaml").read_text().replace("evaluation:", PRUNED.replace("WIDTH", width), 1)
    )


def test_an_mlp_width_beyond_the_teachers_or_below_one_is_a_recipe_error_naming_the_field():
    r = recipe_with_width("128")  # the mini teacher's intermediate size: every channel
    assert r.students[-1].init.mlp_width == 128 and r.students[-1].init.label == "pruned-1-every-other-mlp128"
    with pytest.raises(
        RecipeError,
        match=r"<recipe>:\d+: students.2.init.mlp_width: student 'pruned': init.mlp_width 129 is more than the "
        r"teacher's 128 MLP channels per layer \(its intermediate_size\); keep between 1 and 128",
    ):
        recipe_with_width("129")
    with pytest.raises(RecipeError, match=r"students.2.init.*mlp_width.*greater than or equal to 1"):
        recipe_with_width("0")


@pytest.mark.slow
def test_the_prune_stage_of_a_flow_run_narrows_the_mlp_and_the_student_trains_from_it(prefect_server, mini_recipe):
    import json

    from transformers import AutoConfig

    from flows.distill import distill
    from kdflow.store import run_folder

    mini_recipe.write_text(mini_recipe.read_text().replace("evaluation:", PRUNED.replace("WIDTH", "64"), 1))
    report = distill(str(mini_recipe), students=["pruned"])
    assert {"pruned", "pruned-1-every-other-mlp64"} <= set(report["students"])  # the student and its floor
    assert report["students"]["pruned"]["init"] == "pruned from the teacher: 1 layers, every_other, MLP width 64"
    run_dir = mini_recipe.parent / "runs" / "mini"
    prune_out = Path(run_folder.latest(run_dir, "prune").path)
    record = json.loads((prune_out / "pruning.json").read_text())
    assert record["mlp_width"] == 64 and record["teacher_mlp_width"] == 128 and record["calibration_tokens"] > 0
    # the mini recipe's 40 train rows, not the 64 asked (the fifth audit found the ask recorded)
    assert record["calibration_rows"] == 40 and record["calibration_rows_asked"] == 64
    assert record["channels"][0]["kept"] == top_channels(record["channels"][0]["importance"], 64)
    student = Path(run_folder.latest(run_dir, "students", "pruned").path) / "model"
    assert AutoConfig.from_pretrained(student).intermediate_size == 64


# ---- the real model ----------------------------------------------------------------------------------------------

SMOLLM2_PARAMS_15 = 81_413_568  # SmolLM2-135M-Instruct with 15 of its 30 layers (hidden 576, MLP 1,536)


@pytest.mark.slow
def test_smollm2_pruned_to_15_layers_and_a_narrower_mlp_has_the_computed_size_and_runs(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdflow.models.gguf import import_gguf, mlp_width
    from kdflow.models.smollm2 import gguf_path

    import_gguf(gguf_path(), tmp_path / "teacher", "float32")  # the registry's GGUF, fetched once per machine
    assert mlp_width(str(gguf_path())) == mlp_width(str(tmp_path / "teacher")) == 1536  # what the recipe check reads
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    text = ["The capital of France is Paris.", "Write a haiku about the sea and the wind that moves it."]
    enc = tokenizer(text, return_tensors="pt", padding=True)
    calibration = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}]
    pruned, record = prune(teacher, 15, LayerSelect.importance, 768, calibration)
    assert len(record["kept"]) == 15 and [c["layer"] for c in record["channels"]] == record["kept"]
    assert all(len(c["kept"]) == 768 and len(c["importance"]) == 1536 for c in record["channels"])
    # each kept layer's gate, up and down projections lose 3 · 576 · (1536 − 768) weights
    assert params(pruned) == SMOLLM2_PARAMS_15 - 15 * 3 * 576 * (1536 - 768) == 61_507_008
    pruned.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert type(again).__name__ == "LlamaForCausalLM" and again.config.intermediate_size == 768
    assert again.config.num_hidden_layers == 15
    with torch.no_grad():
        logits = again(**enc).logits
    assert logits.shape == (2, enc["input_ids"].shape[1], 49_152) and torch.isfinite(logits).all()
