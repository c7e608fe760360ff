"""Gated State Space layer (Mehta, Gupta, Cutkosky, Neyshabur 2022, "Long Range Language Modeling
via Gated State Spaces"), the SSM of the paper's GSS-Hybrid baseline.

With x^ = Norm(x): U = GELU(x^ W1) (width D/4), V = GELU(x^ W2) (width F), Y = SSM(U) (one causal
convolution per channel, here the S4D kernel by default), output x + ((Y W3) * V) W4. The layer has
no separate MLP. F = `gss_expansion` x D; the GSS paper used F = 3D, the gss-hybrid presets choose F
so that the model's parameter count matches the BST presets (see registry).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import GSSCache
from ..config import ModelConfig
from ..ssm import build_ssm


class GSSLayer(nn.Module):
    cache_type = GSSCache

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, width, expanded = config.d_model, config.ssm_width, config.gss_expansion * config.d_model
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
