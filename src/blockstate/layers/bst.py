"""The Block-State Transformer layer (Fathi et al. 2023, section 3 and figure 2).

An SSM runs over the whole (down-projected, normalized) sequence; its outputs become per-block
context states; a Block Transformer cell attends, for every block at once, causally to the block's
own tokens and to the block's context states. Three constructions of the context states:

- SH (single head): one filter per SSM channel; its outputs at the block's own positions, lifted to
  the model width, serve every head; query i sees context positions j <= i.
- MH (multi head): H filters; head h reads filter h's outputs at the block's positions; same mask.
- MF (multi filter): S filters; block k reads the S outputs at the last position of block k-1
  (block 0 a learned initial context), lifted to the model width, plus learned context IDs; no
  mask, since every state lies strictly in the past.

The lift and the cross-attention key/value projections are consecutive linear maps; for MH, whose
lift is per head, they are composed into a single per-head map from the SSM width to keys/values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import MLP, BlockSelfAttention, QKNorm, attend, heads_first, heads_last, to_blocks
from ..config import ModelConfig
from ..ssm import build_ssm


class ContextStates(nn.Module):
    """Normalized layer input (B, L, D) -> cross-attention keys and values (B, nb, T, H, Dh),
    with T = W for SH/MH and T = S for MF."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.variant = config.context_variant
        self.block_size = config.block_size
        self.n_heads, self.head_dim = config.n_heads, config.resolved_head_dim
        d_model, width = config.d_model, config.ssm_width
        inner = self.n_heads * self.head_dim
        self.init_std = config.init_std
        self.down = nn.Linear(d_model, width, bias=False)
        self.ssm = build_ssm(config, config.ssm_channels, width)
        self.activation = nn.GELU() if config.context_activation == "gelu" else nn.Identity()
        self.norm = (nn.RMSNorm(width, eps=config.norm_eps) if config.context_norm == "rms"
                     else nn.Identity())
        if self.variant == "mh":
            self.kv_weight = nn.Parameter(
                torch.randn(self.n_heads, width, 2 * self.head_dim) * config.init_std)
        else:
            self.lift = nn.Linear(width, d_model)
            self.kv = nn.Linear(d_model, 2 * inner, bias=False)
        if self.variant == "mf":
            s = config.num_context_states
            self.initial_context = nn.Parameter(torch.randn(s, d_model) * config.init_std)
            self.context_ids = nn.Parameter(torch.randn(s, d_model) * config.init_std)

    def reset_parameters(self) -> None:
        """With normalized SSM outputs, a unit-scale lift (std 1/sqrt(width)) makes the lifted
        context states O(1), like the normalized layer input that self-attention projects; MH's
        composed lift and key/value map gets the product of the two scales."""
        if isinstance(self.norm, nn.Identity):
            return
        width = self.down.out_features
        if self.variant == "mh":
            nn.init.normal_(self.kv_weight, std=self.init_std / math.sqrt(width) * math.sqrt(
                self.n_heads * self.head_dim))
        else:
            nn.init.normal_(self.lift.weight, std=1 / math.sqrt(width))

    def _context_outputs(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SSM outputs (..., Hs) -> normalized, activated outputs in the layer's dtype."""
        return self.norm(self.activation(y.to(dtype)))

    def _position_kv(self, y: torch.Tensor, w: int) -> torch.Tensor:
        """SH/MH: SSM outputs y (B, L, C, Hs) -> keys/values (B, L / w, w, 2, H, Dh)."""
        heads, d = self.n_heads, self.head_dim
        if self.variant == "sh":
            # kv(lift(y)) as one map from the SSM width: (W_kv W_lift) y + W_kv b_lift costs
            # Hs x 2HDh per token instead of Hs x D + D x 2HDh.
            weight = self.kv.weight @ self.lift.weight                             # (2 H Dh, Hs)
            kv = F.linear(y[:, :, 0], weight, self.kv.weight @ self.lift.bias)     # (B, L, 2 H Dh)
            return to_blocks(kv, w).unflatten(-1, (2, heads, d))
        kv = torch.einsum("blhc,hcd->blhd", y, self.kv_weight.to(y.dtype))         # (B, L, H, 2 Dh)
        return to_blocks(kv, w).unflatten(-1, (2, d)).transpose(3, 4)

    def _summary_kv(self, last: torch.Tensor | None, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """MF: the S outputs at the end of each previous block, last (B, nb-1, S, Hs) (None for no
        previous block) -> keys/values (B, nb, S, 2, H, Dh), block 0 reading the initial context."""
        initial = self.initial_context.to(dtype).expand(batch, 1, -1, -1)          # (B, 1, S, D)
        context = initial if last is None else torch.cat([initial, self.lift(last)], dim=1)
        kv = self.kv(context + self.context_ids.to(context.dtype))
        return kv.unflatten(-1, (2, self.n_heads, self.head_dim))                  # (B, nb, S, 2, H, Dh)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.down(h)
        if self.variant == "mf":  # only the outputs at block ends are needed
            last = self.ssm.block_end_outputs(u, self.block_size)[:, :-1]            # (B, nb-1, S, Hs)
            kv = self._summary_kv(self._context_outputs(last, h.dtype), h.shape[0], h.dtype)
        else:
            kv = self._position_kv(self._context_outputs(self.ssm(u), h.dtype), self.block_size)
        k, v = kv.unbind(dim=3)
        return k, v

    # ---- block-wise inference
    def block_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        return {"ssm": self.ssm.block_state(batch, self.block_size, device, dtype), "last": None}

    def _block_outputs(self, h: torch.Tensor, cache: dict) -> torch.Tensor:
        return self._context_outputs(self.ssm.forward_block(self.down(h), cache["ssm"]), h.dtype)

    def forward_block(self, h: torch.Tensor, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (B, 1, T, H, Dh) of the current block from its first n positions h."""
        if self.variant == "mf":
            last = None if cache["last"] is None else cache["last"].unsqueeze(1)
            kv = self._summary_kv(last, h.shape[0], h.dtype)[:, -1:]
        else:
            kv = self._position_kv(self._block_outputs(h, cache), h.shape[1])
        k, v = kv.unbind(dim=3)
        return k, v

    def end_block(self, h: torch.Tensor, cache: dict) -> None:
        if self.variant == "mf":
            cache["last"] = self._block_outputs(h, cache)[:, -1]                    # (B, S, Hs)
        self.ssm.end_block(cache["ssm"], self.down(h))


class BSTLayer(nn.Module):
    """Pre-norm BST layer: x + Proj([SelfAttn(h); CrossAttn(h, context)]), then x + MLP(Norm(x)),
    with h = Norm(x). Input length must be a multiple of `config.block_size`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inner = config.n_heads * config.resolved_head_dim
        self.block_size, self.n_heads = config.block_size, config.n_heads
        self.head_dim, self.variant = config.resolved_head_dim, config.context_variant
        self.dropout_p = config.dropout
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.self_attn = BlockSelfAttention(config)
        self.context = ContextStates(config)
        self.cross_q = nn.Linear(config.d_model, inner, bias=False)
        self.cross_qk_norm = QKNorm(config.n_heads, self.head_dim, config.qk_norm)
        self.out = nn.Linear(2 * inner, config.d_model, bias=False)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def cross_attention(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Queries from h (B, L, D) attend to their block's context states k, v (B, nb, T, H, Dh)
        -> (B, L, H * Dh)."""
        batch, w = h.shape[0], h.shape[1] // k.shape[1]
        q = to_blocks(self.cross_q(h), w).unflatten(-1, (self.n_heads, self.head_dim))
        q, k = self.cross_qk_norm(q, k)                                            # (B, nb, W, H, Dh)
        mask = None
        if self.variant in ("sh", "mh"):  # context position j is visible to query i iff j <= i
            mask = torch.ones(w, w, dtype=torch.bool, device=h.device).tril()
        dropout = self.dropout_p if self.training else 0.0
        out = attend(heads_first(q), heads_first(k), heads_first(v), mask, dropout)
        return heads_last(out, batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        mixed = torch.cat([self.self_attn(h), self.cross_attention(h, *self.context(h))], dim=-1)
        x = x + self.dropout(self.out(mixed))                                      # (B, L, D)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))

    # ---- block-wise inference (see BlockSelfAttention.forward_block)
    def block_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        return {"attn": {}, "context": self.context.block_cache(batch, device, dtype)}

    def forward_block(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        h = self.attn_norm(x)
        k, v = self.context.forward_block(h, cache["context"])
        mixed = torch.cat([self.self_attn.forward_block(h, cache["attn"]),
                           self.cross_attention(h, k, v)], dim=-1)
        x = x + self.out(mixed)
        return x + self.mlp(self.mlp_norm(x))

    def end_block(self, x: torch.Tensor, cache: dict) -> None:
        h = self.attn_norm(x)
        self.self_attn.end_block(h, cache["attn"])
        self.context.end_block(h, cache["context"])
