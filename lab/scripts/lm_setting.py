"""Train and evaluate a `blockstate reproduce` run with one model setting changed.

`blockstate reproduce` runs the zoo and its fixed ablations; this runs one preset at a reproduction
scale with extra model overrides (e.g. `context_norm=rms`), as group `setting` of the same output
directory, so its `eval.json` sits beside the main runs' and compares with them on the same test
windows. Resumable like `reproduce` (a finished run is skipped, an unfinished one resumes).

    OMP_NUM_THREADS=1 python lab/scripts/lm_setting.py --model bst-mf-s4 --set context_norm=rms \
        --corpus books --seeds 0,1 --max-tokens 4800000 --out runs/long-range-lm
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from blockstate.cli import parse_override
from blockstate.reproduce import SCALES, Run, execute, matched_overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--scale", default="tiny", choices=sorted(SCALES))
    parser.add_argument("--corpus", default="books")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    scale = SCALES[args.scale]
    if args.max_tokens:
        scale = dataclasses.replace(scale, max_tokens=args.max_tokens)
    setting = dict(parse_override(item) for item in args.set)
    if not setting:
        parser.error("give at least one --set FIELD=VALUE (without one this is the main run)")
    label = args.model + "[" + ",".join(f"{k}={v}" for k, v in setting.items()) + "]"
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    for seed in (int(s) for s in args.seeds.split(",")):
        run = Run("setting", args.corpus, args.model, seed,
                  {**matched_overrides(args.model, scale), **setting}, label)
        execute(run, scale, args.out, device, print)


if __name__ == "__main__":
    main()
