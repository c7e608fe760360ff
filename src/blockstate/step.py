"""One training step, the one every caller that trains uses: `blockstate train`, `blockstate tasks
run` and the `--size auto` throughput probe (as torchtitan's one `train_step`).

A step is: set the learning rate, forward and backward over the batch's micro-batches (autocast at
the run's precision, float16 loss scaling, gradients synchronized across processes on the last
micro-batch), clip the gradients' norm, then either take the optimizer step or, on a non-finite
loss or gradient norm, skip the batch with the gradients dropped. `NonFinitePolicy` decides when
skipped batches stop a run.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from .carry import Carry
from .device import autocast_dtype
from .evaluate import token_loss

# Why a step skipped its batch (StepResult.skipped): float16 overflow at the current loss scale
# (the scaler lowers it; not counted against the run), or a non-finite loss or gradient norm.
FP16_OVERFLOW = "fp16 overflow"
# A run stops after this many consecutive batches with a non-finite loss or gradient norm.
MAX_SKIPPED_BATCHES = 10
# What a model that carries nothing from batch to batch carries (a stateless Carry).
NO_CARRY = Carry()


@dataclasses.dataclass
class StepResult:
    """What one step did: the summed loss (nats) over `tokens` target tokens of all processes,
    the gradients' norm before clipping and why the batch was skipped (None: the optimizer
    stepped)."""

    loss_sum: float
    tokens: int
    grad_norm: float
    skipped: str | None = None

    @property
    def loss(self) -> float:
        """Mean loss per target token."""
        return self.loss_sum / self.tokens


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """float16 needs its loss scaled against underflow of small gradients (bf16 and fp32 do not)."""
    fp16 = autocast_dtype(precision, device) == torch.float16
    return torch.amp.GradScaler(device.type) if fp16 else None


@dataclasses.dataclass
class TrainStep:
    """The settings of a run's steps; call it with a batch and a learning rate for one step.

    `model` is what the forward pass runs (possibly compiled or DDP-wrapped); `parameters` the
    module whose parameters are clipped (the unwrapped model; by default `model`). `world_size` >
    1: the gradients are averaged over that many processes, by DDP (`no_sync` on all but the last
    micro-batch) or, with `sharded`, FSDP. `split_block` (context parallelism): every process holds
    the same sequences and computes its own whole blocks of them (of `split_block` tokens each);
    gradients are summed over processes. What the model carries from batch to batch is the
    `carry` (`blockstate.carry.Carry`) each call is given."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str = "auto"
    grad_clip: float = 1.0
    grad_accum: int = 1
    scaler: torch.amp.GradScaler | None = None
    parameters: nn.Module | None = None
    world_size: int = 1
    rank: int = 0
    sharded: bool = False
    split_block: int | None = None

    def __call__(self, batch: tuple, lr: float, carry: Carry = NO_CARRY) -> StepResult:
        """One optimizer step on `batch` (inputs, targets, *what `carry` reads; this process's
        rows) at learning rate `lr` (times a parameter group's `lr_scale`, where it has one);
        `carry` then holds the state the batch leaves (the default carries nothing)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum, tokens = self.forward_backward(batch, carry)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip (and report) the true gradient norm
        grad_norm = float(self.clip_grad_norm())
        skipped = None
        if not math.isfinite(loss_sum):
            skipped = "non-finite loss"
        elif not math.isfinite(grad_norm):
            # float16 overflow at this loss scale: the scaler skips the step and lowers the scale
            skipped = FP16_OVERFLOW if self.scaler is not None else "non-finite gradient norm"
        if skipped is None or skipped == FP16_OVERFLOW:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum, tokens, grad_norm, skipped)

    def forward_backward(self, batch: tuple, carry: Carry = NO_CARRY) -> tuple[float, int]:
        """Gradients of the mean loss over the global batch's tokens, accumulated over
        `grad_accum` micro-batches; the summed loss and the number of target tokens (over all
        processes). `carry` then holds the state the batch leaves."""
        from . import context_parallel as cp

        inputs, targets, *extra = batch                                          # (B, L) each
        if self.split_block is not None:  # (B, L / P) each: this process's blocks
            inputs = cp.split(inputs, self.rank, self.world_size, self.split_block)
            targets = cp.split(targets, self.rank, self.world_size, self.split_block)
        count = (targets != -100).sum().to(torch.float64)
        if dist.is_initialized():
            dist.all_reduce(count)
        micro = inputs.shape[0] // self.grad_accum
        wrapped = self.world_size > 1 and self.split_block is None  # DDP or FSDP
        loss_sum = torch.zeros((), dtype=torch.float64)
        forwards = []
        for m in range(self.grad_accum):
            rows = slice(m * micro, (m + 1) * micro)
            x, y = inputs[rows].to(self.device), targets[rows].to(self.device)
            forwards.append(carry.forward_args(extra, rows, self.device))  # e.g. carried memory
            with self._sync(last=m == self.grad_accum - 1), self._context_parallel():
                total, _ = token_loss(self.model, x, y, self.device, precision=self.precision,
                                      **forwards[-1])
                # mean over the global batch's tokens; DDP and FSDP average over processes
                objective = total * (self.world_size if wrapped else 1) / count.item()
                (self.scaler.scale(objective) if self.scaler is not None else objective).backward()
            loss_sum += total.detach().double().cpu()
        if self.split_block is not None:
            cp.all_reduce_gradients(self.model)
        if dist.is_initialized():
            dist.all_reduce(loss_sum)
        carry.after_batch(forwards)
        return float(loss_sum), int(count.item())

    def clip_grad_norm(self) -> torch.Tensor:
        """Clip the gradients' total norm to `grad_clip`; the norm before clipping (the same on
        every process, also when the gradients are FSDP shards)."""
        parameters = (self.parameters or self.model).parameters()
        if self.sharded:
            from .fsdp import clip_grad_norm

            return clip_grad_norm(parameters, self.grad_clip)
        return nn.utils.clip_grad_norm_(parameters, self.grad_clip)

    def _sync(self, last: bool):
        """Gradient synchronization across processes on the last micro-batch only."""
        if self.sharded:
            (self.parameters or self.model).set_requires_gradient_sync(last)
        elif self.world_size > 1 and self.split_block is None and not last:
            return self.model.no_sync()
        return nullcontext()

    def _context_parallel(self):
        from . import context_parallel as cp

        return cp.context_parallel() if self.split_block is not None else nullcontext()


@dataclasses.dataclass
class NonFinitePolicy:
    """When skipped batches stop a run: `policy` "stop" at the first non-finite loss or gradient
    norm, "skip" after `max_skipped` in a row. float16 overflow is the loss scaler's business and
    neither counts nor resets the tally."""

    policy: str = "skip"
    max_skipped: int = MAX_SKIPPED_BATCHES
    skipped: int = 0  # consecutive batches skipped for a non-finite loss or gradient norm

    def observe(self, result: StepResult) -> bool:
        """Count `result`; whether the run must stop now."""
        if result.skipped is None:
            self.skipped = 0
        elif result.skipped != FP16_OVERFLOW:
            self.skipped += 1
            return self.policy == "stop" or self.skipped >= self.max_skipped
        return False
