"""Block attention: causal self-attention inside each block of W tokens (optionally also over the
previous block), cross-attention to context states, all blocks at once through one
`scaled_dot_product_attention` dispatcher.

Position information in self-attention is a T5-style bucketed relative position bias (Raffel et
al. 2020), as in the Block-Recurrent Transformer the paper builds on. Queries and keys are
L2-normalized and the logits scaled by a learned per-head temperature (paper.md, model setup).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def relative_position_bucket(distance: torch.Tensor, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Causal T5 buckets of `distance` = query position - key position (negative values share the
    bucket of 0; they are masked anyway). Half the buckets are exact, the rest log-spaced up to
    `max_distance`, beyond which all distances share the last bucket."""
    distance = distance.clamp(min=0)
    exact = max(1, num_buckets // 2)
    if exact >= num_buckets or max_distance <= exact:
        return distance.clamp(max=num_buckets - 1)
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return torch.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
    """Learned per-head bias b[h, bucket(i - j)] added to self-attention logits."""

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, n_heads)
        nn.init.zeros_(self.embedding.weight)

        self._index: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Bias of shape (H, Lq, Lk) for the given absolute positions."""
        distance = query_positions[:, None] - key_positions[None, :]                 # (Lq, Lk)
        buckets = relative_position_bucket(distance, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1)                            # (H, Lq, Lk)

    def causal(self, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """Bias (H, Lq, Lk) with -inf on future keys, for queries at the last n_queries of n_keys
        positions. Bucket indices and the future mask are built once per shape and device; only the
        (learned) bias lookup runs every call."""
        key = (n_queries, n_keys, str(device))
        if key not in self._index:
            query_pos = torch.arange(n_keys - n_queries, n_keys, device=device)
            key_pos = torch.arange(n_keys, device=device)
            distance = query_pos[:, None] - key_pos[None, :]
            self._index[key] = (relative_position_bucket(distance, self.num_buckets, self.max_distance),
                                distance < 0)
        buckets, future = self._index[key]
        return self.embedding(buckets).permute(2, 0, 1).masked_fill(future, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           dropout: float = 0.0) -> torch.Tensor:
    """The one attention call: q (N, H, Lq, Dh), k/v (N, H, Lk, Dh), additive or boolean mask
    broadcastable to (N, H, Lq, Lk). Logits are not rescaled (queries carry their own scale)."""
    if mask is not None:
        if mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        # The CPU flash kernel takes only 4-d masks; with a 2-d or 3-d one SDPA silently falls back
        # to the unfused math path (about 4x slower at W=128).
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=1.0)


class QKNorm(nn.Module):
    """L2-normalize queries and keys; scale queries by a learned per-head temperature. Without
    normalization, queries are scaled by 1/sqrt(Dh) as usual."""

    def __init__(self, n_heads: int, head_dim: int, enabled: bool):
        super().__init__()
        self.enabled = enabled
        self.head_dim = head_dim
        if enabled:
            self.log_scale = nn.Parameter(torch.full((n_heads,), 0.5 * math.log(head_dim)))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (..., H, Dh) with heads on the second-to-last axis."""
        if not self.enabled:
            return q / math.sqrt(self.head_dim), k
        scale = self.log_scale.exp().to(q.dtype).unsqueeze(-1)                       # (H, 1)
        return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1)


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, L, ...) -> (B, L / W, W, ...); L must be a multiple of W."""
    b, length = x.shape[:2]
    return x.reshape(b, length // block_size, block_size, *x.shape[2:])


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """(B, nb, T, H, Dh) -> (B * nb, H, T, Dh): blocks folded into the batch for SDPA."""
    b, nb, t, h, d = x.shape
    return x.permute(0, 1, 3, 2, 4).reshape(b * nb, h, t, d)


def heads_last(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * nb, H, W, Dh) -> (B, nb * W, H * Dh)."""
    bn, h, w, d = x.shape
    return x.reshape(batch, bn // batch, h, w, d).permute(0, 1, 3, 2, 4).reshape(batch, -1, h * d)


class BlockSelfAttention(nn.Module):
    """Causal self-attention within blocks of W tokens, all blocks in parallel.

    mode "block": each query sees the keys of its own block up to itself.
    mode "sliding": each query also sees the whole previous block (W + i + 1 keys for in-block
    offset i); the first block has no previous block. Keys and values of the previous block come
    from the same layer input, so all blocks are still computed at once.
    mode "full": ordinary causal attention over the whole sequence (one block of length L).
    Returns the per-head outputs (B, L, H * Dh), before the output projection.
    """

    def __init__(self, config: ModelConfig, detach_previous: bool = False):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.resolved_head_dim
        self.block_size, self.mode = config.block_size, config.self_attention
        self.detach_previous = detach_previous
        self.dropout = config.dropout
        inner = self.n_heads * self.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.qk_norm = QKNorm(self.n_heads, self.head_dim, config.qk_norm)
        self.rel_bias = RelativePositionBias(self.n_heads, config.rel_pos_buckets,
                                             config.rel_pos_max_distance)

    def _mask(self, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """Relative position bias with -inf on future keys, for queries at the last positions."""
        return self.rel_bias.causal(n_queries, n_keys, device)                     # (H, W, Lk)

    def _keys_values(self, x: torch.Tensor, w: int) -> tuple[torch.Tensor, ...]:
        qkv = to_blocks(self.qkv(x), w).unflatten(-1, (3, self.n_heads, self.head_dim))
        q, k, v = qkv.unbind(dim=3)                                                # (B, nb, W, H, Dh)
        q, k = self.qk_norm(q, k)
        return q, k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, H * Dh).

        Sliding mode only (Transformer-XL): with `detach_previous`, keys/values of the previous
        block are computed from a stop-gradient copy of the input; `memory` (B, W, D), the
        normalized input of the block before this sequence, serves as block 0's previous block,
        for the rows where `keep` (B,) bool is true (all rows when `keep` is None).
        """
        batch, length, _ = x.shape
        w = length if self.mode == "full" else self.block_size
        q, k, v = self._keys_values(x, w)
        dropout = self.dropout if self.training else 0.0
        own = self._mask(w, w, x.device)                                           # (H, W, W)
        if memory is not None and self.mode != "sliding":
            raise ValueError("memory is only defined for sliding-window self-attention")
        if self.mode != "sliding" or (length == w and memory is None):
            out = attend(heads_first(q), heads_first(k), heads_first(v), own, dropout)
            return heads_last(out, batch)
        window = self._mask(w, 2 * w, x.device)                                    # (H, W, 2W)
        if memory is None:  # block 0 sees only itself
            first = attend(heads_first(q[:, :1]), heads_first(k[:, :1]), heads_first(v[:, :1]), own,
                           dropout)                                                # (B, H, W, Dh)
        else:
            _, mk, mv = self._keys_values(memory, w)                               # (B, 1, W, H, Dh)
            mask = window.expand(batch, -1, -1, -1)                                # (B, H, W, 2W)
            if keep is not None:
                dropped = (~keep)[:, None, None, None] & (torch.arange(2 * w, device=x.device) < w)
                mask = mask.masked_fill(dropped, float("-inf"))
            first = attend(heads_first(q[:, :1]), heads_first(torch.cat([mk, k[:, :1]], 2)),
                           heads_first(torch.cat([mv, v[:, :1]], 2)), mask, dropout)
        if length == w:
            return heads_last(first, batch)
        kp, vp = k, v
        if self.detach_previous:
            _, kp, vp = self._keys_values(x.detach(), w)
        # Blocks 1.. see [previous block, own block].
        k2 = torch.cat([kp[:, :-1], k[:, 1:]], dim=2)                              # (B, nb-1, 2W, H, Dh)
        v2 = torch.cat([vp[:, :-1], v[:, 1:]], dim=2)
        rest = attend(heads_first(q[:, 1:]), heads_first(k2), heads_first(v2), window,
                      dropout)                                                     # (B*(nb-1), H, W, Dh)
        return torch.cat([heads_last(first, batch), heads_last(rest, batch)], dim=1)


    # ---- block-wise inference: keys/values of earlier blocks are cached, the current block's
    # positions are recomputed at every step (at most W of them).
    def forward_block(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """x (B, n, D): the current block's first n positions -> (B, n, H * Dh). `cache` holds
        the keys/values of the previous block (sliding) or of all earlier blocks (full)."""
        batch, n, _ = x.shape
        q, k, v = self._keys_values(x, n)                                           # (B, 1, n, H, Dh)
        past_k, past_v = cache.get("k"), cache.get("v")
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        n_keys = k.shape[2]
        out = attend(heads_first(q), heads_first(k), heads_first(v), self._mask(n, n_keys, x.device))
        return heads_last(out, batch)

    def end_block(self, x: torch.Tensor, cache: dict) -> None:
        """Remember the keys/values of a complete block x (B, W, D) as the mode requires."""
        if self.mode == "block":
            return
        _, k, v = self._keys_values(x, x.shape[1])                                  # (B, 1, W, H, Dh)
        if self.mode == "full" and "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v


class MLP(nn.Module):
    """Position-wise ReLU feed-forward network."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.resolved_d_ff, bias=False)
        self.down = nn.Linear(config.resolved_d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(F.relu(self.up(x))))
