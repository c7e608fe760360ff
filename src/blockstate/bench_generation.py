"""Generation benchmark: per-token decoding time and inference-state memory against context length.

    python -m blockstate.bench_generation --size small --lengths 1024,4096,16384,65536 \\
        --out docs/benchmarks/generation.json --plot docs/benchmarks/generation.png

For every model and context length C: prefill a random prompt of C tokens (block by block), then
decode `--new-tokens` tokens one at a time. Reported: median seconds per decoded token, prefill
tokens/s, and the bytes held by the inference state after the prefill (all cached tensors: keys and
values, SSM states, histories), which is the memory that can grow with the context.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .generate import feed, start
from .registry import build_model

MODELS = ("bst-sh-s4", "bst-mf-s4", "bst-sh-unstruct", "transformer", "slide", "brt")


def state_bytes(obj) -> int:
    """Bytes of every tensor reachable from a cache (dicts, lists, block operators)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(state_bytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(state_bytes(v) for v in vars(obj).values())
    return 0


@torch.no_grad()
def measure(name: str, size: str, context: int, new_tokens: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    # The unstructured kernel refuses to generate past its training length; for timing only,
    # define it up to the longest context measured.
    overrides = {"max_seq_len": max(context + new_tokens, 1024)} if "unstruct" in name else {}
    model = build_model(name, size, vocab_size=256, **overrides).eval()
    prompt = torch.randint(0, 256, (1, context))
    state = start(model, 1)
    t0 = time.perf_counter()
    logits = feed(model, state, prompt)[:, -1]
    prefill_s = time.perf_counter() - t0
    memory = state_bytes(state.caches)
    times = []
    for _ in range(new_tokens):
        token = logits.argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        logits = feed(model, state, token)[:, -1]
        times.append(time.perf_counter() - t0)
    return {"model": name, "size": size, "context": context, "prefill_s": prefill_s,
            "prefill_tokens_per_s": context / prefill_s, "median_token_s": statistics.median(times),
            "tokens_per_s": 1 / statistics.median(times), "state_bytes": memory,
            "parameters": model.num_parameters()}


def plot(results: list[dict], path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == name]
        ax_t.plot([r["context"] for r in rows], [r["median_token_s"] * 1e3 for r in rows], "o-", label=name)
        ax_m.plot([r["context"] for r in rows], [r["state_bytes"] / 2**20 for r in rows], "o-", label=name)
    for ax, label in ((ax_t, "ms per generated token"), (ax_m, "inference state (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(path: str | Path, results: list[dict], argv: list[str] | None) -> None:
    report = {"results": results, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "command": " ".join(["python -m blockstate.bench_generation"]
                                  + (argv if argv is not None else sys.argv[1:]))}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", default="small")
    parser.add_argument("--lengths", default="1024,4096,16384,65536")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-context-full-attention", type=int, default=16384,
                        help="skip longer contexts for the quadratic transformer")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--plot", default=None, help="PNG file (needs matplotlib)")
    args = parser.parse_args(argv)
    results = []
    print("| model | context | ms/token | tokens/s | prefill tok/s | state MiB |\n|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for context in (int(x) for x in args.lengths.split(",")):
            if name == "transformer" and context > args.max_context_full_attention:
                continue
            r = measure(name, args.size, context, args.new_tokens)
            results.append(r)
            print(f"| {name} | {context} | {r['median_token_s'] * 1e3:.1f} | {r['tokens_per_s']:.1f} | "
                  f"{r['prefill_tokens_per_s']:.0f} | {r['state_bytes'] / 2**20:.2f} |", flush=True)
            if args.out:  # after every measurement, so an interrupted run keeps what it measured
                write_report(args.out, results, argv)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
