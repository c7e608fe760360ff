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
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import BlockSelfAttention, QKNorm, attend, heads_first, heads_last, to_blocks
from ..cache import BSTCache, KVCache, SSMCache
from ..components import positive, register
from ..config import ContextOptions, ModelConfig
from ..ssm import build_ssm
from .block import LayersAt
from .residual import ResidualTail


class ContextStates(nn.Module):
    """Normalized layer input (B, L, D) -> cross-attention keys and values (B, nb, T, H, Dh).

    The base of the three variants: the down-projection, the SSM over the whole sequence, and the
    activation and normalization of its outputs. A variant (`SHContext`, `MHContext`,
    `MFContext`; `build_context_states` picks one) turns the outputs into keys and values, says
    which of them a query may see (`mask`), and carries them through generation.
    """

    variant = ""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.block_size = config.block_size
        self.n_heads, self.head_dim = config.n_heads, config.resolved_head_dim
        self.init_std = config.init_std
        width = config.ssm_width
        self.down = nn.Linear(config.d_model, width, bias=False)
        self.ssm = build_ssm(config, config.ssm_channels, width)
        self.activation = nn.GELU() if config.context.activation == "gelu" else nn.Identity()
        self.norm = (nn.RMSNorm(width, eps=config.norm_eps) if config.context.norm == "rms"
                     else nn.Identity())
        # context.direct (SH/MH): a linear read of the context outputs into the residual stream
        self.direct = (nn.Linear(config.ssm_channels * width, config.d_model, bias=False)
                       if config.context.direct_read else None)

    def reset_parameters(self) -> None:
        """With normalized SSM outputs, a unit-scale lift (std 1/sqrt(width)) makes the lifted
        context states O(1), like the normalized layer input that self-attention projects."""
        if not isinstance(self.norm, nn.Identity):
            nn.init.normal_(self.lift.weight, std=1 / math.sqrt(self.down.out_features))

    def _context_outputs(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SSM outputs (..., Hs) -> normalized, activated outputs in the layer's dtype."""
        return self.norm(self.activation(y.to(dtype)))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v, _, _ = self._forward(h)
        return k, v

    def read(self, outputs: torch.Tensor) -> torch.Tensor | None:
        """The direct read (..., D) of context outputs (..., C, Hs); None without context.direct."""
        return None if self.direct is None else self.direct(outputs.flatten(-2))

    def _forward(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(keys, values, SSM input u, the context outputs the keys/values were made from)."""
        raise NotImplementedError

    def mask(self, w: int, device: torch.device) -> torch.Tensor | None:
        """Which of the block's T context states query i of W may see (W, T), None for all."""
        return None

    @torch.no_grad()
    def inference_constants(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What a step would otherwise recompute from the parameters (SH's composed map)."""
        return None

    # ---- inference (blockstate.cache): allocate_cache, prefill, step per variant


def _identity(k: torch.Tensor) -> torch.Tensor:
    return k


class _PositionContext(ContextStates):
    """SH and MH: the SSM outputs at the block's own positions; query i sees positions j <= i."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _position_kv(self, y: torch.Tensor, w: int,
                     sh_map: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Context outputs y (B, L, C, Hs) -> keys/values (B, L / w, w, 2, H, Dh)."""
        raise NotImplementedError

    def _step_kv(self, outputs: torch.Tensor, cache) -> torch.Tensor:
        """Context outputs (B, C, Hs) of one position -> its keys/values (B, 2, H, 1, Dh)."""
        return self._position_kv(outputs.unsqueeze(1), 1, cache.sh_map)[:, 0, 0].unsqueeze(3)

    def mask(self, w: int, device: torch.device) -> torch.Tensor:
        key = (w, device)
        if key not in self._masks:  # built once per block size and device, like the self-attention masks
            self._masks[key] = torch.ones(w, w, dtype=torch.bool, device=device).tril()
        return self._masks[key]

    def _forward(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        u = self.down(h)
        outputs = self._context_outputs(self.ssm(u), h.dtype)                      # (B, L, C, Hs)
        k, v = self._position_kv(outputs, self.block_size).unbind(dim=3)
        return k, v, u, outputs

    def allocate_cache(self, batch: int, device: torch.device, dtype: torch.dtype
                       ) -> tuple[SSMCache, KVCache]:
        """The SSM cache and the cache of the current block's context keys/values."""
        return (self.ssm.allocate_cache(batch, device, dtype),
                KVCache.empty(batch, self.n_heads, self.head_dim, self.block_size, device, dtype))

    def prefill(self, h: torch.Tensor, length: int, cache, key_norm=_identity
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`forward(h)` and `read` for h (B, L', D) whose first `length` positions are real,
        filling the layer's cache (a `BSTCache`) for the position after them; cached keys pass
        `key_norm` (see `step`)."""
        k, v, u, outputs = self._forward(h)
        self.ssm.prefill_cache(u[:, :length], cache.ssm)
        w, complete = self.block_size, length // self.block_size
        if length % w:
            part = slice(0, length % w)
            cache.context.append(key_norm(k[:, complete, part].transpose(1, 2)),
                                 v[:, complete, part].transpose(1, 2))
        return k, v, self.read(outputs)

    def step(self, u: torch.Tensor, cache, offset: int, key_norm=_identity
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Advance by one position whose down-projected input is u (B, Hs), at in-block `offset`;
        the context keys/values (B, H, T, Dh) its query sees, and its direct read (B, D) or None.
        `key_norm` (the cross-attention's key normalization) is applied once, when a key enters
        the cache."""
        outputs = self._context_outputs(self.ssm.step(u, cache.ssm), u.dtype)       # (B, C, Hs)
        k, v = self._step_kv(outputs, cache).unbind(1)                              # (B, H, 1, Dh)
        if offset == 0:
            cache.context.keep_last(0)
        return *cache.context.append(key_norm(k), v), self.read(outputs)


class SHContext(_PositionContext):
    """SH (single head): one filter per SSM channel; its outputs, lifted to the model width, give
    the keys and values of every head."""

    variant = "sh"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.lift = nn.Linear(config.ssm_width, config.d_model)
        self.kv = nn.Linear(config.d_model, 2 * self.n_heads * self.head_dim, bias=False)

    def sh_kv_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv(lift(y)) as one map from the SSM width, (W_kv W_lift) y + W_kv b_lift, which costs
        Hs x 2HDh per token instead of Hs x D + D x 2HDh: (weight (2 H Dh, Hs), bias)."""
        return self.kv.weight @ self.lift.weight, self.kv.weight @ self.lift.bias

    @torch.no_grad()
    def inference_constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sh_kv_map()

    def _position_kv(self, y: torch.Tensor, w: int,
                     sh_map: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`sh_map`: the composed map when already computed (`sh_kv_map`)."""
        kv = F.linear(y[:, :, 0], *(sh_map or self.sh_kv_map()))                   # (B, L, 2 H Dh)
        return to_blocks(kv, w).unflatten(-1, (2, self.n_heads, self.head_dim))

    def _step_kv(self, outputs: torch.Tensor, cache) -> torch.Tensor:
        kv = F.linear(outputs[:, 0], *cache.sh_map)                                # (B, 2 H Dh)
        return kv.view(outputs.shape[0], 2, self.n_heads, 1, self.head_dim)


class MHContext(_PositionContext):
    """MH (multi head): H filters; head h reads filter h's outputs, through its own map from the SSM
    width to keys/values (the lift and the key/value projection composed per head)."""

    variant = "mh"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.kv_weight = nn.Parameter(
            torch.randn(self.n_heads, config.ssm_width, 2 * self.head_dim) * config.init_std)

    def reset_parameters(self) -> None:
        """With normalized SSM outputs: the product of a unit-scale lift's and the key/value
        projection's scales."""
        if not isinstance(self.norm, nn.Identity):
            width = self.down.out_features
            nn.init.normal_(self.kv_weight, std=self.init_std / math.sqrt(width) * math.sqrt(
                self.n_heads * self.head_dim))

    def _position_kv(self, y: torch.Tensor, w: int,
                     sh_map: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        kv = torch.einsum("blhc,hcd->blhd", y, self.kv_weight.to(y.dtype))         # (B, L, H, 2 Dh)
        return to_blocks(kv, w).unflatten(-1, (2, self.head_dim)).transpose(3, 4)


class MFContext(ContextStates):
    """MF (multi filter): S filters; block k reads the S outputs at the last position of block k-1
    (block 0 a learned initial context), lifted to the model width, plus learned context IDs. No
    mask: every state lies strictly in the past."""

    variant = "mf"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.lift = nn.Linear(config.ssm_width, config.d_model)
        self.kv = nn.Linear(config.d_model, 2 * self.n_heads * self.head_dim, bias=False)
        s = config.context.states
        self.initial_context = nn.Parameter(torch.randn(s, config.d_model) * config.init_std)
        self.context_ids = nn.Parameter(torch.randn(s, config.d_model) * config.init_std)

    def _summary_kv(self, last: torch.Tensor | None, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The S outputs at the end of each previous block, last (B, nb-1, S, Hs) (None for no
        previous block) -> keys/values (B, nb, S, 2, H, Dh), block 0 reading the initial context."""
        initial = self.initial_context.to(dtype).expand(batch, 1, -1, -1)          # (B, 1, S, D)
        context = initial if last is None else torch.cat([initial, self.lift(last)], dim=1)
        kv = self.kv(context + self.context_ids.to(context.dtype))
        return kv.unflatten(-1, (2, self.n_heads, self.head_dim))                  # (B, nb, S, 2, H, Dh)

    def _forward(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        u = self.down(h)  # only the outputs at block ends are needed: (B, nb, S, Hs)
        ends = self._context_outputs(self.ssm.block_end_outputs(u, self.block_size), h.dtype)
        k, v = self._summary_kv(ends[:, :-1], h.shape[0], h.dtype).unbind(dim=3)
        return k, v, u, ends

    def allocate_cache(self, batch: int, device: torch.device, dtype: torch.dtype
                       ) -> tuple[SSMCache, None]:
        """The SSM cache; the summary keys/values live in the layer cache (`BSTCache.summary`)."""
        return self.ssm.allocate_cache(batch, device, dtype), None

    def _summary_step(self, outputs: torch.Tensor | None, batch: int, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (B, H, S, Dh) of the block after one whose last context outputs are
        `outputs` (B, S, Hs) (None: the first block, which reads the initial context)."""
        last = None if outputs is None else outputs.unsqueeze(1)
        k, v = self._summary_kv(last, batch, dtype)[:, -1].unbind(dim=2)            # (B, S, H, Dh)
        return k.transpose(1, 2), v.transpose(1, 2)

    def prefill(self, h: torch.Tensor, length: int, cache, key_norm=_identity
                ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """As `_PositionContext.prefill`; the cache keeps the summary of the last whole block."""
        k, v, u, ends = self._forward(h)
        self.ssm.prefill_cache(u[:, :length], cache.ssm)
        complete = length // self.block_size
        outputs = ends[:, complete - 1] if complete else None
        k_next, v_next = self._summary_step(outputs, h.shape[0], h.dtype)
        cache.summary = key_norm(k_next), v_next
        return k, v, None

    def step(self, u: torch.Tensor, cache, offset: int, key_norm=_identity
             ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """As `_PositionContext.step`: the context is fixed within a block and refreshed at its
        end (the SSM's outputs are computed only there)."""
        batch, last = u.shape[0], offset == self.block_size - 1
        y = self.ssm.step(u, cache.ssm, output=last)
        if cache.summary is None:
            k, v = self._summary_step(None, batch, u.dtype)
            cache.summary = key_norm(k), v
        k, v = cache.summary
        if last:  # the outputs at this block's end summarize it for the next block
            k_next, v_next = self._summary_step(self._context_outputs(y, u.dtype), batch, u.dtype)
            cache.summary = key_norm(k_next), v_next
        return k, v, None


def build_context_states(config: ModelConfig) -> ContextStates:
    """The context-state construction that `config.context` describes."""
    return config.context.build(config)


# ---------------------------------------------------------------------- configs (`ModelConfig.context`)
@dataclass
class _PositionOptions(ContextOptions):
    """SH and MH: the SSM outputs at the block's own positions. `direct` (not in the paper): each
    BST layer also adds a linear map of its context outputs (after the activation) to the residual
    stream, beside the cross-attention: a read of the state that does not pass through a softmax
    over the block."""

    direct: bool = False

    @property
    def direct_read(self) -> bool:
        return self.direct


@register("context", "sh")
@dataclass
class SHOptions(_PositionOptions):
    """SH (single head): one filter per SSM channel, its outputs serving every head."""

    module: ClassVar[type] = SHContext


@register("context", "mh")
@dataclass
class MHOptions(_PositionOptions):
    """MH (multi head): H filters, head h reading filter h's outputs."""

    module: ClassVar[type] = MHContext

    def channels(self, model: ModelConfig) -> int:
        return model.n_heads


@register("context", "mf")
@dataclass
class MFOptions(ContextOptions):
    """MF (multi filter): `states` (S) filters whose outputs at the end of the previous block are
    the block's context states; the SSM is half as wide (D/8) by default."""

    states: int = 32

    module: ClassVar[type] = MFContext
    width_divisor: ClassVar[int] = 8
    summarizes_blocks: ClassVar[bool] = True

    def check(self) -> None:
        super().check()
        positive("context.states", self.states)

    def channels(self, model: ModelConfig) -> int:
        return self.states


class BSTLayer(ResidualTail):
    """Pre-norm BST layer: x + Proj([SelfAttn(h); CrossAttn(h, context)]), then x + MLP(Norm(x)),
    with h = Norm(x). Input length must be a multiple of `config.block_size`."""

    cache_type = BSTCache

    def __init__(self, config: ModelConfig):
        super().__init__()
        inner = config.n_heads * config.resolved_head_dim
        self.block_size, self.n_heads = config.block_size, config.n_heads
        self.head_dim = config.resolved_head_dim
        self.dropout_p = config.dropout
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.self_attn = BlockSelfAttention(config)
        self.context = build_context_states(config)
        self.cross_q = nn.Linear(config.d_model, inner, bias=False)
        self.cross_qk_norm = QKNorm(config.n_heads, self.head_dim, config.qk_norm)
        self.init_tail(config, 2 * inner)

    def cross_attention(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Queries from h (B, L, D) attend to their block's context states k, v (B, nb, T, H, Dh)
        -> (B, L, H * Dh)."""
        batch, w = h.shape[0], h.shape[1] // k.shape[1]
        q = to_blocks(self.cross_q(h), w).unflatten(-1, (self.n_heads, self.head_dim))
        q, k = self.cross_qk_norm(q, k)                                            # (B, nb, W, H, Dh)
        mask = self.context.mask(w, h.device)
        dropout = self.dropout_p if self.training else 0.0
        out = attend(heads_first(q), heads_first(k), heads_first(v), mask, dropout)
        return heads_last(out, batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        k, v, _, outputs = self.context._forward(h)
        read = self.context.read(outputs)
        if read is not None:  # context.direct
            x = x + self.dropout(read)
        return self.tail(x, self.self_attn(h), self.cross_attention(h, k, v))

    # ---- inference (blockstate.cache)
    def allocate_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> BSTCache:
        ssm, context = self.context.allocate_cache(batch, device, dtype)
        attention = self.self_attn.allocate_cache(batch, device, dtype)
        with torch.no_grad():
            q, k, v = self.self_attn.qkv.weight.chunk(3)
            in_proj = torch.cat([q, k, self.cross_q.weight, v, self.context.down.weight]).to(dtype)
            ones = torch.ones_like(attention.scale)
            scales = [torch.broadcast_to(s, (self.n_heads, 1, 1)) for s in (
                attention.scale, ones, self.cross_qk_norm.query_scale().to(device=device, dtype=dtype))]
        return BSTCache(attention, ssm, context, sh_map=self.context.inference_constants(),
                        in_proj=in_proj, qk_scale=torch.stack(scales))

    def prefill(self, x: torch.Tensor, length: int, cache: BSTCache) -> torch.Tensor:
        """`forward(x)` for x (B, L', D) whose first `length` positions are real, filling the
        empty `cache` for the position after them."""
        h = self.attn_norm(x)
        k, v, read = self.context.prefill(h, length, cache, self.cross_qk_norm.keys)
        if read is not None:
            x = x + read
        return self.tail(x, self.self_attn.prefill(h, length, cache.attention),
                         self.cross_attention(h, k, v))

    def step(self, x: torch.Tensor, cache: BSTCache, offset: int) -> torch.Tensor:
        """Outputs (B, D) of one new position x (B, D) at in-block `offset`. One product
        with the cached `in_proj` gives the self-attention queries and keys, the cross-attention
        queries, the self-attention values and the SSM input; the first three are normalized
        together (self- and cross-attention normalize alike: both follow `config.qk_norm`)."""
        batch, inner = x.shape[0], self.n_heads * self.head_dim
        proj = F.linear(self.attn_norm(x), cache.in_proj)                          # (B, 4 H Dh + Hs)
        heads = proj[:, :4 * inner].view(batch, 4, self.n_heads, 1, self.head_dim)
        q, k, cross_q = (self.cross_qk_norm.keys(heads[:, :3]) * cache.qk_scale).unbind(1)  # (B, H, 1, Dh)
        self_out = self.self_attn.attend_cached(q, k, heads[:, 3], cache.attention, offset)  # (B, H, 1, Dh)
        k, v, read = self.context.step(proj[:, 4 * inner:], cache, offset, self.cross_qk_norm.keys)
        cross = F.scaled_dot_product_attention(cross_q, k, v, scale=1.0)            # (B, H, 1, Dh)
        if read is not None:
            x = x + read
        return self.step_tail(x, torch.cat([self_out.view(batch, inner), cross.view(batch, inner)], -1))


@register("arch", "bst")
@dataclass
class BSTArch(LayersAt):
    """The paper's model: BST layers at `bst_layers`, block-attention layers elsewhere."""

    has_ssm: ClassVar[bool] = True
    block_parallel: ClassVar[bool] = True
    layer: ClassVar[type] = BSTLayer
