import json

import pytest

import blockstate
from blockstate import ModelConfig, build_model, list_models, model_config
from blockstate.config import scale_bst_layers

PRESETS = ["bst-sh-s4", "bst-mh-s4", "bst-mf-s4", "bst-sh-s4d", "bst-sh-unstruct",
           "bst-mh-unstruct", "bst-mf-unstruct"]


def test_registry_lists_the_presets_and_sizes():
    assert list_models("paper", "bst") == PRESETS   # the paper's Table 1, in its order
    assert blockstate.list_sizes() == ["tiny", "small", "base", "large"]


def test_paper_sizes():
    base = model_config("bst-sh-s4", "base")
    assert (base.n_layers, base.d_model, base.n_heads, base.block_size, base.max_seq_len) == (
        12, 1024, 8, 512, 4096)
    assert base.resolved_bst_layers == (0, 6, 8) and base.ssm_width == 256
    assert base.resolved_head_dim == 128 and base.resolved_d_ff == 4096
    assert model_config("bst-mf-s4", "base").ssm_width == 128          # D/8 for MF
    large = model_config("bst-sh-s4", "large")
    assert large.resolved_bst_layers == (0, 4, 6, 8) and large.n_heads * large.resolved_head_dim == 1536
    small = model_config("bst-sh-s4", "small")
    assert small.d_model == 256 and small.block_size == 128 and small.max_seq_len == 1024
    assert 4 <= small.n_layers <= 6


def test_bst_layer_placement_scales_with_depth():
    assert scale_bst_layers(12) == (0, 6, 8)
    assert scale_bst_layers(1) == (0,)
    for n in range(1, 30):
        layers = scale_bst_layers(n)
        assert layers[0] == 0 and all(0 <= i < n for i in layers)
    assert model_config("bst-sh-s4", "base", n_layers=24).resolved_bst_layers == (0, 12, 16)
    assert model_config("bst-sh-s4", "large", n_layers=6).resolved_bst_layers == (0, 2, 3, 4)
    assert model_config("bst-sh-s4", "base", n_layers=4, bst_layers=[1]).resolved_bst_layers == (1,)


def test_overrides_reach_the_model():
    model = build_model("bst-mf-s4", "tiny", vocab_size=100, d_model=32, n_heads=4, block_size=8,
                        ssm_state_size=4, num_context_states=3, n_layers=3, bst_layers=[0, 2])
    c = model.config
    assert (c.vocab_size, c.d_model, c.n_heads, c.block_size, c.ssm.state_size,
            c.context.states, c.n_layers, c.bst_layers) == (100, 32, 4, 8, 4, 3, 3, (0, 2))
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["BSTLayer", "BlockAttentionLayer", "BSTLayer"]
    assert model.layers[0].context.initial_context.shape == (3, 32)


def test_json_round_trip():
    config = model_config("bst-mh-unstruct", "small", bst_layers=[0, 2])
    text = config.to_json()
    assert json.loads(text)["bst_layers"] == [0, 2]
    assert ModelConfig.from_json(text) == config


@pytest.mark.parametrize("overrides, field", [
    ({"block_size": 0}, "block_size"),
    ({"n_heads": 3}, "n_heads"),
    ({"bst_layers": [0, 7]}, "bst_layers"),
    ({"bst_layers": [0, 0]}, "bst_layers"),
    ({"context": "xx"}, "context.kind='xx' is not valid; registered context kinds: sh, mh, mf"),
    ({"ssm": "s5"}, "ssm.kind='s5'"),
    ({"ssm.state_size": 7}, "ssm.state_size=7 must be even"),
    ({"ssm.state_size": 0}, "ssm.state_size=0 is not valid"),
    ({"context": {"kind": "mf", "states": "4"}}, "context.states='4'"),
    ({"arch.memory_length": 64}, "arch kind 'bst' has no field 'memory_length'"),
    ({"ssm.decay": "rotary"}, "ssm kind 's4' has no field 'decay'"),
    ({"ssm_kernel": "s5"}, "ssm.kind='s5'"),                   # format 1's flat names
    ({"dropout": 1.5}, "dropout"),
    ({"self_attention": "global"}, "self_attention"),
    ({"vocab_size": -1}, "vocab_size"),
])
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        model_config("bst-sh-s4", "tiny", **overrides)


def test_unknown_names_list_the_alternatives():
    with pytest.raises(ValueError, match="bst-sh-s4"):
        build_model("bst-xx")
    with pytest.raises(ValueError, match="tiny"):
        build_model("bst-sh-s4", size="huge")
    with pytest.raises(ValueError, match="unknown override"):
        build_model("bst-sh-s4", "tiny", width=3)
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({"d_model": 64, "colour": "red"})
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json("{")


def test_ssm_width_divisor_sets_the_width_the_ssm_runs_on():
    """The SSM runs on a down-projection of width D / ssm.width_divisor: by default D/4 for SH
    and MH and D/8 for MF (the paper's choices); an explicit divisor overrides both, and the
    model still maps tokens to logits and stays causal."""
    import torch

    for name, default in (("bst-sh-s4", 4), ("bst-mh-s4", 4), ("bst-mf-s4", 8)):
        assert model_config(name, "tiny").ssm_width == 64 // default
        model = build_model(name, "tiny", **{"ssm.width_divisor": 2})
        context = model.layers[0].context
        assert context.down.out_features == 32 and context.ssm.kernel.width == 32
    torch.manual_seed(0)
    model = build_model("bst-sh-s4", "tiny", ssm={"width_divisor": 16}).double().eval()
    assert model.layers[0].context.down.out_features == 4
    tokens = torch.randint(0, 256, (1, 48))
    changed = tokens.clone()
    changed[0, 30] = (changed[0, 30] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (1, 48, 256)
    assert (a[0, :30] - b[0, :30]).abs().max() < 1e-10 < (a[0, 30:] - b[0, 30:]).abs().max()


def test_recommended_preset_carries_the_long_range_settings():
    """docs/presets.md: the selective kernel with normalized B and C, an untied head and the direct
    context read, on an SSM as wide as the model with N = 64; the MLP pays for them."""
    for size in ("tiny", "small", "base", "large"):
        config = model_config("bst-recommended", size)
        assert (config.ssm.kind, config.context.kind) == ("ssd", "sh")
        assert config.ssm.bc_norm and config.context.direct and not config.tie_embeddings
        assert config.ssm_width == config.d_model and config.ssm.state_size == 64
        assert config.resolved_d_ff < model_config("bst-sh-s4", size).resolved_d_ff
    assert model_config("bst-recommended", "tiny").resolved_d_ff == 96


def test_constant_inference_state_is_declared_by_the_config():
    """What tests/test_generate.py selects the constant-state presets by: full attention and
    unstructured kernels keep a history that grows; windows and state-space states do not."""
    assert not model_config("transformer", "tiny").constant_inference_state
    assert not model_config("bst-sh-unstruct", "tiny").constant_inference_state
    assert not model_config("bst-sh-s4", "tiny", self_attention="full").constant_inference_state
    for name in ("bst-sh-s4", "bst-sh-ssd-rotary", "bst-recommended", "slide", "samba", "brt"):
        assert model_config(name, "tiny").constant_inference_state
    assert model_config("slide", "tiny", ssm_kernel="unstruct").constant_inference_state  # no SSM layer


def test_the_core_config_is_small_and_components_own_their_fields():
    """At most 20 top-level fields; kernel, context and baseline settings live in the components
    (`ssm`, `context`, `arch`), each with a kind and only that kind's fields."""
    import dataclasses

    from blockstate.components import kinds
    from blockstate.config import LEGACY_FIELDS

    core = [f.name for f in dataclasses.fields(ModelConfig)]
    assert len(core) <= 20
    assert not set(core) & (set(LEGACY_FIELDS) - {"arch"})
    assert set(kinds("ssm")) >= {"s4", "s4d", "unstruct", "explicit", "ssd"}
    assert set(kinds("context")) >= {"sh", "mh", "mf"}
    assert set(kinds("arch")) >= {"bst", "transformer-xl", "brt", "gss-hybrid", "samba"}
    assert set(kinds("decay")) >= {"head", "state", "complex", "rotary"}
    config = model_config("bst-recommended", "tiny")
    assert config.to_dict()["ssm"] == {"kind": "ssd", "width_divisor": 1, "chunk_size": 64,
                                       "state_size": 64, "dt_min": 1e-3, "dt_max": 0.1, "heads": None,
                                       "decay": {"kind": "head"}, "bc_norm": True}
    assert "direct" not in model_config("bst-mf-s4", "tiny").to_dict()["context"]


def test_override_spellings_agree():
    """A field path, a component dict, a kind with fields and format 1's flat name are one
    override; changing a kind keeps the fields the new kind has."""
    expected = model_config("bst-sh-s4", "tiny", ssm={"kind": "s4d", "init": "lin"})
    assert model_config("bst-sh-s4", "tiny", **{"ssm.kind": "s4d", "ssm.init": "lin"}) == expected
    assert model_config("bst-sh-s4", "tiny", ssm_kernel="s4d", s4d_init="lin") == expected
    assert expected.ssm.state_size == 8                          # the tiny size's, carried over
    rotary = model_config("bst-sh-s4", "tiny", ssm={"kind": "ssd", "decay": "rotary"})
    assert rotary.with_overrides(**{"ssm.decay.still_modes": 2}).ssm.decay.still_modes == 2
    assert rotary.with_overrides(ssm="s4").ssm.to_dict() == model_config("bst-sh-s4", "tiny").ssm.to_dict()
    with pytest.raises(ValueError, match="ssm.decay.kind='spin' is not valid"):
        rotary.with_overrides(**{"ssm.decay": "spin"})
    with pytest.raises(ValueError, match="d_model=.* must be of type int"):
        model_config("bst-sh-s4", "tiny", **{"d_model.ssm": 3})


def test_format_1_configs_are_read_and_their_unused_fields_ignored():
    """Format 1 stored every flat field of every kind; reading it keeps the chosen kinds' values."""
    flat = {"arch": "bst", "context_variant": "mf", "ssm_kernel": "s4d", "ssm_state_size": 4,
            "s4d_init": "lin", "num_context_states": 3, "ssd_decay": "head", "unstruct_hidden": 32,
            "memory_length": None, "d_model": 32, "n_heads": 2, "block_size": 8}
    config = ModelConfig.from_dict(flat)
    assert config.ssm.to_dict() == {"kind": "s4d", "width_divisor": None, "chunk_size": 64,
                                    "method": "auto", "state_size": 4, "dt_min": 1e-3, "dt_max": 0.1,
                                    "init": "lin"}
    assert config.context.to_dict() == {"kind": "mf", "activation": "gelu", "norm": "none", "states": 3}
    assert ModelConfig.from_dict(config.to_dict()) == config
