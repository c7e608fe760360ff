"""Command-line interface: `blockstate models` and `blockstate demo`."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from . import __version__
from .registry import SIZES, build_model, list_models, model_config


def _count(name: str, size: str) -> int:
    with torch.device("meta"):
        return build_model(name, size).num_parameters()


def cmd_models(args: argparse.Namespace) -> int:
    sizes = args.sizes.split(",") if args.sizes else list(SIZES)
    rows = [[name] + [f"{_count(name, s) / 1e6:.2f}M" for s in sizes] for name in list_models()]
    header = ["model"] + sizes
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a model, run forward+backward on random tokens, report parameters and throughput."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = model_config(args.model, args.size)
    length = args.length or config.max_seq_len
    model = build_model(args.model, args.size)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, config.vocab_size, (args.batch, length + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            losses.append(loss.item())
    median = statistics.median(times)
    report = {
        "model": args.model, "size": args.size, "parameters": model.num_parameters(),
        "batch": args.batch, "length": length, "steps": args.steps,
        "median_step_s": median, "tokens_per_s": args.batch * length / median,
        "loss_first": losses[0], "loss_last": losses[-1], "threads": torch.get_num_threads(),
        "torch": torch.__version__, "blockstate": __version__,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"model {args.model} ({args.size}): {report['parameters']:,} parameters, "
              f"bst_layers={list(config.resolved_bst_layers)} of {config.n_layers}")
        print(f"forward+backward+AdamW on batch {args.batch} x {length} tokens, "
              f"{torch.get_num_threads()} threads: median {median * 1e3:.0f} ms/step over "
              f"{args.steps} steps = {report['tokens_per_s']:,.0f} tokens/s")
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (random tokens)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockstate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"blockstate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list model presets and their parameter counts")
    p.add_argument("--sizes", default=None, help="comma-separated sizes (default: all)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="forward/backward throughput of a model on random tokens")
    p.add_argument("--model", default="bst-sh-s4", choices=list_models())
    p.add_argument("--size", default="small", choices=list(SIZES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=None, help="default: the size's max_seq_len")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch", "steps"):
        if getattr(args, name, 1) < 1:
            print(f"blockstate: error: --{name} must be >= 1", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except ValueError as e:
        print(f"blockstate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
