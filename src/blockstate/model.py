"""The Block-State Transformer language model: embedding, a stack of BST and block attention
layers, final norm and an output head (tied to the embedding unless `config.tie_embeddings` is
False)."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .builtin_components import BUILTIN_COMPONENTS  # noqa: F401 - registers the built-in kinds
from .cache import InferenceCache
from .config import ModelConfig
from .layers.bst import ContextStates
from .memory import SegmentCarry, run_carried


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
        self.layers = nn.ModuleList(config.arch.build_layer(config, i)
                                    for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = (None if config.tie_embeddings
                     else nn.Linear(config.d_model, config.vocab_size, bias=False))
        # Recompute each layer's activations in the backward pass instead of storing them (less
        # memory, about one more forward pass of compute); training only.
        self.activation_checkpointing = False
        # (kernel class, max_length) of the SSM kernels defined only up to a length, found once
        # here rather than by walking the modules at every forward pass.
        self._length_limits = sorted({(type(m).__name__, m.max_length) for m in self.modules()
                                      if getattr(m, "max_length", None) is not None})
        self.reset_parameters()

    def _layer(self, layer: nn.Module, *args, **kwargs):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for embeddings and projections; residual output projections scaled
        by 1/sqrt(2 n_layers) (GPT-2). SSM kernels (`initializes_itself`) keep their own structured
        initialization."""
        std = self.config.init_std
        nn.init.normal_(self.embedding.weight, std=std)
        own = [name + "." for name, module in self.named_modules()
               if getattr(module, "initializes_itself", False)]
        for name, module in self.named_modules():
            if (name + ".").startswith(tuple(own)):
                continue
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(
                    (".out", "mlp.down")) else 1.0
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

    # ---- inference: `allocate_inference_cache`, then `prefill` once and `step` per position
    def allocate_inference_cache(self, batch: int) -> InferenceCache:
        """An empty cache for `batch` rows (see `blockstate.cache`)."""
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        weight = self.embedding.weight
        return InferenceCache([layer.allocate_cache(batch, weight.device, weight.dtype)
                               for layer in self.layers], batch)

    def _check_cache(self, cache: InferenceCache, tokens: torch.Tensor) -> None:
        if (not isinstance(cache, InferenceCache) or len(cache.layers) != len(self.layers)
                or not all(isinstance(c, layer.cache_type)
                           for c, layer in zip(cache.layers, self.layers, strict=True))):
            raise ValueError("cache must be an InferenceCache from this model's "
                             "allocate_inference_cache")
        if tokens.shape[0] != cache.batch:
            raise ValueError(f"tokens have {tokens.shape[0]} rows but the cache was allocated for "
                             f"{cache.batch}")

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.output_weight.to(x.dtype))

    @property
    def output_weight(self) -> torch.Tensor:
        """The output head's weight (V, D): the embedding's when tied."""
        return self.embedding.weight if self.head is None else self.head.weight

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """Logits (B, T, V) of tokens (B, T), equal to `forward`'s, leaving in `cache` what the
        next position needs. On an empty cache the prompt runs in parallel (the forward pass on
        whole blocks, with each layer's state read off at the prompt's end); into a cache that
        already holds positions, the tokens are fed by `step`."""
        self.check_tokens(tokens)
        self._check_cache(cache, tokens)
        length = tokens.shape[1]
        self.warn_past_training_length(cache.position + length)
        if cache.position:
            return torch.stack([self.step(tokens[:, t], cache) for t in range(length)], dim=1)
        w = self.config.block_size
        x = self.embedding(F.pad(tokens, (0, -length % w)))                          # (B, L', D)
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            x = layer.prefill(x, length, layer_cache)
        cache.position = length
        return self._logits(x[:, :length])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """Logits (B, V) of one more token per row, tokens (B,) or (B, 1), equal to those the
        forward pass gives at that position; the work does not depend on the position (except
        for full attention's growing keys and unstructured kernels' history)."""
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() > 2 or (tokens.dim() == 2 and tokens.shape[1] != 1):
                raise ValueError(f"step takes one token per row, shape (B,) or (B, 1); got "
                                 f"{tuple(tokens.shape)} (use prefill for several positions)")
            tokens = tokens.reshape(-1, 1)
        self.check_tokens(tokens)
        self._check_cache(cache, tokens)
        offset = cache.position % self.config.block_size
        # Inference mode skips autograd's bookkeeping (10-15% of a step at the small size). The
        # layers' steps create no module-level caches, which would otherwise become inference
        # tensors that training could not use; the logits are returned as an ordinary tensor.
        with torch.inference_mode():
            x = self.embedding(tokens[:, 0])                                        # (B, D)
            for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
                x = layer.step(x, layer_cache, offset)
            logits = self._logits(x)
        cache.position += 1
        return logits.clone()

    def save_pretrained(self, directory, tokenizer=None, card=None):
        """Write the model (and `tokenizer`) in the Hugging Face layout, with the remote code
        plain `transformers` loads it by and a model card; see `blockstate.pretrained`."""
        from .pretrained import save_pretrained

        return save_pretrained(self, directory, tokenizer, card)

    def push_to_hub(self, repo_id: str, tokenizer=None, card=None, private: bool | None = None,
                    token=None, commit_message: str = "Upload blockstate model"):
        """Upload the model (and `tokenizer`) as an export to the Hugging Face Hub repository
        `repo_id` (created if missing); see `blockstate.pretrained.push_to_hub`."""
        from .pretrained import push_to_hub

        return push_to_hub(self, repo_id, tokenizer, card, private, token, commit_message)

    @classmethod
    def from_pretrained(cls, directory, device: torch.device | str = "cpu",
                        revision: str | None = None, token=None) -> BlockStateLM:
        """A model written by `save_pretrained`, in eval mode (its tokenizer: `blockstate.load`):
        a local directory or a Hugging Face Hub repo id ("owner/name")."""
        from .checkpoint import load_weights_strictly
        from .pretrained import read_pretrained

        config, state, weights = read_pretrained(directory, revision, token)
        model = cls(config)
        load_weights_strictly(model, state, str(weights),
                              "the file does not belong to this config.json")
        return model.to(device).eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Raise ValueError unless `tokens` is an integer tensor (B, L), L >= 1, within the vocab.
        The range is not checked for training steps on an accelerator, where reading it back
        would stall every step (`blockstate.train` checks each tokenized split once instead)."""
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a torch.Tensor of shape (B, L), got {type(tokens)}")
        if tokens.dim() != 2 or tokens.shape[1] < 1 or tokens.shape[0] < 1:
            raise ValueError(f"tokens must have shape (batch, length) with both >= 1, got "
                             f"{tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor (torch.long), got {tokens.dtype}")
        if tokens.device.type != "cpu" and self.training and torch.is_grad_enabled():
            return
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}) (vocab_size="
                f"{self.config.vocab_size}); got values in [{low}, {high}]")

    def warn_past_training_length(self, length: int) -> None:
        """Warn when `length` tokens run an SSM kernel past the length it is defined for (its
        `max_length`: the training length of unstructured and explicit filters, which then
        extrapolate; None for state-space kernels). The forward pass, evaluation and generation
        all allow it."""
        for name, limit in self._length_limits:
            if length > limit:
                warnings.warn(
                    f"{length} tokens are longer than the {limit} the {name} of ssm kind "
                    f"{self.config.ssm.kind!r} was trained for; its filter extrapolates beyond "
                    f"them and may not do so reliably (the s4, s4d and ssd kernels are defined at "
                    f"any length)", UserWarning, stacklevel=3)

    def forward(self, tokens: torch.Tensor, carry: SegmentCarry | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) of tokens (B, L).

        Segment-recurrent archs (transformer-xl, brt) may pass a `carry` (`blockstate.memory`):
        the layers read the memory it holds (from the previous segment of the same rows; none in
        a new carry), and the carry then holds the memory after `tokens`, for the next call.
        `keep` (B,) bool marks the rows whose memory continues the same document; the others start
        afresh (their memory is masked out and recurrent states reset)."""
        self.check_tokens(tokens)
        config = self.config
        if carry is not None and not config.carries_memory:
            raise ValueError(f"memory is carried by transformer-xl and brt only, not "
                             f"arch {config.arch.kind!r}")
        if keep is not None and carry is None:
            raise ValueError("keep marks which rows' carried memory continues; pass it with a carry")
        length = tokens.shape[1]
        self.warn_past_training_length(length)
        w = config.block_size
        if carry is not None and length % w:
            raise ValueError(f"carrying memory needs a length that is a multiple of block_size={w}; "
                             f"got {length}")
        padded = -(-length // w) * w
        if padded != length:
            tokens = F.pad(tokens, (0, padded - length))
        x = self.dropout(self.embedding(tokens.long()))                           # (B, L', D)
        if carry is None:
            for layer in self.layers:
                x = self._layer(layer, x)
        else:
            x = run_carried(self, x, carry, keep)
        return self._logits(x[:, :length])                                        # (B, L, V)
