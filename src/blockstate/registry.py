"""Named model presets and sizes: `list_models()` and `build_model(name, size, **overrides)`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .config import PAPER_BST_LAYERS, PAPER_DEPTH, ModelConfig, check_value_type, scale_bst_layers
from .model import BlockStateLM

# Architecture of each preset (paper Table 1 names: BST:<variant>:<kernel>).
PRESETS: dict[str, dict[str, Any]] = {
    "bst-sh-s4": {"context_variant": "sh", "ssm_kernel": "s4"},
    "bst-mh-s4": {"context_variant": "mh", "ssm_kernel": "s4"},
    "bst-mf-s4": {"context_variant": "mf", "ssm_kernel": "s4"},
    "bst-sh-s4d": {"context_variant": "sh", "ssm_kernel": "s4d"},
    "bst-sh-unstruct": {"context_variant": "sh", "ssm_kernel": "unstruct"},
    "bst-mh-unstruct": {"context_variant": "mh", "ssm_kernel": "unstruct"},
    "bst-mf-unstruct": {"context_variant": "mf", "ssm_kernel": "unstruct"},
    # Selective (input-dependent) context states: not in the paper (see ssm/selective.py).
    "bst-sh-ssd": {"context_variant": "sh", "ssm_kernel": "ssd"},
    "bst-mf-ssd": {"context_variant": "mf", "ssm_kernel": "ssd"},
    # The same with rotating modes whose phases the input advances, one real decay per head
    # (docs/results/long_range.md, section 8c: they learn selective copying, the default does not).
    "bst-sh-ssd-rotary": {"context_variant": "sh", "ssm_kernel": "ssd", "ssd_decay": "rotary"},
    "bst-mf-ssd-rotary": {"context_variant": "mf", "ssm_kernel": "ssd", "ssd_decay": "rotary"},
    # Recommended (docs/presets.md; not in the paper): the selective kernel with normalized B and
    # C, an output head of its own and the context outputs also read directly into the residual
    # stream, on an SSM as wide as the model with N = 64 (docs/results/long_range.md, sections 8f
    # and 8g: the settings that learn MQAR beyond the window and lower `tiny` perplexity by 22%).
    # Its MLP is narrowed per size (PRESET_SIZE_OVERRIDES) to stay within 10% of bst-sh-s4.
    "bst-recommended": {"context_variant": "sh", "ssm_kernel": "ssd", "ssd_bc_norm": True,
                        "tie_embeddings": False, "context_direct": True, "ssm_width_divisor": 1,
                        "ssm_state_size": 64},
    # Baselines (paper section 4). `bst_layers` of a baseline places its GSS or recurrent layers,
    # given for the paper's 12-layer depth and scaled to the size's depth.
    "transformer": {"self_attention": "full", "bst_layers": ()},
    "slide": {"self_attention": "sliding", "bst_layers": ()},
    "transformer-xl": {"arch": "transformer-xl", "self_attention": "sliding", "bst_layers": ()},
    "brt": {"arch": "brt", "self_attention": "sliding", "bst_layers": (9,)},
    # GSS-Hybrid (Mehta et al. 2022) is mostly GSS layers with an attention layer after every
    # three: its layers are placed by `gss_hybrid_layers`, not at BST's positions.
    "gss-hybrid": {"arch": "gss-hybrid", "ssm_kernel": "s4d", "gss_expansion": 6},
    # Samba (Ren et al. 2024; not in the paper): [Mamba, MLP, SWA, MLP] repeated, the Mamba
    # layers of the selective SSM at the even positions (`samba_layers`), the odd ones Slide's
    # sliding-window attention layers (see layers/samba.py).
    "samba": {"arch": "samba", "ssm_kernel": "ssd", "self_attention": "sliding"},
}
GSS_ATTENTION_EVERY = 4


def gss_hybrid_layers(n_layers: int) -> tuple[int, ...]:
    """Indices of GSS-Hybrid's GSS layers: all but every 4th layer (3, 7, 11 of 12 are attention),
    keeping at least one attention layer (the last) in shallow models."""
    attention = {i for i in range(n_layers) if (i + 1) % GSS_ATTENTION_EVERY == 0} or {n_layers - 1}
    return tuple(i for i in range(n_layers) if i not in attention)


def samba_layers(n_layers: int) -> tuple[int, ...]:
    """Indices of Samba's Mamba layers: every other layer from the first, so that each Mamba layer
    is followed by a sliding-window attention layer ([Mamba, MLP, SWA, MLP] repeated)."""
    return tuple(range(0, n_layers, 2))


# Where a baseline would fall more than 10% short of the BST presets' parameter count at a size,
# its MLP is widened so that comparisons are at a matched parameter budget.
PRESET_SIZE_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("transformer", "small"): {"d_ff": 1280},
    ("slide", "small"): {"d_ff": 1280},
    ("transformer-xl", "small"): {"d_ff": 1280},
    # GSS layers have no MLP; the expansion F / D brings gss-hybrid within 10% of bst-sh-s4.
    ("gss-hybrid", "tiny"): {"gss_expansion": 8},
    ("gss-hybrid", "large"): {"gss_expansion": 11},
    ("samba", "tiny"): {"d_ff": 352},
    # bst-recommended's wider SSM, direct read and untied head (V x D: a quarter of `small`) are
    # paid for with its MLP: 1.5 D at tiny and small, 3 D at base, 7 D at large.
    ("bst-recommended", "tiny"): {"d_ff": 96},
    ("bst-recommended", "small"): {"d_ff": 384},
    ("bst-recommended", "base"): {"d_ff": 3072},
    ("bst-recommended", "large"): {"d_ff": 7168},
}

# Sizes shared by all presets. `base` and `large` are the paper's (~200M / ~400M with a 32k vocab).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {  # for tests: seconds on a CPU
        "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 2, "block_size": 16,
        "max_seq_len": 128, "num_context_states": 4, "ssm_state_size": 8,
        "rel_pos_max_distance": 32, "unstruct_hidden": 32, "unstruct_frequencies": 4,
    },
    "small": {  # the CPU default
        "vocab_size": 8192, "d_model": 256, "n_layers": 6, "n_heads": 4, "block_size": 128,
        "max_seq_len": 1024, "num_context_states": 16,
    },
    "base": {  # paper: 12 layers, width 1024, 8 heads of 128, MLP 4096, W=512, L=4096
        "vocab_size": 32000, "d_model": 1024, "n_layers": 12, "n_heads": 8, "d_ff": 4096,
        "block_size": 512, "max_seq_len": 4096, "num_context_states": 32, "dropout": 0.05,
        "bst_layers": PAPER_BST_LAYERS,
    },
    "large": {  # paper's -L: 12 heads of 128, MLP 8192, BST at layers 1, 5, 7, 9
        "vocab_size": 32000, "d_model": 1024, "n_layers": 12, "n_heads": 12, "head_dim": 128,
        "d_ff": 8192, "block_size": 512, "max_seq_len": 4096, "num_context_states": 32,
        "dropout": 0.05, "bst_layers": (0, 4, 6, 8),
    },
}


def list_models() -> list[str]:
    """Names accepted by `build_model`."""
    return list(PRESETS)


def list_sizes() -> list[str]:
    return list(SIZES)


def model_config(name: str, size: str = "small", **overrides: Any) -> ModelConfig:
    """The validated config of preset `name` at `size` with `overrides` applied.

    Unless `bst_layers` is overridden, the preset's (or size's) layer placement is scaled to the
    depth, keeping the first layer for BST; gss-hybrid places its GSS layers by
    `gss_hybrid_layers` and samba its Mamba layers by `samba_layers`.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(PRESETS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; available sizes: {', '.join(SIZES)}")
    unknown = sorted(set(overrides) - set(ModelConfig.field_names()))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; accepted: "
                         f"{', '.join(ModelConfig.field_names())}")
    types = {f.name: str(f.type) for f in dataclasses.fields(ModelConfig)}
    for key, value in overrides.items():  # before any of them is used below
        check_value_type(key, value, types[key])
    preset = PRESETS[name]
    fields = {**SIZES[size], **preset, **PRESET_SIZE_OVERRIDES.get((name, size), {})}
    n_layers = overrides.get("n_layers", fields["n_layers"])
    if "bst_layers" in overrides:
        pass
    elif fields.get("arch") == "gss-hybrid":
        fields["bst_layers"] = gss_hybrid_layers(n_layers)
    elif fields.get("arch") == "samba":
        fields["bst_layers"] = samba_layers(n_layers)
    elif "bst_layers" in preset:
        fields["bst_layers"] = scale_bst_layers(n_layers, tuple(preset["bst_layers"]), PAPER_DEPTH)
    elif SIZES[size].get("bst_layers") is not None:
        fields["bst_layers"] = scale_bst_layers(n_layers, tuple(SIZES[size]["bst_layers"]),
                                                SIZES[size]["n_layers"])
    else:
        fields["bst_layers"] = scale_bst_layers(n_layers)
    fields.update(overrides)
    return ModelConfig(**fields)


def count_parameters(name: str, size: str = "small", **overrides: Any) -> int:
    """Parameters of preset `name` at `size` with `overrides`, counted on the meta device."""
    with torch.device("meta"):
        return build_model(name, size, **overrides).num_parameters()


def matched_mlp_width(name: str, size: str, overrides: dict[str, Any], reference: str = "bst-sh-s4",
                      tolerance: float = 0.1, own: dict[str, Any] | None = None) -> dict[str, Any]:
    """`{"d_ff": width}` that brings preset `name` within `tolerance` of `reference`'s parameter
    count at the same size and overrides (the paper compares models of similar size), or `{}` when
    it is within already; `own` are further overrides of `name` alone. The count is affine in the
    MLP width, so two counts give the width."""
    target = count_parameters(reference, size, **overrides)
    overrides = {**overrides, **(own or {})}
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
