"""Measuring calls and the machine: timed calls with the device synchronized, FLOPs counted from the
operations run, peak memory (CUDA allocator statistics, or the rise of the CPU process's peak
resident set), and the machine's achieved matmul and FFT throughput.

Peak memory on CPU is the rise of the process's peak resident set during the call (Linux
/proc/self/status VmHWM, reset through /proc/self/clear_refs, with glibc's mmap threshold pinned so
that freed tensors go back to the system); on CUDA, `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import ctypes
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .flops import flop_formulas


class PeakMemory:
    """Peak memory of a call: CUDA allocator statistics, or the rise of the CPU process's peak RSS
    (meaningful after `map_large_blocks`, in a process of its own: see `cpu_peak_memory`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.available = device.type == "cuda" or Path("/proc/self/clear_refs").exists()

    @staticmethod
    def _status(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(key + r":\s+(\d+)", text).group(1)) * 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif self.available:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.available = False
                return
            self._base = self._status("VmRSS")

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self._base
        return max(0, self._status("VmHWM") - self._base) if self.available else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def map_large_blocks() -> bool:
    """Make glibc map every block of 64 KiB or more afresh and unmap it when freed, so that the
    process's RSS tracks its live tensors (M_MMAP_THRESHOLD). Process-wide and for good: timing
    under it would charge every temporary tensor a page fault per page, which a long-running
    process does not pay (glibc's own threshold settles near 32 MiB), so only the processes of
    `cpu_peak_memory` set it."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16))
    except OSError:
        return False


def measure_call(fn: Callable[[], None], device: torch.device, repeats: int, budget_s: float,
                 count: Callable[[], None] | None = None) -> dict:
    """Warm-up with FLOPs counted (by running `count`, default fn, under a FLOP counter), then timed
    repeats of fn, stopping early once budget_s is spent; on CUDA also the peak memory of those
    (on the CPU, `cpu_peak_memory` measures it in a process of its own)."""
    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        (count or fn)()
    flops = counter.get_total_flops()
    memory = PeakMemory(device) if device.type == "cuda" else None
    times, peaks = [], []
    spent = 0.0
    while len(times) < repeats and (not times or spent < budget_s):
        if memory is not None:
            memory.start()
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - t0
        if memory is not None and (peak := memory.stop()) is not None:
            peaks.append(peak)
        times.append(elapsed)
        spent += elapsed
    return {"seconds": statistics.median(times), "all_seconds": times, "flops": flops,
            "peak_bytes": min(peaks) if peaks else None}


def timed_calls(fn: Callable[[], object], count: int, device: torch.device) -> list[float]:
    """Seconds of each of `count` calls of fn, the device synchronized before and after each."""
    times = []
    for _ in range(count):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    fn()
    return statistics.median(timed_calls(fn, repeats, device))


def measure_machine(device: torch.device, width: int, lengths: list[int], dtype: torch.dtype
                    ) -> dict:
    """Achieved matmul GFLOP/s (square 2048 and the layers' (L x D) @ (D x 4D) at L = 4096) and FFT
    throughput (rfft + irfft at the transform sizes of the lengths, over D / 4 channels)."""
    matmul = {}
    for label, (m, k, n) in {"square 2048": (2048, 2048, 2048),
                             f"tokens 4096 x {width} x {4 * width}": (4096, width, 4 * width)}.items():
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        matmul[label] = 2 * m * k * n / _median_time(lambda a=a, b=b: a @ b, device) / 1e9
    fft = {}
    channels = max(1, width // 4)
    for length in lengths:
        n = 2 * length  # next_fast_len of 2L is 2L for powers of two
        u = torch.randn(channels, length, device=device)
        seconds = _median_time(lambda u=u, n=n: torch.fft.irfft(torch.fft.rfft(u, n=n), n=n), device, 3)
        flops = 2 * channels * 2.5 * n * math.log2(n)
        fft[str(length)] = {"transform_size": n, "channels": channels, "seconds": seconds,
                            "gflops": flops / seconds / 1e9,
                            "ns_per_output": seconds / (channels * length) * 1e9}
    return {"matmul_gflops": matmul, "matmul_peak_gflops": max(matmul.values()), "fft": fft}
