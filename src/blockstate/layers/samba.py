"""The Mamba layer of the Samba baseline (Ren et al. 2024, "Samba: Simple Hybrid State Space Models
for Efficient Unlimited Context Language Modeling"), built from this project's selective SSM.

Samba repeats [Mamba, MLP, SWA, MLP], each sublayer pre-norm and residual. Here one layer of the
stack is a mixer followed by the shared MLP tail (`ResidualTail`), so Samba is layers alternating
between a `MambaLayer` (Mamba + MLP, even positions) and a sliding-window `BlockAttentionLayer`
(SWA + MLP, odd positions: the `slide` baseline's layer, window of the current and previous block).

The Mamba mixer, with x^ = Norm(x): [u; z] = x^ W_in (each of width E = `config.ssm_width`, 2D
unless `ssm.width_divisor` is set), y = SSM(u) (the selective SSM of `ssm/selective.py`, which
normalizes u, applies Mamba's short causal convolution and SiLU, and adds the D skip), output
x + (y * SiLU(z)) W_out. Differences from Samba as published, for the record: the SSM is
Mamba-2's scan with one decay per head (ssm decay kind "state" gives Mamba-1's per-state decays),
the MLP is the project's ReLU MLP (Samba: SwiGLU), and attention has the project's T5 relative
position bias and normalized queries/keys (Samba: RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import MambaCache
from ..components import register
from ..config import ModelConfig
from ..ssm import build_ssm
from .block import LayersAt
from .residual import ResidualTail


class MambaLayer(ResidualTail):
    """Pre-norm residual layer: x + Mamba(Norm(x)), then x + MLP(Norm(x)). One SSM channel of
    width E; the cache holds the SSM's state and its convolution's last inputs (constant size)."""

    cache_type = MambaCache

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.ssm_width
        self.mixer_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.in_proj = nn.Linear(config.d_model, 2 * width, bias=False)   # SSM input u and gate z
        self.ssm = build_ssm(config, 1, width)
        self.init_tail(config, width)

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The SSM input u and the gate z, each (..., E), of the layer input x (..., D)."""
        u, z = self.in_proj(self.mixer_norm(x)).chunk(2, dim=-1)
        return u, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, z = self._branches(x)                                                   # (B, L, E)
        y = self.ssm(u)[:, :, 0].to(u.dtype)                                       # (B, L, E)
        return self.tail(x, y * F.silu(z))

    # ---- inference (blockstate.cache)
    def allocate_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> MambaCache:
        return MambaCache(self.ssm.allocate_cache(batch, device, dtype))

    def prefill(self, x: torch.Tensor, length: int, cache: MambaCache) -> torch.Tensor:
        """`forward(x)` for x (B, L', D) whose first `length` positions are real, filling the
        empty `cache` for the position after them."""
        u, z = self._branches(x)
        self.ssm.prefill_cache(u[:, :length], cache.ssm)
        return self.tail(x, self.ssm(u)[:, :, 0].to(u.dtype) * F.silu(z))

    def step(self, x: torch.Tensor, cache: MambaCache, offset: int) -> torch.Tensor:
        """Outputs (B, D) of one new position x (B, D); `offset` (in-block) is not needed."""
        u, z = self._branches(x)                                                   # (B, E)
        y = self.ssm.step(u, cache.ssm)[:, 0].to(u.dtype)                          # (B, E)
        return self.step_tail(x, y * F.silu(z))


def samba_layers(n_layers: int) -> tuple[int, ...]:
    """Indices of Samba's Mamba layers: every other layer from the first, so that each Mamba layer
    is followed by a sliding-window attention layer ([Mamba, MLP, SWA, MLP] repeated)."""
    return tuple(range(0, n_layers, 2))


@register("arch", "samba")
@dataclass
class SambaArch(LayersAt):
    """Mamba layers of `ModelConfig.ssm` at `bst_layers` (Samba: alternating with sliding-window
    attention layers), their SSM as wide as Mamba's expansion, 2D, unless ssm.width_divisor is set."""

    has_ssm: ClassVar[bool] = True
    layer: ClassVar[type] = MambaLayer

    def ssm_width(self, model: ModelConfig) -> int:
        return 2 * model.d_model

    @classmethod
    def default_layers(cls, n_layers: int) -> tuple[int, ...]:
        return samba_layers(n_layers)
