"""What the reports of the benchmarks, the reproduction and the task suite share: a markdown table
and a description of the machine a measurement ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table of `rows` (cells already formatted) under `header`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict:
    """The CPU, its count, torch's threads, the versions, the load average now and the device (and
    its GPU's name on CUDA): what a report says about where it was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "load_average_at_start": os.getloadavg(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
