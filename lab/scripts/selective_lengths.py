"""Length generalization of a model trained on selective copying: its accuracy (256 held-out
sequences, the suite's evaluation) when the symbols are scattered over longer regions than in
training, the answer still the 8 symbols in order.

    .venv/bin/python lab/scripts/selective_lengths.py CHECKPOINT [--regions 64,128,256,512,1024]
"""

from __future__ import annotations

import argparse

import torch

from blockstate.checkpoint import load_checkpoint
from blockstate.config import ModelConfig
from blockstate.loading import load_model
from blockstate.tasks import make_task
from blockstate.tasks.runner import evaluate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--regions", default="64,128,256,512,1024")
    args = parser.parse_args()
    torch.set_num_threads(1)
    regions = [int(r) for r in args.regions.split(",")]
    checkpoint = load_checkpoint(args.checkpoint)  # verified and read once
    trained = ModelConfig.from_dict(checkpoint.model_config).max_seq_len
    # room for the longer sequences (max_seq_len does not change the weights)
    model, _ = load_model(checkpoint, max_seq_len=max(trained, max(regions) + 64))
    config = model.config
    print(f"{args.checkpoint} (trained at max_seq_len {trained})\n")
    print("| region | L | accuracy | accuracy by distance (tokens: accuracy) |")
    print("|---|---|---|---|")
    for region in regions:
        task = make_task("selective_copying", region=region)
        result = evaluate(model, task, 256, 64, config.block_size)
        bins = ", ".join(f"{b['low']}-{b['high']}: {b['accuracy']:.2f}" for b in result["bins"])
        print(f"| {region} | {task.seq_len} | {result['accuracy']:.3f} | {bins} |")


if __name__ == "__main__":
    main()
