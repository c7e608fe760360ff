"""Attention layers without an SSM: the non-BST layers of the paper's stack, and the layers of three
baselines (paper section 4):

- `transformer`: every layer is a `BlockAttentionLayer` with full causal self-attention
  (self_attention="full"; Vaswani et al. 2017), the quadratic reference, with the same pre-RMSNorm,
  T5 relative position bias, normalized queries/keys and ReLU MLP as BST's attention layers.
- `slide` (the paper's Slide:12L): every layer attends to the current and the previous block
  (self_attention="sliding", window W), no SSM.
- `transformer-xl` (Dai et al. 2019): every layer is an `XLLayer`, see its docstring.

At the small size these baselines widen their MLP (d_ff 1280 instead of 1024) so that their
parameter count is within 10% of the BST presets'; at the paper's base size they are the paper's
12-layer configuration as is (7% fewer parameters than BST:SH).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..attention import BlockSelfAttention
from ..cache import KVCache
from ..components import ConfigError, positive, register
from ..config import ArchOptions, ModelConfig
from .residual import ResidualTail


class BlockAttentionLayer(ResidualTail):
    """Pre-norm residual layer: x + Attn(Norm(x)), then x + MLP(Norm(x)).

    Self-attention is block-only or sliding-window according to `config.self_attention`.
    Input length must be a multiple of `config.block_size` (the model pads).
    """

    cache_type = KVCache

    def __init__(self, config: ModelConfig):
        super().__init__()
        inner = config.n_heads * config.resolved_head_dim
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.self_attn = BlockSelfAttention(config)
        self.init_tail(config, inner)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """`memory` (B, M, D): this layer's input over the M positions before x, `valid` (B, M)
        the ones of the row's current document (segment-recurrent baselines)."""
        h_memory = None if memory is None else self.attn_norm(memory)
        return self.tail(x, self.self_attn(self.attn_norm(x), h_memory, valid))


    # ---- inference (blockstate.cache)
    def allocate_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return self.self_attn.allocate_cache(batch, device, dtype)

    def prefill(self, x: torch.Tensor, length: int, cache: KVCache) -> torch.Tensor:
        """`forward(x)` for x (B, L', D) whose first `length` positions are real, filling the
        empty `cache` for the position after them."""
        return self.tail(x, self.self_attn.prefill(self.attn_norm(x), length, cache))

    def step(self, x: torch.Tensor, cache: KVCache, offset: int) -> torch.Tensor:
        """Outputs (B, D) of one new position x (B, D) at in-block `offset`."""
        return self.step_tail(x, self.self_attn.step(self.attn_norm(x), cache, offset))


class XLLayer(BlockAttentionLayer):
    """Transformer-XL layer (Dai et al. 2019): every query attends to its own block and the M =
    `memory_length` positions before it (4W by default). Inside a training sequence those positions
    are ordinary, differentiable keys; before its start they come from the memory, this layer's
    stop-gradient input over the last M positions of the previous sequence of the same document.
    Relative positions are the T5 bias shared with the other layers."""

    def __init__(self, config: ModelConfig):
        super().__init__(config.replace(self_attention="sliding"))


# ---------------------------------------------------------------------- configs (`ModelConfig.arch`)
@dataclass
class LayersAt(ArchOptions):
    """An arch that puts its `layer` at the positions `bst_layers` and block-attention layers
    (`BlockAttentionLayer`) everywhere else."""

    layer: ClassVar[Any] = None

    def build_layer(self, model: ModelConfig, index: int) -> nn.Module:
        if index in set(model.resolved_bst_layers):
            return self.layer(model)
        return BlockAttentionLayer(model)


def check_memory_length(arch: ArchOptions, model: ModelConfig) -> None:
    """A carried memory spans whole blocks."""
    if arch.memory_length is not None and arch.memory_length % model.block_size:
        raise ConfigError(f"arch.memory_length={arch.memory_length} must be a multiple of "
                          f"block_size={model.block_size}")


@register("arch", "transformer-xl")
@dataclass
class TransformerXLArch(ArchOptions):
    """Every layer a segment-recurrent `XLLayer` (the paper's Trsf-XL baseline). Each carries the
    inputs of the last `memory_length` positions into the next training sequence of the same
    document, and every query attends to its own block and the `memory_length` positions before
    it (None: 4W, 2048 at W = 512, the paper's Trsf-XL:2048). A multiple of block_size."""

    memory_length: int | None = None

    carries_memory: ClassVar[bool] = True

    def check(self) -> None:
        super().check()
        if self.memory_length is not None:
            positive("arch.memory_length", self.memory_length)

    def validate(self, model: ModelConfig) -> None:
        check_memory_length(self, model)

    def memory_span(self, model: ModelConfig) -> int:
        return self.memory_length if self.memory_length is not None else 4 * model.block_size

    def constant_attention(self, model: ModelConfig) -> bool:
        return True  # its layers always attend over a sliding window

    def build_layer(self, model: ModelConfig, index: int) -> nn.Module:
        return XLLayer(model)
