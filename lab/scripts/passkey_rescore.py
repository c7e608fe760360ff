"""Whole-passkey accuracy of kept passkey models on fresh held-out sequences, more of them than
the harness scored: is a cell's 0.94 on 32 sequences (30 of 32) a 0.9 on more?

The harness scores each cell on `--eval-sequences` sequences drawn from `EVAL_SEED`; this draws
`--sequences` others per cell, from a seed no training batch, calibration or scored sequence uses
(`2**31 - 2**20`), at the lengths and depths given, for models `blockstate tasks run
--keep-models DIR` saved (each loads with the skip thresholds it trained with).

    OMP_NUM_THREADS=1 .venv/bin/python lab/scripts/passkey_rescore.py \
        runs/task-models-6000-recal/passkey-seq_len256/bst-recommended-seed{0,1,2,3} \
        --lengths 4096 --sequences 128 --out lab/runs/passkey_length/rescore-6000-recal.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from blockstate.loading import load_model
from blockstate.tasks import make_task
from blockstate.tasks.runner import evaluate

FRESH_SEED = 2**31 - 2**20  # training draws RUN_SEED * 10**6 + step: no run seed reaches 2146


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--lengths", default="4096", help="comma-separated sequence lengths")
    parser.add_argument("--depths", default="0,25,50,75,100")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    results = {}
    for path in args.models:
        model, _ = load_model(path)
        grid = {}
        for length in lengths:
            for depth in depths:
                task = make_task("passkey", seq_len=length, depth=depth)
                grid[f"{length}/{depth}"] = evaluate(model, task, args.sequences, args.batch_size,
                                                     model.config.block_size, FRESH_SEED)["exact"]
                print(path.name, length, depth, f"{grid[f'{length}/{depth}']:.3f}", flush=True)
        results[path.name] = grid
    args.out.write_text(json.dumps({"sequences": args.sequences, "seed": FRESH_SEED,
                                    "models": [str(p) for p in args.models],
                                    "exact": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
