from pathlib import Path

import numpy as np
import pytest
import torch

from blockstate import build_model, list_models, model_config
from blockstate.carry import Carry, MemoryCarry, carry_for
from blockstate.cli import _count
from blockstate.data import PackedSequences, TokenizedSplit
from blockstate.evaluate import iter_losses
from blockstate.memory import Memory, SegmentCarry
from blockstate.registry import gss_hybrid_layers, samba_layers
from blockstate.step import TrainStep

BASELINES = list_models("baseline")
W = 16


def test_baselines_are_registered_with_their_layers():
    assert set(BASELINES) == {"transformer", "slide", "transformer-xl", "brt", "gss-hybrid", "samba"}
    kinds = lambda name, size: [type(l).__name__ for l in build_model(name, size).layers]  # noqa: E731
    assert kinds("slide", "tiny") == ["BlockAttentionLayer"] * 2
    assert model_config("slide", "small").self_attention == "sliding"
    assert model_config("transformer", "small").self_attention == "full"
    assert model_config("brt", "base").resolved_bst_layers == (9,)   # Rec:fixed:skip, layer 10 of 12
    # GSS-Hybrid: GSS layers with an attention layer after every three
    assert model_config("gss-hybrid", "base").resolved_bst_layers == (0, 1, 2, 4, 5, 6, 8, 9, 10)
    assert gss_hybrid_layers(6) == (0, 1, 2, 4, 5) and gss_hybrid_layers(2) == (0,)
    assert kinds("gss-hybrid", "tiny") == ["GSSLayer", "BlockAttentionLayer"]
    assert kinds("brt", "tiny") == ["BlockAttentionLayer", "BlockRecurrentLayer"]


def test_segment_recurrent_defaults_follow_the_paper():
    brt, xl = model_config("brt", "base"), model_config("transformer-xl", "base")
    assert brt.arch.states(brt) == 512 == brt.block_size   # Rec:fixed:skip, 512 states
    assert brt.resolved_memory_length == 512                        # its sliding window, carried
    assert xl.resolved_memory_length == 2048                        # Trsf-XL:2048
    assert model_config("slide", "base").resolved_memory_length == 0
    with pytest.raises(ValueError, match="multiple of block_size"):
        model_config("transformer-xl", "tiny", memory_length=24)
    with pytest.raises(ValueError, match="arch kind 'bst' has no field 'memory_length'"):
        model_config("slide", "tiny", memory_length=32)
    with pytest.raises(ValueError, match="arch kind 'transformer-xl' has no field 'recurrent_states'"):
        model_config("transformer-xl", "tiny", recurrent_states=8)


def test_brt_gate_and_state_projection_start_as_in_the_reference():
    layer = build_model("brt", "base", vocab_size=256, n_layers=2, bst_layers=[1], d_model=256,
                        n_heads=2, d_ff=64).layers[1]
    gate = torch.sigmoid(layer.gate_bias)
    assert abs(gate.mean().item() - 0.5) < 0.02 and gate.std().item() < 0.05  # meliad: N(0, 0.1)
    # the state's output projection is not a residual branch: no 1/sqrt(2 n_layers) scaling
    assert abs(layer.state_out.weight.std().item() - 0.02) < 0.002
    assert abs(layer.out.weight.std().item() - 0.02 / 2) < 0.001


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
    carry = SegmentCarry()
    first = model(tokens[:, :2 * W], carry=carry)
    second = model(tokens[:, 2 * W:], carry=carry)
    torch.testing.assert_close(torch.cat([first, second], 1), model(tokens), rtol=0, atol=1e-12)


def test_transformer_xl_sees_the_previous_segment_only_with_memory():
    model = _xl()
    previous = torch.randint(0, 256, (1, 2 * W))
    changed = previous.clone()
    changed[0, -3] = (changed[0, -3] + 1) % 256
    current = torch.randint(0, 256, (1, 2 * W))
    mem_a, mem_b = _memory_after(model, previous), _memory_after(model, changed)
    with_a = model(current, carry=SegmentCarry(mem_a))
    with_b = model(current, carry=SegmentCarry(mem_b))
    assert (with_a[:, :W] - with_b[:, :W]).abs().max() > 1e-6        # block 0 sees the memory
    # without memory (or with keep=False) the previous segment is invisible
    fresh = model(current)
    dropped = model(current, carry=SegmentCarry(mem_a), keep=torch.tensor([False]))
    torch.testing.assert_close(dropped, fresh, rtol=0, atol=1e-12)
    # causality across carried state: the memory never reaches back into the previous segment
    first_a = model(previous)
    torch.testing.assert_close(first_a[:, :-3], model(changed)[:, :-3], rtol=0, atol=1e-12)


def test_transformer_xl_sees_exactly_its_memory_length_back():
    """With M = 4W, a query at the start of a block sees the 4 blocks before it, across a sequence
    boundary through the memory, and nothing older (one layer, so no stacking)."""
    model = build_model("transformer-xl", "tiny", n_layers=1).double().eval()
    assert model.config.resolved_memory_length == 4 * W
    tokens = torch.randint(0, 256, (1, 8 * W))
    query = 6 * W                                   # first position of block 6
    for position, seen in ((query - 4 * W, True), (query - 4 * W - 1, False)):
        changed = tokens.clone()
        changed[0, position] = (changed[0, position] + 1) % 256
        # in one sequence, and split so that `position` lies in the memory of the second part
        whole = (model(changed)[0, query] - model(tokens)[0, query]).abs().max() > 0
        outs = []
        for t in (tokens, changed):
            carry = SegmentCarry(_memory_after(model, t[:, :4 * W]))
            outs.append(model(t[:, 4 * W:], carry=carry)[0, query - 4 * W])
        split = (outs[0] - outs[1]).abs().max() > 0
        assert whole == seen and split == seen, (position, whole, split)


def _memory_after(model, tokens):
    carry = SegmentCarry()
    model(tokens, carry=carry)
    return carry.memory


def _carried(model, tokens, split, keep=None):
    return model(tokens[:, split:], carry=SegmentCarry(_memory_after(model, tokens[:, :split])),
                 keep=keep)


def test_brt_memory_continues_the_sequence_exactly():
    model = build_model("brt", "tiny").double().eval()
    tokens = torch.randint(0, 256, (2, 6 * W))
    carry = SegmentCarry()
    first = model(tokens[:, :2 * W], carry=carry)
    assert isinstance(carry.memory, Memory) and set(carry.memory.states) == {1}
    second = model(tokens[:, 2 * W:], carry=carry)
    torch.testing.assert_close(torch.cat([first, second], 1), model(tokens), rtol=0, atol=1e-12)


def test_brt_state_crosses_the_sequence_boundary_only_when_carried():
    """A token of block 0 changes; block 3, in the next sequence and two blocks beyond the sliding
    window, depends on it through the carried state, and not when the state is reset."""
    model = _one_recurrent_layer()
    tokens = torch.randint(0, 256, (1, 6 * W))
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 256
    later = slice(W, 2 * W)  # block 3 of the whole, block 1 of the second sequence of 4W
    carried = [_carried(model, t, 2 * W)[:, later] for t in (tokens, changed)]
    assert (carried[0] - carried[1]).abs().max() > 1e-6
    keep = torch.tensor([False])
    reset = [_carried(model, t, 2 * W, keep)[:, later] for t in (tokens, changed)]
    assert (reset[0] - reset[1]).abs().max() == 0
    torch.testing.assert_close(reset[0], model(tokens[:, 2 * W:])[:, later], rtol=0, atol=0)


def test_memory_is_rejected_by_models_without_it_and_checked_for_shape():
    with pytest.raises(ValueError, match="transformer-xl and brt"):
        build_model("slide", "tiny")(torch.zeros(1, 16, dtype=torch.long), carry=SegmentCarry())
    model = build_model("transformer-xl", "tiny")
    memory = _memory_after(model, torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="memory does not fit"):
        model(torch.zeros(1, 16, dtype=torch.long), carry=SegmentCarry(memory))
    with pytest.raises(ValueError, match="multiple of block_size"):
        model(torch.zeros(2, 15, dtype=torch.long), carry=SegmentCarry())
    with pytest.raises(ValueError, match="with a carry"):
        model(torch.zeros(2, 16, dtype=torch.long), keep=torch.tensor([True, True]))
    with pytest.raises(ValueError, match="holds a blockstate.memory.Memory"):
        SegmentCarry({"inputs": []})


def test_samba_alternates_mamba_and_sliding_window_layers():
    """[Mamba, MLP, SWA, MLP] repeated: Mamba layers (selective SSM, width 2D) at even positions,
    Slide's sliding-window attention layers at odd ones, each with its MLP."""
    kinds = lambda size: [type(l).__name__ for l in build_model("samba", size).layers]  # noqa: E731
    assert kinds("tiny") == ["MambaLayer", "BlockAttentionLayer"]
    assert kinds("small") == ["MambaLayer", "BlockAttentionLayer"] * 3
    assert samba_layers(12) == (0, 2, 4, 6, 8, 10) and samba_layers(3) == (0, 2)
    config = model_config("samba", "small")
    assert config.self_attention == "sliding" and config.ssm.kind == "ssd"
    assert config.ssm_width == 2 * config.d_model and config.constant_inference_state
    assert model_config("samba", "small", ssm_width_divisor=2).ssm_width == 128
    layer = build_model("samba", "tiny").layers[0]
    assert layer.in_proj.weight.shape == (2 * 128, 64) and layer.out.weight.shape == (64, 128)
    assert layer.mlp.up.weight.shape[1] == 64


def test_samba_reaches_past_the_window_only_through_its_mamba_layers():
    model = build_model("samba", "tiny").double().eval()
    tokens = torch.randint(0, 256, (1, 4 * W))
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 256
    later = slice(3 * W, 4 * W)   # the window of block 3 covers blocks 2 and 3 only
    assert (model(changed)[:, later] - model(tokens)[:, later]).abs().max() > 1e-6
    no_ssm = build_model("samba", "tiny", bst_layers=[]).double().eval()
    assert (no_ssm(changed)[:, later] - no_ssm(tokens)[:, later]).abs().max() == 0


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
@pytest.mark.parametrize("name", ["samba", "bst-recommended"])
def test_samba_and_recommended_match_bst_within_10_percent_at_every_size(name, size):
    bst = _count("bst-sh-s4", size)
    assert abs(_count(name, size) - bst) <= 0.10 * bst


@pytest.mark.parametrize("name", ["bst-sh-s4", "transformer-xl"])
def test_models_with_and_without_memory_train_and_evaluate_through_the_same_calls(name, monkeypatch):
    """Training (`TrainStep`, as `train` drives it) and evaluation (`iter_losses`) make the same
    calls for every model: only the `Carry` that `carry_for` makes differs. Transformer-XL's reads
    lanes of whole documents and holds its memory after a batch; bst's reads shuffled windows and
    holds nothing."""
    calls = []

    def spy(method, original):
        def called(self, *args, **kw):
            calls.append(method)
            return original(self, *args, **kw)
        return called

    for cls in (Carry, MemoryCarry):
        for method in ("forward_args", "after_batch"):
            monkeypatch.setattr(cls, method, spy(method, getattr(cls, method)))
    tokens = np.random.default_rng(0).integers(3, 200, 2400)
    split = TokenizedSplit(tokens, np.array([0, 700, 1500, 2400]), 2400, {}, Path("."))
    data = PackedSequences(split, 32, pad_id=0)
    model = build_model(name, "tiny", dropout=0.0)
    carry = carry_for(model.config)
    step = TrainStep(model, torch.optim.AdamW(model.parameters()), torch.device("cpu"), "fp32",
                     grad_accum=2)
    stream = carry.stream(data, 4, seed=0)
    for _ in range(2):
        step(stream.next_batch(), 1e-3, carry)
    assert list(iter_losses(model, data, 4, 2, torch.device("cpu")))  # two batches, scored
    assert calls == ["forward_args", "forward_args", "after_batch"] * 2 + ["forward_args", "after_batch"] * 2
    assert isinstance(carry, MemoryCarry) == model.config.carries_memory
    assert (carry.tensors() is not None) == model.config.carries_memory
    assert type(carry_for(model.config, enabled=False)) is Carry  # --no-carry-memory
