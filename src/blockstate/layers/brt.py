"""Block-Recurrent Transformer layer (Hutchins, Schlag, Wu, Dyer, Neyshabur 2022), configured as
the paper's strongest baseline "Rec:fixed:skip".

The layer keeps S recurrent state vectors, updated once per block of W tokens:
- vertical direction (tokens): self-attention over the current and previous block (sliding window)
  and cross-attention to the current state, concatenated and projected, residual, then an MLP;
- horizontal direction (states): self-attention among the states and cross-attention to the
  block's tokens, concatenated and projected, then a fixed gate: s <- g * s + (1 - g) * z with
  g = sigmoid(b) a learned, input-independent vector ("fixed"), and no MLP ("skip").
States carry learned state IDs and start from a learned initial state. As in the reference
implementation (meliad): S = W states by default (`recurrent_states`), the gate bias starts near 0
(Normal(0, 0.1), so g is about 0.5), the state's output projection is not scaled as a residual
branch, and both the state and the sliding window's previous block are carried from one training
sequence to the next of the same document (see `BlockStateLM.forward`'s memory).

The token self-attention and the block's keys/values do not depend on the state, so they are
computed for all blocks at once; the state then walks the blocks in order, which is the sequential
part the paper's speed comparison measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..attention import BlockSelfAttention, QKNorm, attend, heads_last, to_blocks
from ..cache import BRTCache
from ..components import positive, register
from ..config import ModelConfig
from .block import LayersAt, check_memory_length
from .residual import ResidualTail


class BlockRecurrentLayer(ResidualTail):
    cache_type = BRTCache

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, s = config.d_model, config.arch.states(config)
        self.n_heads, self.head_dim = config.n_heads, config.resolved_head_dim
        self.block_size, self.dropout_p = config.block_size, config.dropout
        inner = self.n_heads * self.head_dim
        self.norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.self_attn = BlockSelfAttention(config.replace(self_attention="sliding"))
        self.token_q = nn.Linear(d, inner, bias=False)          # tokens -> states
        self.token_kv = nn.Linear(d, 2 * inner, bias=False)     # states -> tokens
        self.token_qk_norm = QKNorm(self.n_heads, self.head_dim, config.qk_norm)
        self.init_tail(config, 2 * inner)
        self.state_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.state_q = nn.Linear(d, 2 * inner, bias=False)      # queries: self, cross
        self.state_kv = nn.Linear(d, 2 * inner, bias=False)
        self.state_qk_norm = QKNorm(self.n_heads, self.head_dim, config.qk_norm)
        self.state_out = nn.Linear(2 * inner, d, bias=False)
        self.initial_state = nn.Parameter(torch.randn(s, d) * config.init_std)
        self.state_ids = nn.Parameter(torch.randn(s, d) * config.init_std)
        self.gate_bias = nn.Parameter(torch.randn(d) * 0.1)  # meliad's "bias" gate: g near 0.5

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.n_heads, self.head_dim))

    def _token_keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (B, L, H, Dh) the state reads from the tokens h (B, L, D)."""
        k, v = self._heads(self.token_kv(h).unflatten(-1, (2, -1))).unbind(2)
        return k, v

    def _state_keys(self, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sn = self.state_norm(state) + self.state_ids                                # (B, S, D)
        state_k, state_v = self._heads(self.state_kv(sn).unflatten(-1, (2, -1))).unbind(2)
        return sn, state_k, state_v                                                 # (B, S, H, Dh)

    def _read_state(self, keys: tuple[torch.Tensor, ...], q: torch.Tensor, dropout: float
                    ) -> torch.Tensor:
        """Token queries q (B, W, H, Dh) attend to the state whose `_state_keys` are `keys`
        -> (B, H, W, Dh)."""
        _, state_k, state_v = keys
        q, sk = self.token_qk_norm(q, state_k)
        return attend(q.transpose(1, 2), sk.transpose(1, 2), state_v.transpose(1, 2), dropout=dropout)

    def _update_state(self, state: torch.Tensor, keys: tuple[torch.Tensor, ...],
                      token_k: torch.Tensor, token_v: torch.Tensor, dropout: float) -> torch.Tensor:
        """The state after a block whose tokens have keys/values (B, W, H, Dh), from `state` and
        its `_state_keys`, `keys` (formed once per block, read by the tokens and by the update)."""
        sn, state_k, state_v = keys
        q_self, q_cross = self._heads(self.state_q(sn).unflatten(-1, (2, -1))).unbind(2)
        q_self, sk = self.state_qk_norm(q_self, state_k)
        q_cross, tk = self.state_qk_norm(q_cross, token_k)
        z_self = attend(q_self.transpose(1, 2), sk.transpose(1, 2), state_v.transpose(1, 2),
                        dropout=dropout)
        z_cross = attend(q_cross.transpose(1, 2), tk.transpose(1, 2), token_v.transpose(1, 2),
                         dropout=dropout)                                           # (B, H, S, Dh)
        z = self.state_out(torch.cat([z_self, z_cross], -1).transpose(1, 2).flatten(2))
        gate = torch.sigmoid(self.gate_bias)
        return gate * state + (1 - gate) * z                                        # (B, S, D)

    def start_state(self, batch: int, state: torch.Tensor | None = None,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
        """The state a sequence starts from (B, S, D): the learned initial state, or `state` carried
        from the previous sequence for the rows where `keep` (B,) bool is true (all when None)."""
        initial = self.initial_state.expand(batch, -1, -1)
        if state is None:
            return initial
        if keep is None:
            return state
        return torch.where(keep[:, None, None], state, initial)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, state: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, return_state: bool = False):
        """x (B, L, D) -> (B, L, D); with `return_state`, also the state after the last block.
        `memory`/`valid` are this layer's input over the window before x (see BlockSelfAttention),
        `state`/`keep` the carried recurrent state (see `start_state`)."""
        h = self.norm(x)
        h_memory = None if memory is None else self.norm(memory)
        self_out = self.self_attn(h, h_memory, valid)                               # (B, L, H Dh)
        out, states = self._recur(x, h, self_out, self.start_state(x.shape[0], state, keep))
        return (out, states[-1]) if return_state else out

    def _recur(self, x: torch.Tensor, h: torch.Tensor, self_out: torch.Tensor,
               state: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The layer's output, and the state after each block, walking the blocks from `state`."""
        batch, w = x.shape[0], self.block_size
        dropout = self.dropout_p if self.training else 0.0
        token_q = to_blocks(self._heads(self.token_q(h)), w)                        # (B, nb, W, H, Dh)
        token_k, token_v = (to_blocks(t, w) for t in self._token_keys_values(h))    # (B, nb, W, H, Dh)
        cross, states = [], []
        # the recurrence: block k reads the state left by k - 1. The blocks are unbound once: the
        # backward of indexing block by block would fill a gradient of the whole tensor per block
        for q, k, v in zip(token_q.unbind(1), token_k.unbind(1), token_v.unbind(1), strict=True):
            keys = self._state_keys(state)
            cross.append(self._read_state(keys, q, dropout))                        # (B, H, W, Dh)
            state = self._update_state(state, keys, k, v, dropout)
            states.append(state)
        cross_out = heads_last(torch.stack(cross, 1).flatten(0, 1), batch)          # (B, L, H Dh)
        return self.tail(x, self_out, cross_out), states

    # ---- inference (blockstate.cache)
    def allocate_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> BRTCache:
        tokens = torch.zeros(batch, self.block_size, self.n_heads, self.head_dim, device=device,
                             dtype=dtype)
        return BRTCache(self.self_attn.allocate_cache(batch, device, dtype),
                        self.start_state(batch).to(dtype).clone(), tokens, tokens.clone())

    def prefill(self, x: torch.Tensor, length: int, cache: BRTCache) -> torch.Tensor:
        """`forward(x)` from the initial state for x (B, L', D) whose first `length` positions
        are real, filling the empty `cache` for the position after them: the state after the
        complete blocks, and the token keys/values of the incomplete one."""
        h = self.norm(x)
        self_out = self.self_attn.prefill(h, length, cache.attention)
        out, states = self._recur(x, h, self_out, cache.state)
        complete, part = divmod(length, self.block_size)
        if complete:
            cache.state = states[complete - 1]
        if part:
            k, v = self._token_keys_values(h[:, length - part:length])
            cache.token_k[:, :part], cache.token_v[:, :part] = k, v
        return out

    def step(self, x: torch.Tensor, cache: BRTCache, offset: int) -> torch.Tensor:
        """Outputs (B, D) of one new position x (B, D) at in-block `offset`; the state is
        updated when the block completes."""
        x = x.unsqueeze(1)
        h = self.norm(x)
        self_out = self.self_attn.extend(h, cache.attention, offset)
        keys = self._state_keys(cache.state)
        cross = self._read_state(keys, self._heads(self.token_q(h)), 0.0)           # (B, H, 1, Dh)
        k, v = self._token_keys_values(h)                                           # (B, 1, H, Dh)
        cache.token_k[:, offset], cache.token_v[:, offset] = k[:, 0], v[:, 0]
        if offset == self.block_size - 1:
            cache.state = self._update_state(cache.state, keys, cache.token_k, cache.token_v, 0.0)
        return self.tail(x, self_out, cross.transpose(1, 2).flatten(2))[:, 0]


@register("arch", "brt")
@dataclass
class BRTArch(LayersAt):
    """Block-Recurrent layers at `bst_layers` (the paper's Rec:fixed:skip baseline): `recurrent_states`
    states (None: one per position of a block, W, as the paper's 512 at W = 512), and every layer
    carries the inputs of the last `memory_length` positions (None: W, its sliding window) into the
    next training sequence of the same document."""

    recurrent_states: int | None = None
    memory_length: int | None = None

    carries_memory: ClassVar[bool] = True
    layer: ClassVar[type] = BlockRecurrentLayer

    def check(self) -> None:
        super().check()
        for name in ("recurrent_states", "memory_length"):
            if getattr(self, name) is not None:
                positive(f"arch.{name}", getattr(self, name))

    def validate(self, model: ModelConfig) -> None:
        check_memory_length(self, model)

    def states(self, model: ModelConfig) -> int:
        return self.recurrent_states if self.recurrent_states is not None else model.block_size

    def memory_span(self, model: ModelConfig) -> int:
        return self.memory_length if self.memory_length is not None else model.block_size
