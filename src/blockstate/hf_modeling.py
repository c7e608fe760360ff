"""`BlockStateForCausalLM` and `BlockStateCache`: a blockstate model behind `transformers`'
causal-LM and cache interfaces (see `blockstate.hf`).

This module is also written into every export as `modeling_blockstate.py` (its relative imports
rewritten to the bundled copies of blockstate's modules), so it imports nothing from blockstate
but through relative imports of model-side modules.

`generate()` runs on blockstate's one-token inference cache: the first call prefills the prompt in
parallel (`BlockStateLM.prefill`) and every later call feeds one token per row
(`BlockStateLM.step`), so a new token costs one step, as in blockstate's own `generate`. Beam
search reorders the cache's rows (`InferenceCache.select`). Left-padded batches (an
`attention_mask` whose zeros all come first in each row) run each row through a cache of its own,
so that every row is what generating it alone gives; any other mask is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from .cache import InferenceCache
from .hf_config import BlockStateConfig
from .model import BlockStateLM

_PADDING_MESSAGE = ("blockstate models have no padding semantics: an attention_mask may only "
                    "mask leading positions of a row (left padding, each row is then run "
                    "alone); batch prompts of different lengths with blockstate's own generate "
                    "(blockstate.generate.generate or model.model.generate)")


@dataclass
class BlockStateCausalLMOutput(ModelOutput):
    """Logits (B, L, V), the next-token loss when labels are given, and the inference cache
    (under both of the names `transformers` versions read it by)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: BlockStateCache | None = None
    past_key_values: BlockStateCache | None = None


class BlockStateCache(Cache):
    """blockstate's `InferenceCache` as a `transformers` `Cache`: empty until the first forward
    pass, which prefills it; `seen` is the number of input columns consumed (padding included).
    Either one cache for the whole batch (`batched`), or one per row (`rows`, for left-padded
    batches, whose rows are at different positions)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, model: BlockStateLM):
        try:
            super().__init__(layers=[])
        except TypeError:  # pragma: no cover - older transformers
            super().__init__()
        self.model = model
        self.batched: InferenceCache | None = None
        self.rows: list[InferenceCache] | None = None
        self.seen = 0

    @property
    def is_sliding(self) -> list[bool]:
        return []

    @property
    def is_linear(self) -> list[bool]:
        return []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self) -> int | None:  # pragma: no cover - transformers API
        return None

    def __len__(self) -> int:
        return len(self.model.layers)

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep batch rows `rows` (reordered or repeated), in place."""
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        if self.batched is not None:
            self.batched = self.batched.select(rows)
        if self.rows is not None:
            self.rows = [self.rows[i].select([0]) for i in rows.tolist()]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self.batched.batch if self.batched is not None else len(self.rows or [])
        self.select(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("blockstate's inference cache cannot be cropped (no assisted "
                                  "decoding)")

    def reset(self) -> None:
        self.batched, self.rows, self.seen = None, None, 0


def padding_starts(attention_mask: torch.Tensor | None, length: int) -> list[int] | None:
    """For a left-padded mask (B, L), the first unmasked column of each row; None when the mask
    masks nothing. Any other mask is refused."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -length:].bool() if attention_mask.dim() == 2 else None
    if mask is None:
        raise ValueError(f"attention_mask must have shape (batch, length); got "
                         f"{tuple(attention_mask.shape)}")
    if bool(mask.all()):
        return None
    if not bool(mask[:, -1].all()) or bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(_PADDING_MESSAGE)
    return (mask.shape[1] - mask.sum(1)).tolist()


class BlockStateForCausalLM(PreTrainedModel, GenerationMixin):
    """`BlockStateLM` behind the `transformers` causal-LM interface: `forward(input_ids, labels)`
    returns logits and, with labels, the next-token cross-entropy; with a `BlockStateCache`, the
    logits of the positions after those the cache holds."""

    config_class = BlockStateConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: BlockStateConfig):
        super().__init__(config)
        self.model = BlockStateLM(config.to_model_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No `DynamicCache`: `prepare_inputs_for_generation` makes a `BlockStateCache`."""
        return False

    def _init_weights(self, module: torch.nn.Module) -> None:
        """BlockStateLM initializes itself; loaded weights replace it anyway."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embedding

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embedding = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: BlockStateCache | None = None,
                past_key_values: BlockStateCache | None = None, use_cache: bool | None = None,
                **kwargs) -> BlockStateCausalLMOutput:
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, BlockStateCache):
            raise ValueError(f"blockstate models take a BlockStateCache, not "
                             f"{type(cache).__name__}")
        length = input_ids.shape[1]
        if cache is None:
            starts = padding_starts(attention_mask, length)
            logits = self._per_row(input_ids, starts, self.model) if starts else self.model(input_ids)
        else:
            logits = self._cached(input_ids, attention_mask, cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return BlockStateCausalLMOutput(loss=loss, logits=logits, cache=cache,
                                        past_key_values=cache)

    @staticmethod
    def _per_row(input_ids: torch.Tensor, starts: list[int], run) -> torch.Tensor:
        """Logits of each row's unpadded tokens alone, right-aligned (zeros at padding)."""
        outs = [run(input_ids[row:row + 1, start:]) for row, start in enumerate(starts)]
        logits = outs[0].new_zeros(input_ids.shape[0], input_ids.shape[1], outs[0].shape[-1])
        for row, (start, out) in enumerate(zip(starts, outs, strict=True)):
            logits[row, start:] = out[0]
        return logits

    def _cached(self, input_ids: torch.Tensor, attention_mask, cache: BlockStateCache):
        model = self.model
        if cache.batched is None and cache.rows is None:                       # prefill
            starts = padding_starts(attention_mask, input_ids.shape[1])
            if starts is None:
                cache.batched = model.allocate_inference_cache(input_ids.shape[0])
                logits = model.prefill(input_ids, cache.batched)
            else:
                cache.rows = [model.allocate_inference_cache(1) for _ in starts]
                it = iter(cache.rows)
                logits = self._per_row(input_ids, starts, lambda t: model.prefill(t, next(it)))
        else:                                                                 # new positions
            if attention_mask is not None and not bool(
                    attention_mask[:, -input_ids.shape[1]:].bool().all()):
                raise ValueError(_PADDING_MESSAGE)
            def feed(tokens: torch.Tensor, inner: InferenceCache) -> torch.Tensor:
                if tokens.shape[1] == 1:                                 # one step
                    return model.step(tokens, inner)[:, None]
                return model.prefill(tokens, inner)                      # steps, one by one

            if cache.batched is not None:
                logits = feed(input_ids, cache.batched)
            else:
                logits = torch.cat([feed(input_ids[row:row + 1], row_cache)
                                    for row, row_cache in enumerate(cache.rows)])
        cache.seen += input_ids.shape[1]
        return logits

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, cache=None,
                                      past_key_values=None, attention_mask=None,
                                      use_cache: bool | None = True, **kwargs) -> dict:
        """The columns the cache has not seen (all of them at first, with a new cache); without
        a cache (use_cache=False), the whole sequence every time."""
        cache = cache if cache is not None else past_key_values
        if use_cache is False:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        if cache is None:
            cache = BlockStateCache(self.model)
        if not isinstance(cache, BlockStateCache):
            raise ValueError(f"blockstate models take a BlockStateCache, not "
                             f"{type(cache).__name__}")
        return {"input_ids": input_ids[:, cache.seen:], "attention_mask": attention_mask,
                "cache": cache, "use_cache": True}
