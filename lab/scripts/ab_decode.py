"""Decoding-step time of the working tree against older commits, interleaved in one process.

Each decoder is a preset at one context length, prefilled with the same random prompt, then
decoding greedily one token at a time; all decoders take turns, a few steps each, over several
rounds, so that load on the machine hits them alike. Decoders:

- `step`: the working tree's one-token step (`prefill`, then `step`);
- `step@REV`: the one-token step of commit REV;
- `recompute@REV`: the block-recompute path of commit REV (`generate.start` / `generate.feed`,
  which recompute the current block's positions for every new token; last present at 527bd9c).

Older packages are extracted with `git archive` and imported under other names
(`ab_step.old_package`). Prints the
median ms per token of each decoder and each one's ratio to the working tree's step of the same
model, and to the working tree's `slide` step when --reference slide is given; writes JSON with
--out.

    python lab/scripts/ab_decode.py --models bst-sh-s4 --reference slide --context 4096 \\
        --old step@419b979 recompute@527bd9c --threads 1
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from ab_step import old_package  # this directory is on sys.path when the script runs


class Step:
    """Greedy one-token steps through an inference cache."""

    def __init__(self, package: str, model_name: str, size: str, prompt: torch.Tensor):
        torch.manual_seed(0)
        self.model = importlib.import_module(f"{package}.registry").build_model(
            model_name, size, vocab_size=256).eval()
        self.cache = self.model.allocate_inference_cache(prompt.shape[0])
        self.tokens = self.model.prefill(prompt, self.cache)[:, -1].argmax(-1)

    def __call__(self) -> int:
        self.tokens = self.model.step(self.tokens, self.cache).argmax(-1)
        return int(self.tokens[0])


class Recompute:
    """Greedy steps of the block-recompute path of an old commit."""

    def __init__(self, package: str, model_name: str, size: str, prompt: torch.Tensor):
        torch.manual_seed(0)
        self.model = importlib.import_module(f"{package}.registry").build_model(
            model_name, size, vocab_size=256).eval()
        generate = importlib.import_module(f"{package}.generate")
        self.feed, self.state = generate.feed, generate.start(self.model, prompt.shape[0])
        with torch.no_grad():
            self.tokens = self.feed(self.model, self.state, prompt)[:, -1].argmax(-1, keepdim=True)

    def __call__(self) -> int:
        with torch.no_grad():
            self.tokens = self.feed(self.model, self.state, self.tokens)[:, -1].argmax(
                -1, keepdim=True)
        return int(self.tokens[0, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bst-sh-s4"])
    parser.add_argument("--reference", default=None, help="a model whose working-tree step every "
                        "decoder is also compared with (e.g. slide)")
    parser.add_argument("--old", nargs="*", default=[], help="step@REV or recompute@REV decoders")
    parser.add_argument("--size", default="small")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16, help="steps per decoder per round")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    packages = {"": "blockstate"}
    for spec in args.old:
        kind, _, rev = spec.partition("@")
        if kind not in ("step", "recompute") or not rev:
            parser.error(f"--old takes step@REV or recompute@REV, got {spec!r}")
        packages.setdefault(rev, old_package(rev))
    prompt = torch.randint(0, 256, (1, args.context), generator=torch.Generator().manual_seed(0))
    decoders = {}
    models = args.models + ([args.reference] if args.reference not in (None, *args.models) else [])
    for model in models:
        decoders[model, "step"] = Step("blockstate", model, args.size, prompt)
        if model == args.reference and model not in args.models:
            continue
        for spec in args.old:
            kind, _, rev = spec.partition("@")
            cls = Step if kind == "step" else Recompute
            decoders[model, spec] = cls(packages[rev], model, args.size, prompt)
    times = {key: [] for key in decoders}
    tokens = {key: [] for key in decoders}
    for key, decoder in decoders.items():  # warm-up
        for _ in range(4):
            tokens[key].append(decoder())
    for r in range(args.rounds):
        order = list(decoders) if r % 2 == 0 else list(reversed(decoders))
        for key in order:
            for _ in range(args.steps):
                start = time.perf_counter()
                tokens[key].append(decoders[key]())
                times[key].append(time.perf_counter() - start)
    results = []
    for (model, kind), values in times.items():
        median = statistics.median(values)
        row = {"model": model, "decoder": kind, "median_ms": median * 1e3, "steps": len(values),
               "vs_step": median / statistics.median(times[model, "step"]),
               "same_tokens_as_step": tokens[model, kind] == tokens[model, "step"]}
        if args.reference:
            row["vs_reference_step"] = median / statistics.median(times[args.reference, "step"])
        results.append(row)
        ref = f", {row['vs_reference_step']:.2f}x {args.reference}'s step" if args.reference else ""
        print(f"{model:18s} {kind:22s} {median * 1e3:7.2f} ms/token  {row['vs_step']:.2f}x the "
              f"working tree's step{ref}{'' if row['same_tokens_as_step'] else '  (other tokens)'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "threads": args.threads,
            "context": args.context, "size": args.size, "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg(),
            "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
