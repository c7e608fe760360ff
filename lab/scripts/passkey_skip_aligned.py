"""Does a skip threshold that rises past the training length keep a passkey model trained with the
skip stage (`blockstate tasks run --skip-filler-stage`) reading at 16x and 64x? Inference only, on
kept models; nothing is retrained.

`passkey_skip_writes.py` found that the runs which lose the length are those whose skipping heads
write a filler token in every period: a fixed threshold lets the number of writes grow with the
length. Here each skipping head's threshold depends on the position t instead, so that the share
of positions it writes falls as L / t beyond the training length L (after LongMamba, Ye et al.
2025, which sets the threshold of a long sequence so that its long-memory channels take in about
as much as at the training length; here causally, from the position alone):

- calibration (the harness's: 32 sequences of the task at L, seed 2**31 - 1, the trained weights,
  skipping off) gives each skipping head its steps dt and q, the share of them at or above its
  stage threshold tau0;
- at position t < L the threshold stays tau0 (the model computes exactly as trained); at t >= L it
  is the calibration's (1 - q L / (t + 1)) quantile, at least tau0.

The rule and its one setting (the share q L / (t + 1)) were fixed before any model was scored with
it; every kept model is scored, on the harness's sequences (`EVAL_SEED`, 32 per cell, one batch),
at the lengths past L (at L the model is unchanged).

    OMP_NUM_THREADS=1 .venv/bin/python lab/scripts/passkey_skip_aligned.py \
        runs/task-models-6000/passkey-seq_len256/bst-recommended-seed2 \
        --out lab/runs/passkey_length/aligned-6000-seed2.json
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

import torch

from blockstate.loading import load_model
from blockstate.ssm.skip import selective_ssms, ssm_inputs, stop_skipping
from blockstate.tasks import make_task
from blockstate.tasks.runner import CALIBRATION_SEED, evaluate


@torch.no_grad()
def align(model, train_len: int) -> list[dict]:
    """Give every skipping head of `model` the position-dependent threshold described above."""
    thresholds = {name: ssm.skip_below for name, ssm in selective_ssms(model)}
    task = make_task("passkey", seq_len=train_len)
    stop_skipping(model)
    inputs = ssm_inputs(model, task.sample(32, CALIBRATION_SEED).inputs)
    summary = []
    for name, ssm in selective_ssms(model):
        tau0 = thresholds[name]
        if tau0 is None or not bool((tau0 > 0).any()):
            ssm.skip_below = tau0
            continue
        _, _, dt, _, _ = ssm._inputs(inputs[name].float())                    # (B, L, K, G)
        sample = dt.flatten(0, 1).sort(0).values                               # (n, K, G)
        n = sample.shape[0]
        share = (sample >= tau0).float().mean(0)                               # q: (K, G)
        ssm.skip_below = tau0
        ssm._aligned = (tau0, sample, share, train_len)
        ssm._skipped = types.MethodType(_skipped_aligned, ssm)
        summary.append({"layer": name, "share_at_L": [round(float(x), 4) for x in share.flatten()],
                        "skipping": int((tau0 > 0).sum()), "calibration_steps": n})
    return summary


def _skipped_aligned(self, dt: torch.Tensor) -> torch.Tensor:
    """dt (B, T, K, G) of a whole sequence from position 0, with each head's steps below its
    threshold at that position set to 0."""
    tau0, sample, share, train_len = self._aligned
    n, length = sample.shape[0], dt.shape[1]
    t = torch.arange(length, dtype=torch.float64)[:, None, None]               # (T, 1, 1)
    wanted = share.double()[None] * torch.clamp(train_len / (t + 1), max=1.0)  # (T, K, G)
    index = (n - torch.ceil(wanted * n)).clamp(0, n - 1).long()                # (T, K, G)
    later = torch.gather(sample.flatten(1), 0, index.flatten(1)).view_as(index)  # (T, K, G)
    threshold = torch.where(t < train_len, tau0.expand_as(later),
                            torch.maximum(later, tau0.expand_as(later)))
    threshold = torch.where(tau0 > 0, threshold, torch.zeros_like(threshold)).to(dt.dtype)
    return dt.masked_fill(dt < threshold, 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a checkpoint saved by `tasks run --keep-models`")
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--depths", default="0,25,50,75,100")
    p.add_argument("--multiples", default="4,16,64")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--out", default="")
    args = p.parse_args()
    multiples = [int(m) for m in args.multiples.split(",")]
    longest = args.train_len * max(multiples)
    model = load_model(args.model, max_seq_len=longest)[0]
    report = {"model": args.model, "rule": "share q * min(1, L / (t + 1))",
              "heads": align(model, args.train_len), "cells": []}
    print(report["heads"])
    for m in multiples:
        for depth in [int(d) for d in args.depths.split(",")]:
            task = make_task("passkey", seq_len=m * args.train_len, depth=depth)
            result = evaluate(model, task, args.sequences, args.sequences, 16)
            cell = {"seq_len": task.seq_len, "depth": depth, "whole": round(result["exact"], 3),
                    "per_digit": round(result["accuracy"], 3)}
            report["cells"].append(cell)
            print(cell, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
