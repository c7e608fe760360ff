"""One decision per step boundary for every process of a data-parallel run.

DDP averages gradients, not parameters, and every process runs the same number of collectives per
step. So the processes must agree, at each step boundary, on whether to stop and on the clock that
the time-based learning rate reads; otherwise a process that reads another elapsed time computes
another learning rate and its parameters drift silently, and one that stops a step early leaves the
others waiting in an all-reduce.

`agree_at_boundary` makes that decision with one small all-reduce (MAX) per step of a tensor
[signal, budget spent, elapsed seconds]:

- signal: the number of the stop signal (SIGINT, SIGTERM) a process received, else 0. If any
  process received one, all stop at this boundary and all report that signal (the larger number
  when processes received different ones).
- budget spent: decided by process 0 alone (the others send 0).
- elapsed: process 0's reading (the others send -inf), which every process then uses for its
  time-based learning rate, so the schedule, and `warmup_end`, are the same everywhere.

With one process no collective runs and the local values are returned unchanged.

`saved_by_main` makes every process wait for process 0's checkpoint, so that a process that stops
(after a signal, with exit status 143) does not exit before the checkpoint is written.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .device import Distributed


@dataclass(frozen=True)
class Boundary:
    """What every process agreed at a step boundary."""

    signal: str | None   # the stop signal received by some process (its name), else None
    budget_spent: bool   # process 0 found the budget spent
    elapsed: float       # process 0's elapsed training seconds

    @property
    def stop(self) -> bool:
        return self.signal is not None or self.budget_spent


def _signal_number(name: str | None) -> int:
    return 0 if name is None else int(signal.Signals[name])


def _signal_name(number: int) -> str | None:
    return None if number == 0 else signal.Signals(number).name


def agree_at_boundary(ddp: Distributed, device: torch.device, received: str | None,
                      elapsed: float, budget_spent: Callable[[float], bool]) -> Boundary:
    """The stop decision and clock all processes share at this step boundary.

    `received`: the stop signal this process received (its name), else None. `elapsed`: this
    process's elapsed training seconds (only process 0's is used). `budget_spent(elapsed)`:
    whether the budget is spent at that time (called on process 0 only)."""
    if ddp.world_size == 1 or not dist.is_initialized():
        return Boundary(received, budget_spent(elapsed), elapsed)
    # NCCL reduces tensors on the GPU only; gloo on the CPU
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = [float(_signal_number(received)), 0.0, -math.inf]
    if ddp.is_main:
        mine[1:] = [float(budget_spent(elapsed)), elapsed]
    values = torch.tensor(mine, dtype=torch.float64, device=where)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    number, spent, shared = values.tolist()
    return Boundary(_signal_name(int(number)), spent > 0, shared)


def saved_by_main(ddp: Distributed, save: Callable[..., None]) -> Callable[..., None]:
    """`save` (which writes on process 0 only), made to return on every process once process 0 has
    written: every process calls it at the same points, and no process runs ahead of the
    checkpoint. At the end of a run this matters: once one process exits with an error status
    (e.g. 143 after SIGTERM), torchrun stops the others, which would cut process 0's last
    checkpoint short."""
    if ddp.world_size == 1:
        return save

    def save_then_wait(**options: Any) -> None:
        try:
            save(**options)
        finally:
            if dist.is_initialized():
                dist.barrier()

    return save_then_wait
