"""Training-step time of the working tree against an older commit, interleaved in one process.

Both versions build the same preset and shape from the same seed and alternate one optimizer step
each, so machine load hits both alike; the medians and their ratio are printed. The old commit's
package is extracted with `git archive` and imported under another name.

    python lab/scripts/ab_step.py --old 1c37d17 --threads 1 --steps 80
    python lab/scripts/ab_step.py --old 1c37d17 --model slide --width 128
"""
from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch


def old_package(rev: str) -> str:
    """Extract src/blockstate of `rev` as an importable package named after the revision
    (`blockstate_<rev>`); returns its name."""
    name = "blockstate_" + "".join(c for c in rev if c.isalnum())
    archive = subprocess.run(["git", "archive", rev, "src/blockstate"], check=True,
                             capture_output=True, cwd=Path(__file__).resolve().parents[2]).stdout
    target = Path(tempfile.mkdtemp(prefix="ab_step_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    (target / "src" / "blockstate").rename(target / name)
    sys.path.insert(0, str(target))
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="git revision to compare against")
    parser.add_argument("--model", default="bst-sh-s4")
    parser.add_argument("--width", type=int, default=64, help="a d_model of blockstate.budget.SHAPES")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each version")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    versions = {"old": old_package(args.old), "new": "blockstate"}
    from blockstate.budget import SHAPES

    shape = next(s for s in SHAPES if s.d_model == args.width)
    tokens = torch.randint(0, 259, (shape.batch_size, shape.seq_len + 1))
    runs = {}
    for name, package in versions.items():
        registry = importlib.import_module(f"{package}.registry")
        torch.manual_seed(0)
        model = registry.build_model(args.model, vocab_size=259, **shape.overrides(args.model))
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True))

    def step(model, optimizer) -> None:
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for model, optimizer in runs.values():
        for _ in range(5):
            step(model, optimizer)
    times = {name: [] for name in runs}
    for i in range(args.steps):
        order = list(runs) if i % 2 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            step(*runs[name])
            times[name].append(time.perf_counter() - start)
    tokens_per_step = shape.batch_size * shape.seq_len
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name} ({args.old if name == 'old' else 'working tree'}): {median * 1e3:.2f} ms/step, "
              f"{tokens_per_step / median:,.0f} tokens/s")
    ratio = statistics.median(times["old"]) / statistics.median(times["new"])
    print(f"{args.model} width {args.width}, {args.threads} thread(s): old / new = {ratio:.3f}")


if __name__ == "__main__":
    main()
