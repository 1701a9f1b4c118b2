"""Depth pruning (kdflow/models/pruning.py) on closed forms: which layers each rule keeps, ShortGPT's block influence
(0 for a layer that passes its input through; equal to the cosine computed from the model's own hidden states), and
a pruned model that computes exactly what the teacher computes with the removed layers made identities."""

import copy

import pytest
import torch

from kdflow.models.pruning import block_influence, evenly_spaced, keep_layers, most_influential
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
