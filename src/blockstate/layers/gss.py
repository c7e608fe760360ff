"""Gated State Space layer (Mehta, Gupta, Cutkosky, Neyshabur 2022, "Long Range Language Modeling
via Gated State Spaces"), the SSM of the paper's GSS-Hybrid baseline.

With x^ = Norm(x): U = GELU(x^ W1) (width D/4), V = GELU(x^ W2) (width F), Y = SSM(U) (one causal
convolution per channel, here the S4D kernel by default), output x + ((Y W3) * V) W4. The layer has
no separate MLP. F = `arch.expansion` x D; the GSS paper used F = 3D, the gss-hybrid presets choose F
so that the model's parameter count matches the BST presets (see registry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import GSSCache
from ..components import positive, register
from ..config import ModelConfig
from ..ssm import build_ssm
from .block import LayersAt


class GSSLayer(nn.Module):
    cache_type = GSSCache

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, width, expanded = config.d_model, config.ssm_width, config.arch.expansion * config.d_model
        self.block_size = config.block_size
        self.norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.to_u = nn.Linear(d, width, bias=False)
        self.to_v = nn.Linear(d, expanded, bias=False)
        self.ssm = build_ssm(config, 1, width)
        self.from_y = nn.Linear(width, expanded, bias=False)
        self.out = nn.Linear(expanded, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def _gate(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.out(self.from_y(y) * v))

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The SSM input U (B, L, D/4) and the gate V (B, L, F) of x."""
        h = self.norm(x)
        return F.gelu(self.to_u(h)), F.gelu(self.to_v(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self._branches(x)
        y = self.ssm(u)[:, :, 0].to(u.dtype)                                        # (B, L, D/4)
        return self._gate(x, y, v)

    # ---- inference (blockstate.cache)
    def allocate_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> GSSCache:
        return GSSCache(self.ssm.allocate_cache(batch, device, dtype))

    def prefill(self, x: torch.Tensor, length: int, cache: GSSCache) -> torch.Tensor:
        u, v = self._branches(x)
        self.ssm.prefill_cache(u[:, :length], cache.ssm)
        return self._gate(x, self.ssm(u)[:, :, 0].to(u.dtype), v)

    def step(self, x: torch.Tensor, cache: GSSCache, offset: int) -> torch.Tensor:
        """Outputs (B, D) of one new position x (B, D)."""
        u, v = self._branches(x)                                                   # (B, .)
        y = self.ssm.step(u, cache.ssm)[:, 0].to(u.dtype)                          # (B, D/4)
        return self._gate(x, y, v)


GSS_ATTENTION_EVERY = 4


def gss_hybrid_layers(n_layers: int) -> tuple[int, ...]:
    """Indices of GSS-Hybrid's GSS layers: all but every 4th layer (3, 7, 11 of 12 are attention),
    keeping at least one attention layer (the last) in shallow models."""
    attention = {i for i in range(n_layers) if (i + 1) % GSS_ATTENTION_EVERY == 0} or {n_layers - 1}
    return tuple(i for i in range(n_layers) if i not in attention)


@register("arch", "gss-hybrid")
@dataclass
class GSSHybridArch(LayersAt):
    """Gated State Space layers (Mehta et al. 2022) at `bst_layers`, their SSM `ModelConfig.ssm`,
    widened to `expansion` x D (F / D)."""

    expansion: int = 3

    has_ssm: ClassVar[bool] = True
    layer: ClassVar[type] = GSSLayer

    def check(self) -> None:
        super().check()
        positive("arch.expansion", self.expansion)

    @classmethod
    def default_layers(cls, n_layers: int) -> tuple[int, ...]:
        return gss_hybrid_layers(n_layers)
