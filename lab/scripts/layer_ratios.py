"""Forward (or forward+backward) time of benchmark layers, interleaved: every round times each
layer once, so a slow spell of the shared machine hits all of them alike (`blockstate bench
layers` times one layer after another). Prints each layer's median and its ratio to the S4 layer
of the same variant (bst-sh-s4 for SH layers, bst-mf-s4 for MF ones), or to the layer named by
--against, and writes them as JSON with --out. A layer name may end in "+FIELD=VALUE" settings
(ModelConfig fields, as `--set` of the CLI), each applied to that layer only: the ratio of
"bst-sh-ssd+context.direct=true" is then still taken to bst-sh-s4.

    python lab/scripts/layer_ratios.py --length 8192 --threads 2 --rounds 5 \
        --layers bst-sh-s4,bst-sh-ssd-rotary,bst-mf-s4,bst-mf-ssd-rotary
    python lab/scripts/layer_ratios.py --backward --against bst-sh-s4 --layers bst-sh-s4,brt,slide
    python lab/scripts/layer_ratios.py --against bst-sh-ssd \
        --layers bst-sh-s4,bst-sh-ssd,bst-sh-ssd+context.direct=true
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from blockstate.bench import BENCH_LAYERS, layer_calls, layer_config, machine_info
from blockstate.cli import parse_override


def _calls(name: str, config, call: int):
    """The timed call of layer `name` ("LAYER" or "LAYER+FIELD=VALUE+..."), on the CPU."""
    base, *settings = name.split("+")
    layer_fields = BENCH_LAYERS[base][1]  # the settings apply on top of the layer's own kinds
    config = config.with_overrides(**layer_fields, **dict(parse_override(s) for s in settings))
    return layer_calls(base, config, 1, torch.device("cpu"), torch.float32)[call]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", default="bst-sh-s4,bst-sh-ssd-rotary,bst-mf-s4,bst-mf-ssd-rotary")
    parser.add_argument("--backward", action="store_true", help="time forward+backward")
    parser.add_argument("--against", help="the layer every ratio is taken to (default: the S4 "
                        "layer of each layer's variant)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.layers.split(",")
    config = layer_config(args.width, args.heads, args.length)
    device = torch.device("cpu")
    call = 3 if args.backward else 1  # layer_calls: (layer, forward, forward with grad, fwd+bwd)
    forwards = {name: _calls(name, config, call) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up
        forwards[name]()
    for _ in range(args.rounds):
        for name in names:
            start = time.perf_counter()
            forwards[name]()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name in names:
        variant = BENCH_LAYERS[name.split("+")[0]][1].get("context")  # BST layers only
        reference = args.against or (f"bst-{variant}-s4" if variant else None)
        ratio = medians[name] / medians[reference] if reference in medians else None
        rows.append({"layer": name, "median_ms": round(medians[name] * 1e3, 1),
                     "all_ms": [round(t * 1e3, 1) for t in times[name]], "reference": reference,
                     "ratio": None if ratio is None else round(ratio, 3)})
        print(f"{name:32s} {medians[name] * 1e3:8.0f} ms" + ("" if ratio is None else
                                                            f"  {ratio:.2f}x {reference}"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": "python lab/scripts/layer_ratios.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items() if k != "out" and v is not None and v is not False)
            + f" --out {args.out}", "machine": machine_info(device), "length": args.length,
            "timed": "forward+backward" if args.backward else "forward",
            "width": args.width, "threads": args.threads, "rounds": args.rounds, "rows": rows},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
