import pytest
import torch

from blockstate import build_model, list_models, model_config
from blockstate.cli import _count

BASELINES = ["transformer", "slide", "brt", "gss-hybrid"]
W = 16


def test_baselines_are_registered_with_their_layers():
    assert set(BASELINES) <= set(list_models())
    kinds = lambda name, size: [type(l).__name__ for l in build_model(name, size).layers]  # noqa: E731
    assert kinds("slide", "tiny") == ["BlockAttentionLayer"] * 2
    assert model_config("slide", "small").self_attention == "sliding"
    assert model_config("transformer", "small").self_attention == "full"
    assert model_config("brt", "base").resolved_bst_layers == (9,)   # Rec:fixed:skip, layer 10 of 12
    assert model_config("gss-hybrid", "base").resolved_bst_layers == (0, 6, 8)
    assert kinds("brt", "tiny") == ["BlockAttentionLayer", "BlockRecurrentLayer"]


@pytest.mark.parametrize("size", ["small", "base"])
@pytest.mark.parametrize("name", BASELINES)
def test_parameter_budget_matches_bst_within_10_percent(name, size):
    bst = _count("bst-sh-s4", size)
    assert abs(_count(name, size) - bst) <= 0.10 * bst


def _one_recurrent_layer():
    model = build_model("brt", "tiny", n_layers=1, bst_layers=[0]).double().eval()
    with torch.no_grad():
        model.layers[0].gate_bias.normal_()
    return model


def test_brt_state_carries_information_beyond_the_attention_window():
    model = _one_recurrent_layer()
    tokens = torch.randint(0, 256, (1, 3 * W))
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 256
    block2 = slice(2 * W, 3 * W)  # the sliding window of block 2 covers blocks 1 and 2 only
    assert (model(changed)[:, block2] - model(tokens)[:, block2]).abs().max() > 1e-6
    with torch.no_grad():  # a gate fixed at 1 never updates the state: the dependence is gone
        model.layers[0].gate_bias.fill_(1e4)
    assert (model(changed)[:, block2] - model(tokens)[:, block2]).abs().max() == 0


def test_slide_does_not_see_two_blocks_back():
    model = build_model("slide", "tiny", n_layers=1).double().eval()
    tokens = torch.randint(0, 256, (1, 3 * W))
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 256
    assert (model(changed)[:, 2 * W:] - model(tokens)[:, 2 * W:]).abs().max() == 0
    assert (model(changed)[:, W:2 * W] - model(tokens)[:, W:2 * W]).abs().max() > 1e-6


def test_transformer_sees_the_whole_past():
    model = build_model("transformer", "tiny").double().eval()
    tokens = torch.randint(0, 256, (1, 4 * W))
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 256
    assert (model(changed)[:, -1] - model(tokens)[:, -1]).abs().max() > 1e-6


def _xl():
    return build_model("transformer-xl", "tiny").double().eval()


def test_transformer_xl_memory_continues_the_sequence_exactly():
    model = _xl()
    tokens = torch.randint(0, 256, (2, 4 * W))
    first, memory = model(tokens[:, :2 * W], return_memory=True)
    second, _ = model(tokens[:, 2 * W:], memory=memory, return_memory=True)
    torch.testing.assert_close(torch.cat([first, second], 1), model(tokens), rtol=0, atol=1e-12)


def test_transformer_xl_sees_the_previous_segment_only_with_memory():
    model = _xl()
    previous = torch.randint(0, 256, (1, 2 * W))
    changed = previous.clone()
    changed[0, -3] = (changed[0, -3] + 1) % 256
    current = torch.randint(0, 256, (1, 2 * W))
    _, mem_a = model(previous, return_memory=True)
    _, mem_b = model(changed, return_memory=True)
    with_a = model(current, memory=mem_a)
    with_b = model(current, memory=mem_b)
    assert (with_a[:, :W] - with_b[:, :W]).abs().max() > 1e-6        # block 0 sees the memory
    # without memory (or with keep=False) the previous segment is invisible
    fresh = model(current)
    dropped = model(current, memory=mem_a, keep=torch.tensor([False]))
    torch.testing.assert_close(dropped, fresh, rtol=0, atol=1e-12)
    # causality across carried state: the memory never reaches back into the previous segment
    first_a = model(previous)
    torch.testing.assert_close(first_a[:, :-3], model(changed)[:, :-3], rtol=0, atol=1e-12)


def test_memory_is_rejected_by_models_without_it():
    with pytest.raises(ValueError, match="transformer-xl"):
        build_model("slide", "tiny")(torch.zeros(1, 16, dtype=torch.long), return_memory=True)
