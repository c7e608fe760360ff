"""What the segment-recurrent baselines (Transformer-XL, the Block-Recurrent Transformer) carry
from one training segment into the next of the same document, and the forward pass that carries
it: the model's `forward` hands its layers to `run_carried` when given a `SegmentCarry`. Training
and evaluation never use these directly: they hold a `carry.Carry`, which does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import BlockRecurrentLayer


@dataclass
class Memory:
    """What a segment-recurrent model (transformer-xl, brt) carries from one training sequence into
    the next of the same document: every layer's input over the last M = `memory_length` positions
    (stop-gradient), which of those positions hold tokens of the row's current document, and the
    recurrent state of each Block-Recurrent layer. Rows are batch rows throughout."""

    inputs: list[torch.Tensor]          # per layer (B, M, D)
    valid: torch.Tensor                 # (B, M) bool
    states: dict[int, torch.Tensor]     # layer index -> (B, S, D)

    def rows(self, index: slice | torch.Tensor) -> Memory:
        return Memory([t[index] for t in self.inputs], self.valid[index],
                      {i: t[index] for i, t in self.states.items()})

    @classmethod
    def cat(cls, parts: list[Memory]) -> Memory:
        """Stack the rows of several memories (e.g. of gradient-accumulation micro-batches)."""
        return cls([torch.cat(ts) for ts in zip(*(p.inputs for p in parts), strict=True)],
                   torch.cat([p.valid for p in parts]),
                   {i: torch.cat([p.states[i] for p in parts]) for i in parts[0].states})

    def to(self, device: torch.device | str) -> Memory:
        return Memory([t.to(device) for t in self.inputs], self.valid.to(device),
                      {i: t.to(device) for i, t in self.states.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map (for safetensors)."""
        flat = {f"inputs.{i}": t for i, t in enumerate(self.inputs)}
        flat.update({f"states.{i}": t for i, t in self.states.items()})
        return {**flat, "valid": self.valid}

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor]) -> Memory:
        n = sum(1 for name in flat if name.startswith("inputs."))
        try:
            return cls([flat[f"inputs.{i}"] for i in range(n)], flat["valid"].bool(),
                       {int(name.split(".")[1]): t for name, t in flat.items()
                        if name.startswith("states.")})
        except (KeyError, ValueError) as e:
            raise ValueError(f"not a saved model memory: {e}") from None

    def check(self, model: nn.Module, batch: int) -> None:
        """Raise ValueError unless this memory fits `model` (a `BlockStateLM`) and `batch` rows."""
        config = model.config
        span, d = config.resolved_memory_length, config.d_model
        recurrent = {i for i, layer in enumerate(model.layers) if isinstance(layer, BlockRecurrentLayer)}
        states = config.arch.states(config) if recurrent else 0
        if (len(self.inputs) != len(model.layers)
                or any(t.shape != (batch, span, d) for t in self.inputs)
                or self.valid.shape != (batch, span) or set(self.states) != recurrent
                or any(t.shape != (batch, states, d) for t in self.states.values())):
            raise ValueError(
                f"memory does not fit this model and batch: it must be a Memory with "
                f"{len(model.layers)} inputs of shape {(batch, span, d)}, valid {(batch, span)} and "
                f"states of shape {(batch, states, d)} for layers {sorted(recurrent)}")


class SegmentCarry:
    """The memory carried across calls of a segment-recurrent model: `model(tokens, carry=c)`
    reads `c.memory` (None: nothing before these tokens) and leaves there the memory after them.
    Pass the same carry to the call on the next segment of the same rows."""

    def __init__(self, memory: Memory | None = None):
        if memory is not None and not isinstance(memory, Memory):
            raise ValueError(f"a SegmentCarry holds a blockstate.memory.Memory or None, not "
                             f"{type(memory).__name__}")
        self.memory = memory


def run_carried(model: nn.Module, x: torch.Tensor, carry: SegmentCarry,
                keep: torch.Tensor | None) -> torch.Tensor:
    """The layers of `model` on embedded inputs x (B, L, D), L a multiple of the block size, with
    the memory in `carry` before them; leaves in `carry` the memory after x. Every layer sees its
    own input over the last M positions (stop-gradient); Block-Recurrent layers also carry their
    state."""
    batch, length, d = x.shape
    span = model.config.resolved_memory_length
    memory = carry.memory
    valid = None
    if memory is not None:
        memory.check(model, batch)
        valid = memory.valid if keep is None else memory.valid & keep[:, None]   # (B, M)
    inputs, states = [], {}
    for i, layer in enumerate(model.layers):
        before = None if memory is None else memory.inputs[i]                     # (B, M, D)
        past = x.new_zeros(batch, span, d) if before is None else before
        inputs.append(torch.cat([past, x], 1)[:, -span:].detach())
        if isinstance(layer, BlockRecurrentLayer):
            state = None if memory is None else memory.states[i]
            x, state = model._layer(layer, x, before, valid, state, keep, return_state=True)
            states[i] = state.detach()
        else:
            x = model._layer(layer, x, before, valid)
    seen = valid if valid is not None else torch.zeros(batch, span, dtype=torch.bool, device=x.device)
    carry.memory = Memory(inputs, torch.cat([seen, seen.new_ones(batch, length)], 1)[:, -span:], states)
    return x


__all__ = ["Memory", "SegmentCarry", "run_carried"]
