"""Memory a request would need, checked before anything is allocated or written.

The estimates are lower bounds (weights, gradients and AdamW's two moments in float32, plus a
few activations of width d_model per layer and token, and the logits), so a request refused here
could never have run; one accepted may still need more than estimated.
"""

from __future__ import annotations

import os
from typing import Any

import torch

GIB = 2**30
# Bytes per parameter while training: float32 weights, gradients and AdamW's two moments.
TRAIN_BYTES_PER_PARAMETER = 16
# At least this many float32 values of width d_model per layer and token are kept for backward.
ACTIVATIONS_PER_LAYER = 4
# Depths above this are counted on a model this deep and extrapolated (building 10^5 layers,
# even on the meta device, takes minutes).
EXACT_DEPTH = 32


def available_memory(device: torch.device) -> int | None:
    """Bytes a process can use on `device`: the GPU's total memory, or the host's available
    memory (Linux's MemAvailable, else its physical memory); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def count_parameters(name: str, size: str, overrides: dict[str, Any]) -> int:
    """Parameters of preset `name` at `size` with `overrides`, counted on the meta device (no
    memory is allocated); deep models are counted at EXACT_DEPTH layers and extrapolated."""
    from .registry import build_model, model_config

    depth = model_config(name, size, **overrides).n_layers

    def count(n_layers: int) -> int:
        with torch.device("meta"):
            return build_model(name, size, **{**overrides, "n_layers": n_layers}).num_parameters()

    if depth <= EXACT_DEPTH:
        return count(depth)
    try:
        deep, half = count(EXACT_DEPTH), count(EXACT_DEPTH // 2)
    except ValueError:  # explicit layer indices that need the full depth
        return count(depth)
    per_layer = (deep - half) / (EXACT_DEPTH - EXACT_DEPTH // 2)
    return int(deep + per_layer * (depth - EXACT_DEPTH))


def training_bytes(parameters: int, d_model: int, n_layers: int, vocab_size: int, micro_batch: int,
                   seq_len: int, activation_checkpointing: bool = False) -> int:
    """A lower bound on the bytes one training process holds."""
    stored_layers = 1 if activation_checkpointing else n_layers
    tokens = micro_batch * seq_len
    activations = tokens * d_model * stored_layers * ACTIVATIONS_PER_LAYER * 4
    logits = tokens * vocab_size * 4
    return parameters * TRAIN_BYTES_PER_PARAMETER + activations + logits


def check_training_fits(config, device: torch.device, processes: int = 1) -> None:
    """Raise ValueError, naming what to lower, when the model and length of `config` (a
    TrainConfig with a fixed size) cannot fit in the memory of `device`."""
    from .registry import model_config

    if config.size == "auto":
        return  # the budget plan measures what fits
    overrides = {**config.model_overrides, "vocab_size": config.vocab_size}
    mconfig = model_config(config.model, config.size, **overrides)
    seq_len = config.seq_len or mconfig.max_seq_len
    micro = max(1, config.batch_size // (processes * config.grad_accum))
    parameters = count_parameters(config.model, config.size, overrides)
    needed = training_bytes(parameters, mconfig.d_model, mconfig.n_layers, config.vocab_size, micro,
                            seq_len, config.activation_checkpointing)
    limit = available_memory(device)
    if limit is not None and needed > limit:
        raise ValueError(
            f"{config.model} ({parameters:,} parameters, width {mconfig.d_model} x "
            f"{mconfig.n_layers} layers) at seq_len={seq_len}, micro-batch {micro} needs at least "
            f"{needed / GIB:,.1f} GiB, but {device.type} has {limit / GIB:,.1f} GiB available; "
            f"lower the size, --seq-len or --batch-size (nothing was written)")

