"""The optimizer of a run: AdamW with weight decay on matrices only, and the learning-rate
schedule (linear warmup, then cosine, inverse square root or constant)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .train_config import TrainConfig


def learning_rate(step: int, config: TrainConfig, horizon: int | None,
                  progress: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule. The
    cosine runs over the steps after warmup up to `horizon`, or, for a run budgeted by time only
    (horizon None), over `progress`: the fraction of the time after warmup already spent."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "inverse_sqrt":
        return config.lr * math.sqrt(max(1, config.warmup_steps) / (step + 1))
    if horizon is not None:
        progress = (step - config.warmup_steps) / max(1, horizon - config.warmup_steps)
    progress = min(1.0, max(0.0, progress or 0.0))
    floor = config.min_lr_ratio * config.lr
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norms, biases, embeddings' scale-free parameters
    of the SSM (marked `_no_weight_decay`) or other vectors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    """The run's AdamW: `parameter_groups`, the config's lr and betas, and the fused kernel where
    PyTorch has one (CPU and CUDA): one pass over the parameters instead of a dozen small ops per
    tensor (3 ms instead of 9 ms per step at 0.9M parameters on this project's 2-core CPU)."""
    return torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                             betas=(config.beta1, config.beta2),
                             fused=device.type in ("cpu", "cuda"))
