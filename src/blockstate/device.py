"""Where a run computes: the device, the data-parallel process group (`torchrun`), the autocast
dtype of a precision setting, and the peak FLOP/s that model FLOPs utilization is measured
against."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .train_config import PRECISIONS


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device `name` names ("auto": this process's GPU when CUDA is available, else the
    CPU); ValueError, in one line, for a name torch does not know or a device this machine lacks."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
                         ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device={name!r} requested but MPS (Apple GPU) is not available "
                             f"here; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"device={name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


# Dense data-sheet peaks, TFLOP/s per device: (bf16 tensor cores, fp32).
PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5)}


def device_peak_flops(device: torch.device, precision: str, given_tflops: float | None) -> float | None:
    """Peak FLOP/s of one `device` at `precision`: `given_tflops` when set, else the data-sheet
    peak of a known GPU, else None (no MFU is shown)."""
    if given_tflops is not None:
        return given_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAK_TFLOPS.items():
        if key in name:
            return (bf16 if autocast_dtype(precision, device) is not None else fp32) * 1e12
    return None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None: float32, no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid; allowed: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
