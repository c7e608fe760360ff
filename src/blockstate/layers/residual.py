"""The residual tail every attention layer kind shares (transformer, Slide, Transformer-XL, BST,
BRT): the attention outputs projected back to the model width and added to the residual stream,
then a pre-norm MLP added the same way,

    x = x + Dropout(Out([a_1; ...; a_k])),    x = x + Dropout(MLP(Norm(x))),

where a_1..a_k are the layer's attention outputs (self-attention alone, or self- and cross-attention
concatenated). The parameters stay attributes of the layer (`out`, `mlp_norm`, `mlp`), so
checkpoints keep their names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import MLP
from ..config import ModelConfig


class ResidualTail(nn.Module):
    """Base class of layers that end in the shared residual tail."""

    def init_tail(self, config: ModelConfig, attended_width: int) -> None:
        """Create the tail's modules: `out` (attended_width -> D), `mlp_norm`, `mlp`, `dropout`."""
        self.out = nn.Linear(attended_width, config.d_model, bias=False)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def tail(self, x: torch.Tensor, *attended: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) and the layer's attention outputs (B, L, *) -> the layer's output (B, L, D)."""
        a = attended[0] if len(attended) == 1 else torch.cat(attended, dim=-1)
        x = x + self.dropout(self.out(a))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))

    def step_tail(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """`tail` of an inference step (no dropout), with the attention outputs `a` concatenated."""
        x = x + F.linear(a, self.out.weight)
        return x + F.linear(F.relu(F.linear(self.mlp_norm(x), self.mlp.up.weight)), self.mlp.down.weight)
