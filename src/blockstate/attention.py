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

from .cache import KVCache
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
        if mask.requires_grad and q.device.type == "cpu":
            # A learned bias needs its gradient, which no fused CPU kernel gives: SDPA then takes
            # its math path, whose guards against fully masked rows cost about as much as the
            # attention itself (1.5-2x slower forward + backward at W = 64-128). Every query
            # sees at least its own position, so plain softmax attention is exact here.
            weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + mask, dim=-1)
            return torch.matmul(F.dropout(weights, dropout) if dropout else weights, v)
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
        return self.queries(q), self.keys(k)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """q (..., H, Dh), heads on the second-to-last axis."""
        if not self.enabled:
            return q / math.sqrt(self.head_dim)
        scale = self.log_scale.exp().to(q.dtype).unsqueeze(-1)                       # (H, 1)
        return _unit(q) * scale

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        """k (..., Dh), any layout of the other axes. Inference steps also normalize their queries
        with it, then multiply them by the precomputed `query_scale`."""
        return _unit(k) if self.enabled else k

    @torch.no_grad()
    def query_scale(self) -> torch.Tensor:
        """The factor `queries` applies after normalizing, (H, 1, 1) for heads-first layouts: an
        inference constant (`blockstate.cache`)."""
        if not self.enabled:
            return torch.full((1, 1, 1), 1 / math.sqrt(self.head_dim))
        return self.log_scale.exp().view(-1, 1, 1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / max(|x|, 1e-12) over the last axis, as F.normalize (a zero vector, such as an empty
    memory slot, stays zero with a bounded gradient), with a lighter backward on CPU (no clamp of
    the norm, no division): 25% faster forward+backward."""
    wide = x.float()  # in float32 under autocast, as F.normalize (1e12 overflows float16)
    return (wide * torch.rsqrt(wide.square().sum(-1, keepdim=True) + 1e-24)).to(x.dtype)


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
    mode "sliding": each query also sees the whole of the k = `window_blocks` previous blocks
    (k W + i + 1 keys for in-block offset i; k = 1 except for the segment-recurrent baselines, whose
    window is their memory length); the first blocks see only what exists. Keys and values of the
    previous blocks come from the same layer input, so all blocks are still computed at once.
    mode "full": ordinary causal attention over the whole sequence (one block of length L).
    Returns the per-head outputs (B, L, H * Dh), before the output projection.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.resolved_head_dim
        self.block_size, self.mode = config.block_size, config.self_attention
        self.window_blocks = max(1, config.resolved_memory_length // config.block_size)
        self.dropout = config.dropout
        inner = self.n_heads * self.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.qk_norm = QKNorm(self.n_heads, self.head_dim, config.qk_norm)
        self.rel_bias = RelativePositionBias(self.n_heads, config.rel_pos_buckets,
                                             config.rel_pos_max_distance)

    @property
    def memory_length(self) -> int:
        """Positions before a block that its queries see (sliding mode)."""
        return self.window_blocks * self.block_size

    def _mask(self, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """Relative position bias with -inf on future keys, for queries at the last positions."""
        return self.rel_bias.causal(n_queries, n_keys, device)                     # (H, W, Lk)

    def _keys_values(self, x: torch.Tensor, w: int) -> tuple[torch.Tensor, ...]:
        qkv = to_blocks(self.qkv(x), w).unflatten(-1, (3, self.n_heads, self.head_dim))
        q, k, v = qkv.unbind(dim=3)                                                # (B, nb, W, H, Dh)
        q, k = self.qk_norm(q, k)
        return q, k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, H * Dh).

        Sliding mode only (segment-recurrent baselines): `memory` (B, kW, D), the normalized input
        of the kW positions before this sequence, serves as the previous blocks of the first
        blocks; `valid` (B, kW) bool marks the memory positions that belong to the row's current
        document (all when None). Without memory, the first blocks see no earlier blocks.
        """
        batch, length, _ = x.shape
        w = length if self.mode == "full" else self.block_size
        q, k, v = self._keys_values(x, w)
        dropout = self.dropout if self.training else 0.0
        if memory is not None and self.mode != "sliding":
            raise ValueError("memory is only defined for sliding-window self-attention")
        if self.mode != "sliding" or (length == w and memory is None):
            out = attend(heads_first(q), heads_first(k), heads_first(v), self._mask(w, w, x.device),
                         dropout)
            return heads_last(out, batch)
        if memory is None and self.window_blocks == 1:
            return self._previous_block(q, k, v, dropout)
        return self._windows(q, k, v, memory, valid, dropout)

    def _previous_block(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        dropout: float) -> torch.Tensor:
        """Sliding window of one block with nothing before the sequence: block 0 sees itself,
        blocks 1.. see [previous block, own block]."""
        batch, w = q.shape[0], self.block_size
        device = q.device
        first = attend(heads_first(q[:, :1]), heads_first(k[:, :1]), heads_first(v[:, :1]),
                       self._mask(w, w, device), dropout)                           # (B, H, W, Dh)
        k2 = torch.cat([k[:, :-1], k[:, 1:]], dim=2)                               # (B, nb-1, 2W, H, Dh)
        v2 = torch.cat([v[:, :-1], v[:, 1:]], dim=2)
        rest = attend(heads_first(q[:, 1:]), heads_first(k2), heads_first(v2),
                      self._mask(w, 2 * w, device), dropout)                       # (B*(nb-1), H, W, Dh)
        return torch.cat([heads_last(first, batch), heads_last(rest, batch)], dim=1)

    def _windows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 memory: torch.Tensor | None, valid: torch.Tensor | None,
                 dropout: float) -> torch.Tensor:
        """Sliding window of k blocks: block j sees blocks j-k..j of [memory, sequence]; memory
        positions that are absent or not `valid` are masked out."""
        batch, nb, w = q.shape[0], q.shape[1], self.block_size
        kb, device = self.window_blocks, q.device
        if memory is None:
            mk = mv = k.new_zeros(batch, kb, *k.shape[2:])
            valid = torch.zeros(batch, kb * w, dtype=torch.bool, device=device)
        else:
            if memory.shape[1] != kb * w:
                raise ValueError(f"memory must cover {kb * w} positions, got {memory.shape[1]}")
            _, mk, mv = self._keys_values(memory, w)                               # (B, kb, W, H, Dh)
            if valid is None:
                valid = torch.ones(batch, kb * w, dtype=torch.bool, device=device)
        window = torch.arange(nb, device=device)[:, None] + torch.arange(kb + 1, device=device)
        keys = torch.cat([mk, k], 1)[:, window].flatten(2, 3)                     # (B, nb, (kb+1)W, H, Dh)
        values = torch.cat([mv, v], 1)[:, window].flatten(2, 3)
        seen = torch.cat([valid, valid.new_ones(batch, nb * w)], 1).view(batch, kb + nb, w)
        seen = seen[:, window].flatten(2)                                          # (B, nb, (kb+1)W)
        bias = self._mask(w, (kb + 1) * w, device)                                 # (H, W, (kb+1)W)
        mask = bias.masked_fill(~seen[:, :, None, None, :], float("-inf"))         # (B, nb, H, W, .)
        out = attend(heads_first(q), heads_first(keys), heads_first(values), mask.flatten(0, 1),
                     dropout)
        return heads_last(out, batch)

    # ---- inference (blockstate.cache): the keys/values the next query may see are cached
    @torch.no_grad()
    def allocate_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """An empty cache sized for the window (full attention: grown as needed), with the query
        scale and (windowed modes) the bias row of a query at the window's last position."""
        w = self.block_size
        capacity = {"block": w, "sliding": self.memory_length + w, "full": 8 * w}[self.mode]
        bias = None
        if self.mode != "full":
            bias = self.rel_bias.causal(1, capacity, device).to(dtype).unsqueeze(0)  # (1, H, 1, cap)
        scale = self.qk_norm.query_scale().to(device=device, dtype=dtype)
        return KVCache.empty(batch, self.n_heads, self.head_dim, capacity, device, dtype, scale, bias)

    def _step_qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, n, D) -> q, k, v (B, H, n, Dh), queries and keys normalized (the queries not yet
        scaled: the cache holds their scale)."""
        batch, n, _ = h.shape
        qkv = self.qkv(h).view(batch, n, 3, self.n_heads, self.head_dim).transpose(1, 3)
        q, k = self.qk_norm.keys(qkv[:, :, :2]).unbind(2)
        return q, k, qkv[:, :, 2]

    def _step_bias(self, n: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """Bias (H, n, n_keys) for queries at the last n of n_keys positions. Windowed modes have
        few distinct shapes, cached by `_mask`; full attention's key count grows with the context,
        so its bias is computed afresh (caching every length would keep O(L^2) indices)."""
        if self.mode != "full":
            return self._mask(n, n_keys, device)
        query_pos = torch.arange(n_keys - n, n_keys, device=device)
        key_pos = torch.arange(n_keys, device=device)
        future = query_pos[:, None] < key_pos[None, :]
        return self.rel_bias(query_pos, key_pos).masked_fill(future, float("-inf"))

    def extend(self, h: torch.Tensor, cache: KVCache, offset: int) -> torch.Tensor:
        """Attention outputs (B, n, H * Dh) of n new positions h (B, n, D) (normalized layer
        input) at in-block offsets offset..offset+n-1 of one block, over what `cache` holds;
        the new keys/values are added, and the cache is trimmed to the window when the block
        completes."""
        q, k, v = self._step_qkv(h)                                                # (B, H, n, Dh)
        out = self.attend_cached(q * cache.scale, k, v, cache, offset)
        return out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)

    def step(self, h: torch.Tensor, cache: KVCache, offset: int) -> torch.Tensor:
        """`extend` of one position, h (B, D) -> (B, H * Dh)."""
        qkv = F.linear(h, self.qkv.weight).view(h.shape[0], 3, self.n_heads, 1, self.head_dim)
        q, k = self.qk_norm.keys(qkv[:, :2]).unbind(1)                             # (B, H, 1, Dh)
        return self.attend_cached(q * cache.scale, k, qkv[:, 2], cache, offset).view(h.shape[0], -1)

    def attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                      offset: int) -> torch.Tensor:
        """The attention of `extend` from the projections: queries (scaled), keys (normalized)
        and values (B, H, n, Dh) of n new positions -> outputs (B, H, n, Dh)."""
        n = q.shape[2]
        keys, values = cache.append(k, v)                                          # (B, H, Lk, Dh)
        n_keys = keys.shape[2]
        if n == 1 and cache.bias is not None:  # one query, at the last key: the cached bias row
            bias = cache.bias[..., cache.bias.shape[-1] - n_keys:]
        else:
            bias = self._step_bias(n, n_keys, q.device).to(q.dtype).unsqueeze(0)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=1.0)
        if offset + n == self.block_size and self.mode != "full":  # full attention keeps all
            cache.keep_last(self.memory_length if self.mode == "sliding" else 0)
        return out

    def prefill(self, h: torch.Tensor, length: int, cache: KVCache) -> torch.Tensor:
        """`forward(h)` for h (B, L', D), L' a multiple of W of which the first `length` positions
        are real (the rest padding), leaving in the empty `cache` what the position after them
        sees. Full attention runs block by block over the growing cache (one block's queries at a
        time instead of an L x L bias); the windowed modes run `forward` and cache the window."""
        w = self.block_size
        if self.mode == "full":
            outs = [self.extend(h[:, s:min(s + w, length)], cache, 0) for s in range(0, length, w)]
            out = torch.cat(outs, dim=1)
            return F.pad(out, (0, 0, 0, h.shape[1] - length))
        out = self.forward(h)
        start = length // w * w
        if self.mode == "sliding":
            start = max(0, start - self.memory_length)
        if start < length:
            _, k, v = self._step_qkv(h[:, start:length])
            cache.append(k, v)
        return out


class MLP(nn.Module):
    """Position-wise ReLU feed-forward network."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.resolved_d_ff, bias=False)
        self.down = nn.Linear(config.resolved_d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(F.relu(self.up(x))))
