"""Model level (`blockstate bench models`): training tokens/s of each preset at one size (the
training step of `blockstate train`, `step.TrainStep`: forward, backward, gradient clipping and
AdamW, in float32), FLOPs per token counted from the operations run, and MFU against the
machine's matmul rate measured in the same run.

    blockstate bench models --size small --out docs/benchmarks/models

Outputs: `<out>.json` (written after every measurement) and `<out>.md`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..reporting import machine_info, markdown_table
from ..step import TrainStep
from .flops import flop_formulas
from .report import write_outputs
from .timing import measure_machine, timed_calls


def run_models(out: Path | None, presets: list[str], size: str, batch: int, seq_len: int,
               steps: int, device: str = "cpu", command: str = "",
               log: Callable[[str], None] = print) -> dict:
    from ..registry import build_model

    dev = torch.device(device)
    width = build_model(presets[0], size).config.d_model if presets else 256
    limits = measure_machine(dev, width, [], torch.float32)
    report = {"kind": "models", "command": command, "machine": machine_info(dev), "size": size,
              "batch": batch, "seq_len": seq_len, "machine_limits": limits, "results": []}
    for name in presets:
        torch.manual_seed(0)
        model = build_model(name, size).to(dev)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=dev)
        # the training step `blockstate train` takes (forward, backward, clipping, AdamW), in float32
        train_step = TrainStep(model, optimizer, dev, precision="fp32")

        def step(train_step=train_step, tokens=tokens):
            train_step((tokens[:, :-1], tokens[:, 1:]), 1e-4)

        step()  # warm-up
        with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
            step()  # the operations of one training step, counted
        flops = counter.get_total_flops()
        times = timed_calls(step, steps, dev)
        seconds = statistics.median(times)
        r = {"model": name, "parameters": model.num_parameters(), "step_seconds": seconds,
             "all_seconds": times, "tokens_per_s": batch * seq_len / seconds,
             "step_flops": flops, "flops_per_token": flops / (batch * seq_len),
             "achieved_gflops": flops / seconds / 1e9,
             "mfu": flops / seconds / 1e9 / limits["matmul_peak_gflops"]}
        report["results"].append(r)
        log(f"  {name}: {r['tokens_per_s']:.0f} tokens/s ({r['parameters'] / 1e6:.2f}M parameters, "
            f"{r['mfu']:.1%} of the measured matmul peak)")
        if out is not None:
            write_outputs(out, report, False, models_markdown)
    if out is not None:
        write_outputs(out, report, False, models_markdown)
    return report


def models_markdown(report: dict) -> str:
    info = report["machine"]
    rows = [[r["model"], f"{r['parameters'] / 1e6:.2f}M", f"{r['step_seconds']:.2f}",
             f"{r['tokens_per_s']:.0f}",
             f"{r['flops_per_token'] / 1e6:.1f}" if "flops_per_token" in r else "-",
             f"{r['mfu']:.1%}" if "mfu" in r else "-"] for r in report["results"]]
    by_name = {r["model"]: r for r in report["results"]}
    for row, r in zip(rows, report["results"], strict=True):
        for ref in ("brt", "slide"):
            row.append(f"{r['tokens_per_s'] / by_name[ref]['tokens_per_s']:.2f}x" if ref in by_name else "-")
    return "\n".join([
        "# Model training throughput", "", f"Command: `{report['command']}`", "",
        f"Machine: {info['cpu']} ({info['cpus']} CPUs), device {info['device']}, {info['threads']} threads, "
        f"torch {info['torch']}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in info['load_average_at_start'])}. Size {report['size']}, batch "
        f"{report['batch']} x {report['seq_len']} tokens; the training step (forward, backward, "
        f"clipping, AdamW); median "
        f"step after a warm-up. MFLOP/token: the operations of one step counted by "
        f"`torch.utils.flop_counter` (FFTs and CPU attention included), per token; MFU: the achieved "
        f"FLOP rate over the machine's measured matmul peak "
        f"({report.get('machine_limits', {}).get('matmul_peak_gflops', float('nan')):.0f} GFLOP/s "
        f"float32 in the same run).", "",
        markdown_table(["model", "parameters", "step s", "tokens/s", "MFLOP/token", "MFU", "vs brt",
                        "vs slide"], rows), ""])


__all__ = ["models_markdown", "run_models"]
