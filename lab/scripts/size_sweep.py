"""The sweep behind `blockstate.budget`'s ladder (docs/benchmarks/README.md, "Sizing the main job").

    OMP_NUM_THREADS=1 .venv/bin/python lab/scripts/size_sweep.py NAME CORPUS [MINUTES [THREADS]]

trains candidate NAME (below) for MINUTES (default 5) with THREADS torch threads (default 1) into
runs/sweep18/CORPUS-NAME (CORPUS-NAME-Tt for THREADS=T > 1), then scores validation bits per
byte at the run's own length on the windows that tile ~150k tokens of length-256 windows (the
same bytes for every candidate), and writes that path + .json. The published sweep ran two
candidates at a time, one thread each, on the 2-core machine, then a few at 2 threads one at a
time. A finished candidate is skipped.
"""

import json
import os
import sys

import torch

from blockstate.evaluate import evaluate_checkpoint
from blockstate.train import TrainConfig, train


def candidate(model, width, block, seq_len, batch, lr, train=None, **extra):
    overrides = {"d_model": width, "n_layers": 4, "n_heads": 4, "block_size": block,
                 "max_seq_len": seq_len, **extra}
    if model == "bst-sh-s4":
        overrides.setdefault("bst_layers", [0])
    else:
        overrides["d_ff"] = 4 * width
    return {"model": model, "seq_len": seq_len, "batch_size": batch, "lr": lr,
            "min_lr_ratio": 0.1, "warmup_steps": 100, "beta2": 0.99, "model_overrides": overrides,
            **(train or {})}


CANDIDATES = {
    "nano": candidate("transformer", 128, 64, 64, 12, 1e-3),       # nanoGPT's CPU recipe
    "bst128": candidate("bst-sh-s4", 128, 64, 256, 12, 1e-3),
    "b128b4": candidate("bst-sh-s4", 128, 64, 256, 4, 1e-3),
    "b128b4lr2": candidate("bst-sh-s4", 128, 64, 256, 4, 2e-3),
    "b128b4lr3": candidate("bst-sh-s4", 128, 64, 256, 4, 3e-3),
    "b128b4lr5": candidate("bst-sh-s4", 128, 64, 256, 4, 5e-3),
    "b128slide": candidate("bst-sh-s4", 128, 64, 256, 4, 2e-3, self_attention="sliding"),
    "b192b4": candidate("bst-sh-s4", 192, 64, 256, 4, 1e-3),
    "b128w32b6": candidate("bst-sh-s4", 128, 32, 128, 6, 1e-3),
    "b128w32lr2": candidate("bst-sh-s4", 128, 32, 128, 6, 2e-3),
    "b128w32lr3": candidate("bst-sh-s4", 128, 32, 128, 6, 3e-3),
    "b96w32lr2": candidate("bst-sh-s4", 96, 32, 128, 6, 2e-3),
    "b96w32lr3": candidate("bst-sh-s4", 96, 32, 128, 6, 3e-3),
    "b64w32lr3": candidate("bst-sh-s4", 64, 32, 128, 6, 3e-3),
    "b48w32lr3": candidate("bst-sh-s4", 48, 32, 128, 6, 3e-3),
    # fourth session, at 2 threads: larger steps use the second thread better
    "b64b12": candidate("bst-sh-s4", 64, 32, 128, 12, 3e-3),
    "b64L256": candidate("bst-sh-s4", 64, 32, 256, 6, 3e-3),
    "b96b12": candidate("bst-sh-s4", 96, 32, 128, 12, 3e-3),
    "b128b12": candidate("bst-sh-s4", 128, 32, 128, 12, 2e-3),
    "b96b24": candidate("bst-sh-s4", 96, 32, 128, 24, 3e-3),
    "b96b12bpe1k": candidate("bst-sh-s4", 96, 32, 128, 12, 3e-3,
                             train={"tokenizer": "bpe", "vocab_size": 1024}),
    "b128b12bpe1k": candidate("bst-sh-s4", 128, 32, 128, 12, 2e-3,
                              train={"tokenizer": "bpe", "vocab_size": 1024}),
    "b64b12bpe1k": candidate("bst-sh-s4", 64, 32, 128, 12, 3e-3,
                             train={"tokenizer": "bpe", "vocab_size": 1024}),
}

if __name__ == "__main__":
    name, data = sys.argv[1], sys.argv[2]
    minutes = float(sys.argv[3]) if len(sys.argv) > 3 else 5
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    torch.set_num_threads(threads)
    out = f"runs/sweep18/{data}-{name}" + (f"-{threads}t" if threads > 1 else "")
    if os.path.exists(f"{out}.json"):
        sys.exit(0)
    config = TrainConfig(size="small", data=data, max_time=minutes * 60, eval_every=10**9,
                         save_every=10**9, eval_batches=4, sample_tokens=200, log_every=50,
                         **CANDIDATES[name])
    summary = train(config, out, overwrite=True, quiet=True)
    scores = evaluate_checkpoint(out, lengths=sorted({config.seq_len, 256}), split="validation",
                                 max_tokens=150_000)["lengths"][str(config.seq_len)]
    record = {"name": name, "data": data, "threads": threads, "steps": summary["step"],
              "tokens": summary["tokens"],
              "params": summary["parameters"], "val_bpb": scores["bits_per_byte"],
              "eval_tokens": scores["tokens"], "sample": summary["sample"]}
    with open(f"{out}.json", "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k != "sample"}))
