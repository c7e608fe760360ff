"""FLOP formulas that `torch.utils.flop_counter` lacks: FFTs (2.5 n log2 n per real transform of
size n) and the CPU flash-attention kernels."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count


def _fft_formula(kind: str) -> Callable[..., int]:
    """FLOPs of aten._fft_{r2c,c2r,c2c}: 2.5 n log2 n per real transform of size n, 5 n log2 n per
    complex one (the usual convention for split-radix counts)."""
    def formula(in_shape, dims, *args, out_shape=None, **kwargs) -> int:
        n = math.prod((out_shape if kind == "c2r" else in_shape)[d] for d in dims)
        rows = math.prod(in_shape) // max(1, math.prod(in_shape[d] for d in dims))
        return int(rows * (5.0 if kind == "c2c" else 2.5) * n * math.log2(max(n, 2)))
    return formula


def flop_formulas() -> dict:
    """Formulas FlopCounterMode lacks: the CPU flash-attention kernels and FFTs."""
    aten = torch.ops.aten
    mapping = {getattr(aten, f"_fft_{kind}"): _fft_formula(kind) for kind in ("r2c", "c2r", "c2c")}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v))
    return mapping
