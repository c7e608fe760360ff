"""BST on the MQAR task of lab/logs/long_range.md, 8e (4 pairs, queried 4 blocks of 16 or
more later), trained by the task suite's own `train_run` for a short schedule, with model
settings as `blockstate tasks run --set` (parsed by its `parse_override`).

The probes are model variants registered here through the public component registry
(`blockstate.components.register`), not options of the library:
--diagonal: SH's cross-attention sees only the context state at the query's own position (the
mask cut to the diagonal; context kind "probe-sh-diagonal"), a probe of whether reading the SSM
outputs through a softmax over the block's positions is what slows the task.
--no-self-attention: the BST layers' block self-attention outputs zeros, so the cross-attention to
the context states is the only attention (arch kind "probe-bst-no-self-attention").
--unit-context: SH's lift and key/value projection initialized at unit scale (std 1/sqrt(fan-in))
instead of init_std (context kind "probe-sh-unit").
--direct-read (SH): each layer also adds a linear read of its context outputs into the residual
stream; this probe became the library's `context.direct`, which it now sets.
--pairs and --seq-len change the task (default 4 pairs, length 96; the gap stays 64).
--init-from CHECKPOINT starts the model from another run's weights (a curriculum: e.g. a run
trained on 8 pairs, then trained here on 16); the optimizer, schedule and batches start afresh.
--out writes the run's record as JSON; --checkpoints DIR saves the run there every
--checkpoint-every steps (default 500), and a run started again with the same arguments continues
from the last one.

    python lab/scripts/mqar_bst_probe.py --steps 3000 --set ssm.width_divisor=1 \
        --set ssm.state_size=16 --set ssm.chunk_size=16 [--diagonal]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from blockstate.cli import parse_override
from blockstate.components import register
from blockstate.layers.bst import BSTArch, BSTLayer, SHContext, SHOptions
from blockstate.tasks.runner import Run, Settings, train_run


class DiagonalSHContext(SHContext):
    def mask(self, w: int, device: torch.device) -> torch.Tensor:
        return torch.eye(w, dtype=torch.bool, device=device)


class UnitSHContext(SHContext):
    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.lift.weight, std=1 / math.sqrt(self.lift.in_features))
        torch.nn.init.normal_(self.kv.weight, std=1 / math.sqrt(self.kv.in_features))


class _Silent(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return h.new_zeros(*h.shape[:2], self.width)


class NoSelfAttentionBSTLayer(BSTLayer):
    def __init__(self, config):
        super().__init__(config)
        self.self_attn = _Silent(self.n_heads * self.head_dim)


@register("context", "probe-sh-diagonal")
@dataclass
class DiagonalOptions(SHOptions):
    module: ClassVar[type] = DiagonalSHContext


@register("context", "probe-sh-unit")
@dataclass
class UnitOptions(SHOptions):
    module: ClassVar[type] = UnitSHContext


@register("arch", "probe-bst-no-self-attention")
@dataclass
class NoSelfAttentionArch(BSTArch):
    layer: ClassVar[type] = NoSelfAttentionBSTLayer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bst-sh-ssd")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diagonal", action="store_true")
    parser.add_argument("--no-self-attention", action="store_true")
    parser.add_argument("--pairs", type=int, default=4, help="key-value pairs")
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--direct-read", action="store_true")
    parser.add_argument("--unit-context", action="store_true")
    parser.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                        help="a run or step directory whose weights the model starts from")
    parser.add_argument("--out")
    parser.add_argument("--checkpoints", type=Path, help="directory: save and resume the run")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.diagonal + args.unit_context > 1:
        parser.error("--diagonal and --unit-context are context kinds of their own: choose one")
    probes = dict(parse_override(s) for s in args.set)
    if args.diagonal:
        probes["context.kind"] = "probe-sh-diagonal"
    if args.unit_context:
        probes["context.kind"] = "probe-sh-unit"
    if args.no_self_attention:
        probes["arch"] = "probe-bst-no-self-attention"
    if args.direct_read:
        probes["context.direct"] = True
    overrides = tuple(sorted(probes.items()))
    task = (("gap", 64), ("num_pairs", args.pairs), ("seq_len", args.seq_len))
    run = Run("mqar", task, args.model, args.seed, overrides)
    record = train_run(run, Settings(steps=args.steps, batch_size=64, lr=args.lr,
                                     eval_sequences=256), log=print,
                       checkpoints=args.checkpoints, checkpoint_every=args.checkpoint_every,
                       init_from=args.init_from)
    losses = dict(map(tuple, record["losses"]))
    for high in range(500, args.steps + 1, 500):
        window = [loss for step, loss in losses.items() if high - 500 <= step < high]
        print(f"steps {high - 500}-{high}: {statistics.mean(window):.3f}")
    print(f"diagonal={args.diagonal} no_self_attention={args.no_self_attention} {args.model} "
          f"{args.set}: accuracy {record['evaluations'][0]['accuracy']:.3f}, "
          f"parameters {record['parameters']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": {k: str(v) if isinstance(v, Path) else v
                                for k, v in vars(args).items()}, **record}, f)


if __name__ == "__main__":
    main()
