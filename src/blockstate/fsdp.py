"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) for `blockstate
train --fsdp`, kept outside the model: each process holds 1/N of every parameter, gradient and
optimizer state, and gathers a layer's parameters only while it computes that layer.

Wrapping: every layer of `model.layers` is its own unit, then the root (embedding, final norm,
head). Mixed precision follows `--precision`: bf16 computes with bfloat16 copies of the parameters
and reduces gradients in float32; fp32 casts nothing. The SSM's parameters (marked
`_no_weight_decay` by the kernels) stay float32 in their own unit, as the kernels expect.

Checkpoints go through `torch.distributed.checkpoint` (DCP): every process writes its shards of the
model and the optimizer, and a checkpoint loads at any number of processes, or into a plain model
in one process. DCP's metadata file is a pickle: load only checkpoints you wrote yourself.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from .checkpoint import SHARDED_DIR, save_checkpoint, staging_dir

# Methods besides `forward` that a layer calls on its SSM module in a training step (the MF
# context's outputs at block ends): under FSDP they gather the SSM unit's parameters too.
SSM_FORWARD_METHODS = ("block_end_outputs",)


def shard_model(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None) -> nn.Module:
    """Apply `fully_shard` over all processes (on `device`'s type) to each of `model.layers`, then
    to `model` (in place; returned). `param_dtype`: the dtype of the parameters in compute (None:
    as stored, float32); gradients are reduced in float32 either way. The SSM's parameters keep
    their `_no_weight_decay` mark (read by `optim.parameter_groups`)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # fully_shard replaces every parameter by a new (DTensor) one: the marks are carried over
    marked = {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    exact = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for layer in model.layers:
        if param_dtype is not None:
            for unit in _float32_units(layer):
                fully_shard(unit, mesh=mesh, mp_policy=exact)
                for method in SSM_FORWARD_METHODS:
                    if hasattr(unit, method):
                        register_fsdp_forward_method(unit, method)
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for name, parameter in model.named_parameters():
        if name in marked:
            parameter._no_weight_decay = True  # type: ignore[attr-defined]
    return model


def _float32_units(layer: nn.Module) -> list[nn.Module]:
    """The outermost submodules of `layer` that own an SSM parameter (`_no_weight_decay`)."""
    units: list[nn.Module] = []
    for _, module in layer.named_modules():
        if module is layer or any(module in set(unit.modules()) for unit in units):
            continue
        if any(getattr(p, "_no_weight_decay", False) for p in module.parameters(recurse=False)):
            units.append(module)
    return units


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Under FSDP, whether the next backward pass reduce-scatters the gradients (False while
    accumulating micro-batches: the local unsharded gradients add up until the last one)."""
    model.set_requires_gradient_sync(enabled)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of `tensor` (its shard of a DTensor, else the tensor itself)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`nn.utils.clip_grad_norm_`, whose norm of sharded (DTensor) gradients is a replicated
    DTensor: returned as a plain tensor, the same on every process."""
    norm = nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def parameters_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite: each process checks its shards, and all agree."""
    finite = all(bool(torch.isfinite(local(p.detach())).all()) for p in model.parameters())
    if dist.is_initialized() and is_sharded(model):
        flag = torch.tensor([int(finite)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item())
    return finite


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole `model.state_dict()` gathered on the CPU of process 0 (an empty dict on the
    others; every process must call it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the model and optimizer state into `directory` (DCP);
    it returns once the checkpoint's metadata is written."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _one_process_quietly():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory,
                 no_dist=not dist.is_initialized())


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint of `save_sharded` (written at any number of processes) into `model` and
    `optimizer`: sharded or plain. Trust: DCP's metadata file is unpickled."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with _one_process_quietly():
        dcp.load(state, checkpoint_id=directory, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


@contextmanager
def _one_process_quietly() -> Iterator[None]:
    """Without a process group DCP reads and writes as one process, and warns that it does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded_checkpoint(run_dir: Path, step: int, model: nn.Module,
                            optimizer: torch.optim.Optimizer, is_main: bool, consolidated: bool,
                            **manifest: Any) -> None:
    """A checkpoint step directory (`blockstate.checkpoint`) whose model and optimizer state are
    DCP shards written by every process; process 0 adds the rest (`manifest`: model_config,
    train_state, tokenizer_dir), with `consolidated` also model.safetensors (the whole weights,
    for eval, generate and export), and installs it. Every process must call it."""
    where = [str(staging_dir(run_dir, step, os.getpid())) if is_main else None]
    if dist.is_initialized():
        dist.broadcast_object_list(where, src=0)
    temp = Path(where[0])
    save_sharded(temp / SHARDED_DIR, model, optimizer)
    weights = full_model_state(model) if consolidated else None
    if is_main:
        save_checkpoint(run_dir, step, weights, staged=temp, **manifest)


__all__ = ["clip_grad_norm", "full_model_state", "is_sharded", "load_sharded", "local",
           "parameters_finite", "save_sharded", "save_sharded_checkpoint", "set_gradient_sync",
           "shard_model"]
