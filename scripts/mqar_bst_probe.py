"""BST on the MQAR task of docs/results/long_range.md, 8e (4 pairs, queried 4 blocks of 16 or
more later), trained by the task suite's own `train_run` for a short schedule, with model
settings as `blockstate tasks run --set`. With --diagonal, SH's cross-attention sees only the
context state at the query's own position (the mask cut to the diagonal): a probe of whether
reading the SSM outputs through a softmax over the block's positions is what slows the task.
With --no-self-attention, the layers' block self-attention outputs zeros (the cross-attention to
the context states is then the only attention). --out writes the run's record as JSON.

    python scripts/mqar_bst_probe.py --steps 3000 --set ssm_width_divisor=1 --set ssm_state_size=16 \\
        --set ssm_chunk_size=16 [--diagonal]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from blockstate.layers import bst
from blockstate.tasks.runner import Run, Settings, train_run


def _diagonal(self, w: int, device: torch.device) -> torch.Tensor:
    return torch.eye(w, dtype=torch.bool, device=device)


def _silent(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return h.new_zeros(*h.shape[:2], self.n_heads * self.head_dim)


def _value(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bst-sh-ssd")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diagonal", action="store_true")
    parser.add_argument("--no-self-attention", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.diagonal:  # a probe, not a model option: every SH/MH layer of this process
        bst._PositionContext.mask = _diagonal
    if args.no_self_attention:
        bst.BlockSelfAttention.forward = _silent
    overrides = tuple(sorted((k, _value(v)) for k, v in (s.split("=", 1) for s in args.set)))
    run = Run("mqar", (("gap", 64), ("num_pairs", 4), ("seq_len", 96)), args.model, args.seed,
              overrides)
    record = train_run(run, Settings(steps=args.steps, batch_size=64, lr=args.lr,
                                     eval_sequences=256), log=print)
    losses = dict(map(tuple, record["losses"]))
    for high in range(500, args.steps + 1, 500):
        window = [loss for step, loss in losses.items() if high - 500 <= step < high]
        print(f"steps {high - 500}-{high}: {statistics.mean(window):.3f}")
    print(f"diagonal={args.diagonal} no_self_attention={args.no_self_attention} {args.model} "
          f"{args.set}: accuracy {record['evaluations'][0]['accuracy']:.3f}, "
          f"parameters {record['parameters']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), **record}, f)


if __name__ == "__main__":
    main()
