"""One torchrun process of the DDP tests: `blockstate train` with test-only hooks.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py \\
        --report DIR [--slow-rank R --start-delay S --step-delay S] [--sigterm-rank R --sigterm-at-step N]
        [--save-delay S] \\
        -- train --config ... --out ...

The hooks live here, not in the product: they slow one process down (a pause between setting up DDP
and the start of its clock, as a process on a slower node or file system would have, and a pause
in every step), send one process SIGTERM at the start of a step, or slow down process 0's
checkpoint writes. Each process records the
learning rate it used at each step and, at the end, a hash of its parameters, in DIR/rank<R>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

import blockstate.train as train_module
from blockstate.cli import main


def _options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", required=True)
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--sigterm-rank", type=int, default=-1)
    parser.add_argument("--sigterm-at-step", type=int, default=-1)
    parser.add_argument("--save-delay", type=float, default=0.0)
    return parser.parse_args(argv[:split]), argv[split + 1:]


def run() -> int:
    options, cli_args = _options(sys.argv[1:])
    rank = int(os.environ.get("RANK", "0"))
    Path(options.report).mkdir(parents=True, exist_ok=True)
    (Path(options.report) / f"pid{rank}").write_text(str(os.getpid()))  # to end it if it hangs
    slow = rank == options.slow_rank
    models: list[torch.nn.Module] = []
    steps: list[tuple[int, float]] = []

    class RecordingDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module, *args, **kwargs):
            super().__init__(module, *args, **kwargs)
            models.append(module)
            if slow:  # after the parameters were broadcast, before the training clock starts
                time.sleep(options.start_delay)

    torch.nn.parallel.DistributedDataParallel = RecordingDDP
    schedule = train_module.learning_rate

    def learning_rate(step, *args, **kwargs):
        lr = schedule(step, *args, **kwargs)
        steps.append((step, lr))
        if slow:
            time.sleep(options.step_delay)
        if rank == options.sigterm_rank and step == options.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr

    train_module.learning_rate = learning_rate
    save_checkpoint = train_module.save_checkpoint

    def slow_save(*args, **kwargs):  # process 0 writes checkpoints; a slow disk
        time.sleep(options.save_delay)
        return save_checkpoint(*args, **kwargs)

    train_module.save_checkpoint = slow_save
    code = main(cli_args)
    # torchrun stops the other processes (SIGTERM) once one exits with an error, e.g. 143 after
    # SIGTERM: from here on, this process finishes its report first
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    digest = hashlib.sha256()
    for model in models:
        for name, parameter in model.state_dict().items():
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    record = {"rank": rank, "exit": code, "steps": steps,
              "final_step": steps[-1][0] + 1 if steps else None, "parameters": digest.hexdigest()}
    (Path(options.report) / f"rank{rank}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(run())
