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
