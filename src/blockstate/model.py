"""The Block-State Transformer language model: embedding, a stack of BST and block attention
layers, final norm and an output head tied to the embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import BlockAttentionLayer, BlockRecurrentLayer, BSTLayer, GSSLayer, XLLayer
from .layers.bst import ContextStates

# The layer each architecture puts at the positions `bst_layers`; attention layers go elsewhere.
SPECIAL_LAYERS = {"bst": BSTLayer, "gss-hybrid": GSSLayer, "brt": BlockRecurrentLayer}
Memory = list[torch.Tensor]  # Transformer-XL: per layer, its input over the last block (B, W, D)


class BlockStateLM(nn.Module):
    """Decoder-only language model: BST, or a baseline chosen by `config.arch`.

    `model(tokens)` maps a LongTensor (B, L) to logits (B, L, vocab_size) for any L >= 1: the
    sequence is padded internally to a multiple of the block size at its end, which by causality
    cannot affect the real positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        if config.arch == "transformer-xl":
            self.layers = nn.ModuleList(XLLayer(config) for _ in range(config.n_layers))
        else:
            special, placed = SPECIAL_LAYERS[config.arch], set(config.resolved_bst_layers)
            self.layers = nn.ModuleList(
                special(config) if i in placed else BlockAttentionLayer(config)
                for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for embeddings and projections; residual output projections scaled
        by 1/sqrt(2 n_layers) (GPT-2). SSM kernels keep their own structured initialization."""
        std = self.config.init_std
        nn.init.normal_(self.embedding.weight, std=std)
        for name, module in self.named_modules():
            if ".kernel" in name or name.endswith("kernel"):
                continue
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(
                    ("out", "mlp.down")) else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ContextStates):
                module.reset_parameters()

    def generate(self, prompt_tokens, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop=(), on_token=None) -> list[list[int]]:
        """Prompts followed by sampled tokens; see `blockstate.generate.generate`."""
        from .generate import generate

        return generate(self, prompt_tokens, max_new_tokens, temperature, top_k, top_p, seed, stop,
                        on_token)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Raise ValueError unless `tokens` is an integer tensor (B, L), L >= 1, within the vocab."""
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a torch.Tensor of shape (B, L), got {type(tokens)}")
        if tokens.dim() != 2 or tokens.shape[1] < 1 or tokens.shape[0] < 1:
            raise ValueError(f"tokens must have shape (batch, length) with both >= 1, got "
                             f"{tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor (torch.long), got {tokens.dtype}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}) (vocab_size="
                f"{self.config.vocab_size}); got values in [{low}, {high}]")

    def forward(self, tokens: torch.Tensor, memory: Memory | None = None,
                keep: torch.Tensor | None = None, return_memory: bool = False):
        """Logits (B, L, V); with `return_memory` (Transformer-XL only), (logits, memory) where the
        memory continues the sequence in the next call. `keep` (B,) bool marks the rows whose
        `memory` continues the same document; other rows ignore it."""
        self.check_tokens(tokens)
        xl = self.config.arch == "transformer-xl"
        if not xl and (memory is not None or return_memory):
            raise ValueError(f"memory is carried by transformer-xl only, not arch={self.config.arch!r}")
        length = tokens.shape[1]
        w = self.config.block_size
        if return_memory and length % w:
            raise ValueError(f"carrying memory needs a length that is a multiple of block_size={w}; "
                             f"got {length}")
        if memory is not None and (len(memory) != len(self.layers)
                                   or memory[0].shape != (tokens.shape[0], w, self.config.d_model)):
            raise ValueError(f"memory must hold {len(self.layers)} tensors of shape "
                             f"{(tokens.shape[0], w, self.config.d_model)}")
        padded = -(-length // w) * w
        if padded != length:
            tokens = F.pad(tokens, (0, padded - length))
        x = self.dropout(self.embedding(tokens.long()))                           # (B, L', D)
        new_memory = []
        for i, layer in enumerate(self.layers):
            if xl:
                new_memory.append(x[:, padded - w:].detach())
                x = layer(x, None if memory is None else memory[i], keep)
            else:
                x = layer(x)
        x = self.norm(x[:, :length])                                              # (B, L, D)
        logits = F.linear(x, self.embedding.weight.to(x.dtype))                   # (B, L, V)
        return (logits, new_memory) if return_memory else logits
