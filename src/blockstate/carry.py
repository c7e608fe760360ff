"""What a model carries from one batch into the next of the same rows, in training and evaluation:
one `Carry` per run, made by `carry_for(model config)`, used the same way for every model.

`train`, `step.TrainStep` and `evaluate.iter_losses` never ask which model they run: the carry
chooses the data stream (`stream`, `evaluation_batches`), gives each forward pass its keyword
arguments (`forward_args`), takes the state a batch leaves (`after_batch`), and saves and restores
it with a checkpoint (`tensors`, `restore`). The base `Carry` carries nothing (shuffled windows in
training, the given windows in order in evaluation); `MemoryCarry` is the segment-recurrent
baselines' (Transformer-XL, the Block-Recurrent Transformer): lanes of whole documents, and the
`memory.Memory` the previous batch left. Model code does not import this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .data import BatchStream, PackedSequences, SegmentStream
from .memory import Memory, SegmentCarry


class Carry:
    """The state a model carries from one batch into the next of the same rows: here, none. Each
    batch stands alone: training reads shuffled windows (`BatchStream`), evaluation the windows
    it is given, in order. The batches these streams yield are (inputs, targets, *extra) tuples;
    `extra` is what `forward_args` needs (nothing here)."""

    continues_documents = False  # whether a batch's rows continue the previous batch's documents

    def stream(self, dataset: PackedSequences, global_batch_size: int, seed: int, rank: int = 0,
               world_size: int = 1) -> BatchStream:
        """The endless, resumable training stream of this process's batches."""
        return BatchStream(dataset, global_batch_size, seed, rank, world_size)

    def evaluation_batches(self, dataset: PackedSequences, batch_size: int,
                           max_batches: int | None, indices: np.ndarray | None = None
                           ) -> Iterator[tuple[torch.Tensor, ...]]:
        """At most `max_batches` batches of the windows `indices` of `dataset`, in order (default
        all), trimmed to their longest scored window."""
        indices = np.arange(len(dataset)) if indices is None else indices
        for b, start in enumerate(range(0, len(indices), batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            yield dataset.batch(indices[start:start + batch_size].tolist(), trim=True)

    def forward_args(self, extra: list[torch.Tensor], rows: slice, device: torch.device
                     ) -> dict[str, Any]:
        """Keyword arguments of the model's forward pass on `rows` of a batch with `extra`."""
        return {}

    def after_batch(self, forwards: list[dict[str, Any]]) -> None:
        """Take the state the batch leaves, from the `forward_args` of its parts (rows in order)."""

    def tensors(self) -> dict[str, torch.Tensor] | None:
        """The carried state as a flat name -> tensor map for a checkpoint (None: nothing)."""
        return None

    def restore(self, checkpoint: Any, device: torch.device, log: Callable[[str], None]) -> None:
        """Continue from the state saved with `checkpoint` (a `checkpoint.Checkpoint`)."""


class MemoryCarry(Carry):
    """The carried state of a segment-recurrent model (transformer-xl, brt): batches are lanes of
    consecutive windows of whole documents (`SegmentStream`, whose batches hold a third tensor,
    `keep`: the rows that continue their lane's document), and the `Memory` the previous batch
    left is read by the next (None: nothing before the first)."""

    continues_documents = True

    def __init__(self, memory: Memory | None = None):
        self.memory = memory

    def stream(self, dataset: PackedSequences, global_batch_size: int, seed: int, rank: int = 0,
               world_size: int = 1) -> SegmentStream:
        return SegmentStream(dataset, global_batch_size, seed, rank, world_size)

    def evaluation_batches(self, dataset: PackedSequences, batch_size: int,
                           max_batches: int | None, indices: np.ndarray | None = None
                           ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Lanes of whole documents in corpus order (`indices` is not used: every window is read in
        its document's order), at most one pass over `dataset` and `max_batches` batches."""
        stream = SegmentStream(dataset, max(1, min(batch_size, len(dataset))), seed=0, shuffle=False)
        steps = stream.batches_per_epoch
        for _ in range(steps if max_batches is None else min(max_batches, steps)):
            yield stream.next_batch()

    def forward_args(self, extra: list[torch.Tensor], rows: slice, device: torch.device
                     ) -> dict[str, Any]:
        """These rows' memory in a `SegmentCarry`, and their `keep`."""
        carried = SegmentCarry(None if self.memory is None else self.memory.rows(rows))
        return {"carry": carried, "keep": extra[0][rows].to(device)}

    def after_batch(self, forwards: list[dict[str, Any]]) -> None:
        self.memory = Memory.cat([forward["carry"].memory for forward in forwards])

    def tensors(self) -> dict[str, torch.Tensor] | None:
        return None if self.memory is None else self.memory.tensors()

    def restore(self, checkpoint: Any, device: torch.device, log: Callable[[str], None]) -> None:
        self.memory = checkpoint.memory(device)
        if self.memory is None and checkpoint.train_state["step"] > 0:
            log("warning: the checkpoint holds no carried memory; the first batch after resuming "
                "starts without it")


def carry_for(config: Any, enabled: bool = True) -> Carry:
    """A new carried state for a model of `config` (a `ModelConfig`): a `MemoryCarry` for the
    segment-recurrent archs unless `enabled` is false (`TrainConfig.carry_memory`), else `Carry`."""
    return MemoryCarry() if config.carries_memory and enabled else Carry()


__all__ = ["Carry", "MemoryCarry", "carry_for"]
