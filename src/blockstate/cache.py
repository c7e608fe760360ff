"""Inference caches: what each layer keeps between decoding steps, as typed objects.

One `InferenceCache` per generation, allocated by `BlockStateLM.allocate_inference_cache(batch)`,
holds one cache per layer and the number of positions consumed so far. The model's two inference
entry points fill it: `prefill(tokens, cache)` (the prompt, in parallel) and `step(tokens, cache)`
(one more position per row). What each layer kind keeps:

- `KVCache`: self-attention keys (already normalized) and values of the positions the next query
  may see: the current block so far (block-only attention), plus the previous k blocks (sliding
  window, Transformer-XL, the Block-Recurrent Transformer's window) or all earlier positions (full
  attention, the only cache that grows with the context).
- `RecurrentSSMCache`: the state of an S4/S4D SSM, (B, C, H, N), complex for S4D's diagonal system
  and real coordinates for S4's dense one, with the one-step operators it advances by.
- `ConvSSMCache`: unstructured kernels have no finite state: their input history and the kernel's
  taps (grown by doubling), one dot product per output (a streamed convolution).
- `SelectiveSSMCache`: the selective SSM's state (B, C, G, P/G, N) and its short convolution's last
  (normalized) inputs.
- `BSTCache`: the layer's `KVCache`, its SSM cache, and its context keys/values: those of the
  current block's positions so far (SH, MH) or of the S summaries of the previous block (MF).
- `BRTCache`: the window `KVCache`, the S recurrent states and the current block's token
  keys/values, which update the states when the block completes.
- `GSSCache`: the GSS layer's SSM cache.
- `MambaCache`: the SSM cache of a Samba baseline's Mamba layer (its attention layers keep a
  `KVCache` of the sliding window).

States are kept in float32 (float64 for float64 models) whatever the model's dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


def nbytes(obj, shared: bool = True) -> int:
    """Bytes of every tensor held by a cache (dataclasses, lists, tuples); with shared=False,
    without the per-model constants a dataclass names in SHARED."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(nbytes(getattr(obj, f.name), shared) for f in dataclasses.fields(obj)
                   if shared or f.name not in getattr(obj, "SHARED", ()))
    if isinstance(obj, list | tuple):
        return sum(nbytes(v, shared) for v in obj)
    return 0


def select_rows(obj, rows: torch.Tensor):
    """A copy of a cache keeping batch rows `rows` (any order, repeats allowed): every tensor whose
    first axis is the batch is indexed; per-model constants (operators, kernel taps) are shared."""
    if dataclasses.is_dataclass(obj):
        changes = {f.name: select_rows(getattr(obj, f.name), rows) for f in dataclasses.fields(obj)
                   if f.name not in getattr(obj, "SHARED", ())}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, rows.to(obj.device))
    if isinstance(obj, list):
        return [select_rows(v, rows) for v in obj]
    if isinstance(obj, tuple):
        return tuple(select_rows(v, rows) for v in obj)
    return obj


@dataclass
class KVCache:
    """Keys and values (B, H, capacity, Dh) of which the first `length` positions are live, and
    two constants of the attention that reads them, computed once per cache from the parameters:
    `scale` (H, 1, 1), the query scale (QK normalization's learned temperature; 1/sqrt(Dh),
    (1, 1, 1), without it), and `bias` (1, H, 1, capacity), the relative position bias of a query
    at the last of `capacity` keys (windowed self-attention; the last n columns serve a query at
    the last of n keys)."""

    SHARED = ("scale", "bias")
    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, capacity: int, device, dtype,
              scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> KVCache:
        shape = (batch, heads, max(1, capacity), head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(shape, device=device, dtype=dtype), scale=scale, bias=bias)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add n positions k, v (B, H, n, Dh); return all live keys and values (views)."""
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:  # full attention grows: double the capacity
            grown = max(end, 2 * self.keys.shape[2])
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros(*old.shape[:2], grown, old.shape[3])
                new[:, :, :self.length] = old[:, :, :self.length]
                setattr(self, name, new)
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def keep_last(self, n: int) -> None:
        """Drop all but the last n live positions."""
        if n <= 0:
            self.length = 0
        elif self.length > n:
            for t in (self.keys, self.values):
                t[:, :, :n] = t[:, :, self.length - n:self.length].clone()
            self.length = n


@dataclass
class RecurrentSSMCache:
    """x_t = decay x_{t-1} + inp u_t, y_t = Re(readout x_t) per filter and channel: state
    (B, C, H, N); decay (C, H, N) (diagonal, complex) or (C, H, N, N) (dense, real); inp and
    readout (C, H, N). Dense systems also keep `transition` [decay; readout decay]
    (C, H, N + 1, N) and `drive` [inp; readout inp + D] (C, H, N + 1), so that one product gives
    the next state and its output, skip term included."""

    SHARED = ("decay", "inp", "readout", "transition", "drive")
    state: torch.Tensor
    decay: torch.Tensor
    inp: torch.Tensor
    readout: torch.Tensor
    transition: torch.Tensor | None = None
    drive: torch.Tensor | None = None


@dataclass
class ConvSSMCache:
    """Input history (B, H, capacity) of which `length` positions are filled, and kernel taps
    (C, H, capacity) flipped so that the last `length` taps meet the history in order."""

    SHARED = ("taps",)
    history: torch.Tensor
    taps: torch.Tensor
    length: int = 0


@dataclass
class SelectiveSSMCache:
    """SSM state (B, C, G, P/G, N) and the last inputs (B, CONV_WIDTH - 1, P) of the short
    causal convolution before it, already RMS-normalized as the convolution reads them."""

    state: torch.Tensor
    tail: torch.Tensor


SSMCache = RecurrentSSMCache | ConvSSMCache | SelectiveSSMCache


@dataclass
class BSTCache:
    """A BST layer: self-attention keys/values, SSM cache and context keys/values. SH/MH:
    `context` holds the current block's context keys/values so far; MF: `summary` holds the
    keys/values (B, H, S, Dh) of the previous block's summaries (replaced when a block completes).
    Constants computed once per cache from the parameters: `sh_map`, SH's composed lift and
    key/value map; `in_proj` (4 H Dh + Hs, D), the projections to self-attention queries and
    keys, cross-attention queries, self-attention values and the SSM input, stacked; `qk_scale`
    (3, H, 1, 1), the factors of the normalized self-attention queries, keys (ones) and
    cross-attention queries."""

    SHARED = ("sh_map", "in_proj", "qk_scale")
    attention: KVCache
    ssm: SSMCache
    context: KVCache | None = None
    summary: tuple[torch.Tensor, torch.Tensor] | None = None
    sh_map: tuple[torch.Tensor, torch.Tensor] | None = None
    in_proj: torch.Tensor | None = None
    qk_scale: torch.Tensor | None = None


@dataclass
class BRTCache:
    """A Block-Recurrent layer: window keys/values, recurrent state (B, S, D) and the current
    block's token keys/values (B, W, H, Dh), written position by position."""

    attention: KVCache
    state: torch.Tensor
    token_k: torch.Tensor
    token_v: torch.Tensor


@dataclass
class GSSCache:
    ssm: SSMCache


@dataclass
class MambaCache:
    ssm: SSMCache


LayerCache = KVCache | BSTCache | BRTCache | GSSCache | MambaCache


@dataclass
class InferenceCache:
    """Everything a model keeps between inference calls: one cache per layer and the number of
    positions every row has consumed (`position`)."""

    layers: list[LayerCache]
    batch: int
    position: int = 0

    def nbytes(self, constants: bool = True) -> int:
        """Bytes held: the rows' keys/values, states and histories, and (constants=True) the step
        operators and other constants computed from the parameters, which caches made by
        `select` share."""
        return nbytes(self.layers, shared=constants)

    def select(self, rows: torch.Tensor | list[int]) -> InferenceCache:
        """A cache of the given batch rows (reordered or repeated, e.g. for beam search or to
        continue one prompt several ways)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return InferenceCache(select_rows(self.layers, rows), len(rows), self.position)


__all__ = [
    "BRTCache", "BSTCache", "ConvSSMCache", "GSSCache", "InferenceCache", "KVCache", "LayerCache",
    "MambaCache", "RecurrentSSMCache", "SSMCache", "SelectiveSSMCache", "nbytes", "select_rows",
]
