"""Named model presets and sizes: `list_models(*tags)`, `presets(*tags)` and
`build_model(name, size, **overrides)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .components import component_class
from .config import (
    COMPONENT_FIELDS,
    PAPER_BST_LAYERS,
    PAPER_DEPTH,
    ModelConfig,
    check_value_type,
    merge,
    nest,
    paths,
    scale_bst_layers,
)
from .layers.gss import GSS_ATTENTION_EVERY, gss_hybrid_layers  # noqa: F401 - placements of
from .layers.samba import samba_layers  # noqa: F401 - the baselines' layers, re-exported here
from .model import BlockStateLM

# Tags: what a preset is, for selecting presets without reading their names.
PAPER = "paper"                  # a model of the paper's Table 1 or one of its baselines (section 4)
BASELINE = "baseline"            # a model other than BST, to compare BST with
BST = "bst"                      # a Block-State Transformer (BST layers with context states)
RECOMMENDED = "recommended"      # this project's recommended BST (docs/presets.md)
EXPERIMENTAL = "experimental"    # a variant under study, not in the paper nor recommended
CONSTANT_STATE = "constant-state"  # its generation cache does not grow with the context
SELECTIVE = "selective"          # its SSM is the selective (input-dependent) kernel, ssm/selective.py
TAGS = (PAPER, BASELINE, BST, RECOMMENDED, EXPERIMENTAL, CONSTANT_STATE, SELECTIVE)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model: the `ModelConfig` fields it sets over its size's (`SIZES`) and the tags that
    say what it is (`TAGS`). Tags are declared, not derived from the name; tests check the ones a
    config also shows (constant-state, selective, bst) against `model_config`."""

    name: str
    description: str
    overrides: Mapping[str, Any]    # field paths ("ssm.kind", "context.direct", "d_ff", ...)
    tags: frozenset[str]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tags) - set(TAGS))
        if unknown:
            raise ValueError(f"preset {self.name!r}: unknown tag(s) {unknown}; known: {', '.join(TAGS)}")
        object.__setattr__(self, "tags", frozenset(self.tags))
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))


def _preset(name: str, description: str, tags: tuple[str, ...], **overrides: Any) -> Preset:
    return Preset(name, description, paths(nest(overrides)), frozenset(tags))


_PRESETS = (
    # Paper Table 1 names: BST:<variant>:<kernel>.
    _preset("bst-sh-s4", "BST:SH:S4, single-head context states from an S4 kernel",
            (PAPER, BST, CONSTANT_STATE), context="sh", ssm="s4"),
    _preset("bst-mh-s4", "BST:MH:S4, multi-head context states from an S4 kernel",
            (PAPER, BST, CONSTANT_STATE), context="mh", ssm="s4"),
    _preset("bst-mf-s4", "BST:MF:S4, multi-filter context states from an S4 kernel",
            (PAPER, BST, CONSTANT_STATE), context="mf", ssm="s4"),
    _preset("bst-sh-s4d", "BST:SH:S4D, single-head context states from a diagonal S4D kernel",
            (PAPER, BST, CONSTANT_STATE), context="sh", ssm="s4d"),
    # Unstructured kernels are explicit convolutions: their streamed decode keeps the input history.
    _preset("bst-sh-unstruct", "BST:SH:UNSTRUCT, single-head context states from an unstructured "
            "kernel", (PAPER, BST), context="sh", ssm="unstruct"),
    _preset("bst-mh-unstruct", "BST:MH:UNSTRUCT, multi-head context states from an unstructured "
            "kernel", (PAPER, BST), context="mh", ssm="unstruct"),
    _preset("bst-mf-unstruct", "BST:MF:UNSTRUCT, multi-filter context states from an unstructured "
            "kernel", (PAPER, BST), context="mf", ssm="unstruct"),
    # Selective (input-dependent) context states: not in the paper (see ssm/selective.py).
    _preset("bst-sh-ssd", "BST:SH with the selective kernel, one decay per head",
            (EXPERIMENTAL, BST, CONSTANT_STATE, SELECTIVE), context="sh", ssm="ssd"),
    _preset("bst-mf-ssd", "BST:MF with the selective kernel, one decay per head",
            (EXPERIMENTAL, BST, CONSTANT_STATE, SELECTIVE), context="mf", ssm="ssd"),
    # The same with rotating modes whose phases the input advances, one real decay per head: the
    # rotation lets a state tell positions apart, which selective copying needs (learned there; the
    # default kind does not learn it).
    _preset("bst-sh-ssd-rotary", "BST:SH with the selective kernel, rotating modes",
            (EXPERIMENTAL, BST, CONSTANT_STATE, SELECTIVE), context="sh",
            ssm={"kind": "ssd", "decay": "rotary"}),
    _preset("bst-mf-ssd-rotary", "BST:MF with the selective kernel, rotating modes",
            (EXPERIMENTAL, BST, CONSTANT_STATE, SELECTIVE), context="mf",
            ssm={"kind": "ssd", "decay": "rotary"}),
    # Recommended (docs/presets.md; not in the paper): the selective kernel with normalized B and
    # C, an output head of its own and the context outputs also read directly into the residual
    # stream, on an SSM as wide as the model with N = 64: the settings that learn MQAR beyond the
    # window and lower `tiny` perplexity (docs/results/recommended.md).
    # Its MLP is narrowed per size (PRESET_SIZE_OVERRIDES) to stay within 10% of bst-sh-s4.
    _preset("bst-recommended", "BST:SH with the selective kernel, normalized B and C, a direct read "
            "of the context outputs and an untied output head", (RECOMMENDED, BST, CONSTANT_STATE,
                                                                  SELECTIVE),
            context={"kind": "sh", "direct": True},
            ssm={"kind": "ssd", "bc_norm": True, "width_divisor": 1, "state_size": 64},
            tie_embeddings=False),
    # Baselines (paper section 4). `bst_layers` of a baseline places its GSS or recurrent layers,
    # given for the paper's 12-layer depth and scaled to the size's depth.
    _preset("transformer", "Transformer with full causal self-attention", (PAPER, BASELINE),
            self_attention="full", bst_layers=()),
    _preset("slide", "Slide: sliding-window self-attention only", (PAPER, BASELINE, CONSTANT_STATE),
            self_attention="sliding", bst_layers=()),
    _preset("transformer-xl", "Transformer-XL: segment recurrence over a memory of past blocks",
            (PAPER, BASELINE, CONSTANT_STATE), arch="transformer-xl", self_attention="sliding",
            bst_layers=()),
    _preset("brt", "Block-Recurrent Transformer: one recurrent layer", (PAPER, BASELINE,
                                                                         CONSTANT_STATE),
            arch="brt", self_attention="sliding", bst_layers=(9,)),
    # GSS-Hybrid (Mehta et al. 2022) is mostly GSS layers with an attention layer after every
    # three: its layers are placed by `gss_hybrid_layers`, not at BST's positions.
    _preset("gss-hybrid", "GSS-Hybrid: gated state space layers and an attention layer every four",
            (PAPER, BASELINE, CONSTANT_STATE), arch={"kind": "gss-hybrid", "expansion": 6},
            ssm="s4d"),
    # Samba (Ren et al. 2024; not in the paper): [Mamba, MLP, SWA, MLP] repeated, the Mamba
    # layers of the selective SSM at the even positions (`samba_layers`), the odd ones Slide's
    # sliding-window attention layers (see layers/samba.py).
    _preset("samba", "Samba: selective SSM (Mamba) layers alternating with sliding-window "
            "attention", (BASELINE, CONSTANT_STATE, SELECTIVE), arch="samba", ssm="ssd",
            self_attention="sliding"),
)
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


# Where a baseline would fall more than 10% short of the BST presets' parameter count at a size,
# its MLP is widened so that comparisons are at a matched parameter budget.
PRESET_SIZE_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("transformer", "small"): {"d_ff": 1280},
    ("slide", "small"): {"d_ff": 1280},
    ("transformer-xl", "small"): {"d_ff": 1280},
    # GSS layers have no MLP; the expansion F / D brings gss-hybrid within 10% of bst-sh-s4.
    ("gss-hybrid", "tiny"): {"arch.expansion": 8},
    ("gss-hybrid", "large"): {"arch.expansion": 11},
    ("samba", "tiny"): {"d_ff": 352},
    # bst-recommended's wider SSM, direct read and untied head (V x D: a quarter of `small`) are
    # paid for with its MLP: 1.5 D at tiny and small, 3 D at base, 7 D at large.
    ("bst-recommended", "tiny"): {"d_ff": 96},
    ("bst-recommended", "small"): {"d_ff": 384},
    ("bst-recommended", "base"): {"d_ff": 3072},
    ("bst-recommended", "large"): {"d_ff": 7168},
}

# Sizes shared by all presets. `base` and `large` are the paper's (~200M / ~400M with a 32k vocab).
# Component fields apply to the kinds that have them (`ssm.hidden` only to unstructured kernels).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {  # for tests: seconds on a CPU
        "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 2, "block_size": 16,
        "max_seq_len": 128, "context.states": 4, "ssm.state_size": 8,
        "rel_pos_max_distance": 32, "ssm.hidden": 32, "ssm.frequencies": 4,
    },
    "small": {  # the CPU default
        "vocab_size": 8192, "d_model": 256, "n_layers": 6, "n_heads": 4, "block_size": 128,
        "max_seq_len": 1024, "context.states": 16,
    },
    "base": {  # paper: 12 layers, width 1024, 8 heads of 128, MLP 4096, W=512, L=4096
        "vocab_size": 32000, "d_model": 1024, "n_layers": 12, "n_heads": 8, "d_ff": 4096,
        "block_size": 512, "max_seq_len": 4096, "context.states": 32, "dropout": 0.05,
        "bst_layers": PAPER_BST_LAYERS,
    },
    "large": {  # paper's -L: 12 heads of 128, MLP 8192, BST at layers 1, 5, 7, 9
        "vocab_size": 32000, "d_model": 1024, "n_layers": 12, "n_heads": 12, "head_dim": 128,
        "d_ff": 8192, "block_size": 512, "max_seq_len": 4096, "context.states": 32,
        "dropout": 0.05, "bst_layers": (0, 4, 6, 8),
    },
}


def presets(*tags: str) -> list[Preset]:
    """The presets that carry every one of `tags` (all presets with none), in registry order."""
    unknown = sorted(set(tags) - set(TAGS))
    if unknown:
        raise ValueError(f"unknown tag(s) {unknown}; known tags: {', '.join(TAGS)}")
    return [p for p in PRESETS.values() if p.tags.issuperset(tags)]


def list_models(*tags: str) -> list[str]:
    """Names accepted by `build_model`; with `tags`, only those of presets carrying all of them
    (e.g. `list_models("paper", "baseline")`)."""
    return [p.name for p in presets(*tags)]


def get_preset(name: str) -> Preset:
    """Preset `name`; a ValueError naming the available ones if there is none."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(PRESETS)}")
    return PRESETS[name]


def list_sizes() -> list[str]:
    return list(SIZES)


def model_config(name: str, size: str = "small", **overrides: Any) -> ModelConfig:
    """The validated config of preset `name` at `size` with `overrides` applied (as
    `ModelConfig.with_overrides` takes them: fields, field paths, components as kinds or dicts).

    Unless `bst_layers` is overridden, the preset's (or size's) layer placement is scaled to the
    depth, keeping the first layer for BST; an arch with a placement of its own (gss-hybrid,
    samba: `ArchOptions.default_layers`) places its layers by it.
    """
    preset = get_preset(name).overrides
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; available sizes: {', '.join(SIZES)}")
    mine = nest(overrides)
    types = {f.name: str(f.type) for f in dataclasses.fields(ModelConfig)}
    for key, value in mine.items():  # before any of them is used below
        if key not in COMPONENT_FIELDS:
            if key not in types:
                raise ValueError(f"unknown override {key!r}; accepted: the fields "
                                 f"{', '.join(ModelConfig.field_names())}, their paths (e.g. "
                                 f"ssm.state_size) and the flat names of format 1")
            check_value_type(key, value, types[key])
    layers = [nest(SIZES[size], lenient=True), nest(preset),
              nest(PRESET_SIZE_OVERRIDES.get((name, size), {})), mine]
    fields = merge(layers)
    n_layers = fields["n_layers"]
    arch = component_class("arch", fields.get("arch", {}).get("kind", "bst"))
    if "bst_layers" in mine:
        pass
    elif arch.default_layers(n_layers) is not None:
        fields["bst_layers"] = arch.default_layers(n_layers)
    elif "bst_layers" in preset:
        fields["bst_layers"] = scale_bst_layers(n_layers, tuple(preset["bst_layers"]), PAPER_DEPTH)
    elif SIZES[size].get("bst_layers") is not None:
        fields["bst_layers"] = scale_bst_layers(n_layers, tuple(SIZES[size]["bst_layers"]),
                                                SIZES[size]["n_layers"])
    else:
        fields["bst_layers"] = scale_bst_layers(n_layers)
    return ModelConfig.from_dict(fields)


def applicable_overrides(name: str, size: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The entries of `overrides` that preset `name` has a field for: component fields of kinds
    it does not use are left out (for settings shared by presets of different kinds, such as a
    scale's state size and unstructured-filter width)."""
    have = set(paths(model_config(name, size).to_dict()))
    return {key: value for key, value in overrides.items()
            if all(path in have or "." not in path for path in paths(nest({key: value})))}


def count_parameters(name: str, size: str = "small", **overrides: Any) -> int:
    """Parameters of preset `name` at `size` with `overrides`, counted on the meta device."""
    with torch.device("meta"):
        return build_model(name, size, **overrides).num_parameters()


def matched_mlp_width(name: str, size: str, overrides: dict[str, Any], reference: str = "bst-sh-s4",
                      tolerance: float = 0.1, own: dict[str, Any] | None = None) -> dict[str, Any]:
    """`{"d_ff": width}` that brings preset `name` within `tolerance` of `reference`'s parameter
    count at the same size and overrides (the paper compares models of similar size), or `{}` when
    it is within already; `own` are further overrides of `name` alone. The count is affine in the
    MLP width, so two counts give the width. Component fields in `overrides` apply to each model
    where its kinds have them (`applicable_overrides`)."""
    target = count_parameters(reference, size, **applicable_overrides(reference, size, overrides))
    overrides = applicable_overrides(name, size, {**overrides, **(own or {})})
    if abs(count_parameters(name, size, **overrides) - target) <= tolerance * target:
        return {}
    low, high = 16, 32
    p_low, p_high = (count_parameters(name, size, **{**overrides, "d_ff": f}) for f in (low, high))
    slope = (p_high - p_low) / (high - low)
    return {"d_ff": max(16, 16 * round((low + (target - p_low) / slope) / 16))}


def mlp_sized_per_size(name: str) -> bool:
    """Whether preset `name` sets its MLP width per size (`PRESET_SIZE_OVERRIDES`) to meet the
    parameter budget, so that a caller changing the model's width must choose it again."""
    return any(preset == name and "d_ff" in fields
               for (preset, _), fields in PRESET_SIZE_OVERRIDES.items())


def build_model(name: str, size: str = "small", **overrides: Any) -> nn.Module:
    """Build preset `name` (see `list_models()`) at `size` (tiny, small, base, large)."""
    return BlockStateLM(model_config(name, size, **overrides))
