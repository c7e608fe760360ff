"""`blockstate bench layers` of the working tree against an older commit, interleaved: the two
versions run one after the other (alternating which goes first), `--rounds` times, so that
machine load hits both alike; the median forward and forward+backward times per layer and length
and their ratios (new / old) are printed and written as JSON. The old commit's `src/` is extracted
with `git archive`.

    python lab/scripts/ab_bench_layers.py --old 61562cc --rounds 3 --threads 1 \\
        --layers bst-sh-s4,bst-mf-s4,bst-sh-ssd,slide,brt,gss --widths 256:4 --lengths 1024,2048 \\
        --out lab/benchmarks/ab_layers_components.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def extract(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev, "src"], check=True, capture_output=True,
                             cwd=ROOT).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def bench(src: Path, args: argparse.Namespace, out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run([sys.executable, "-m", "blockstate", "bench", "layers", "--threads",
                    str(args.threads), "--layers", args.layers, "--widths", args.widths,
                    "--lengths", args.lengths, "--repeats", str(args.repeats), "--out", str(out)],
                   check=True, env=env, capture_output=True, cwd=src.parent)
    return json.loads(out.with_suffix(".json").read_text())["results"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="commit to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", default="bst-sh-s4,bst-mf-s4,bst-sh-ssd,slide,brt,gss")
    parser.add_argument("--widths", default="256:4")
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    times: dict[tuple, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        old_src = extract(args.old, Path(tmp) / "old")
        for round_ in range(args.rounds):
            order = (("old", old_src), ("new", ROOT / "src"))
            for version, src in order if round_ % 2 == 0 else order[::-1]:  # neither always first
                for row in bench(src, args, Path(tmp) / f"{version}-{round_}"):
                    key = (row["layer"], row["width"], row["length"])
                    for metric in ("forward", "forward_backward"):
                        if row.get(metric):
                            times.setdefault(key, {}).setdefault(f"{version}_{metric}", []).append(
                                row[metric]["seconds"])
                print(f"round {round_ + 1}/{args.rounds}: {version} done", flush=True)
    rows = []
    print(f"{'layer':<12} {'width':>5} {'length':>6} {'fwd new/old':>11} {'fwd+bwd new/old':>15}")
    for (layer, width, length), found in sorted(times.items()):
        med = {k: statistics.median(v) for k, v in found.items()}
        ratios = {m: med[f"new_{m}"] / med[f"old_{m}"] for m in ("forward", "forward_backward")
                  if f"new_{m}" in med and f"old_{m}" in med}
        rows.append({"layer": layer, "width": width, "length": length, "medians": med,
                     "ratios_new_over_old": ratios})
        print(f"{layer:<12} {width:>5} {length:>6} {ratios.get('forward', float('nan')):>11.3f} "
              f"{ratios.get('forward_backward', float('nan')):>15.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"old": args.old, "args": vars(args), "rows": rows},
                                             indent=1) + "\n")


if __name__ == "__main__":
    main()
