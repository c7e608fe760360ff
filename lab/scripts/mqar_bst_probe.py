"""BST on the MQAR task of lab/logs/long_range.md, 8e (4 pairs, queried 4 blocks of 16 or
more later), trained by the task suite's own `train_run` for a short schedule, with model
settings as `blockstate tasks run --set` (parsed by its `parse_override`). With --diagonal, SH's
cross-attention sees only the context state at the query's own position (the mask cut to the
diagonal): a probe of whether
reading the SSM outputs through a softmax over the block's positions is what slows the task.
With --no-self-attention, the layers' block self-attention outputs zeros (the cross-attention to
the context states is then the only attention). --direct-read (SH) adds to each layer a linear
read of its context outputs into the residual stream (width -> d_model, no bias, Normal(0,
init_std)), beside the cross-attention, as the SSM stack of lab/scripts/mqar_ssd_alone.py reads its
SSM; --unit-context initializes SH's lift and key/value projection at unit scale (std
1/sqrt(fan-in)) instead of init_std. Both are probes of this process, not model options.
--pairs and --seq-len change the task (default 4 pairs, length 96; the gap stays 64).
--init-from CHECKPOINT starts the model from another run's weights (a curriculum: e.g. a run
trained on 8 pairs, then trained here on 16); the optimizer, schedule and batches start afresh.
--out writes the run's record as JSON; --checkpoints DIR saves the run there every
--checkpoint-every steps (default 500), and a run started again with the same arguments continues
from the last one.

    python lab/scripts/mqar_bst_probe.py --steps 3000 --set ssm_width_divisor=1 --set ssm_state_size=16 \\
        --set ssm_chunk_size=16 [--diagonal]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from blockstate.checkpoint import load_checkpoint
from blockstate.cli import parse_override
from blockstate.config import ModelConfig
from blockstate.layers import bst
from blockstate.tasks import runner
from blockstate.tasks.runner import Run, Settings, train_run


def _diagonal(self, w: int, device: torch.device) -> torch.Tensor:
    return torch.eye(w, dtype=torch.bool, device=device)


def _silent(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return h.new_zeros(*h.shape[:2], self.n_heads * self.head_dim)


def _with_read(init):
    def __init__(self, config):
        init(self, config)
        self.probe_read = torch.nn.Linear(config.ssm_width, config.d_model, bias=False)
    return __init__


def _read_forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.attn_norm(x)
    k, v, _, outputs = self.context._forward(h)
    read = self.probe_read(outputs[:, :, 0])
    return self.tail(x + read, self.self_attn(h), self.cross_attention(h, k, v))


def _unit_context(self) -> None:
    torch.nn.init.normal_(self.lift.weight, std=1 / math.sqrt(self.lift.in_features))
    torch.nn.init.normal_(self.kv.weight, std=1 / math.sqrt(self.kv.in_features))


def _initialized(build, source: Path):
    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        checkpoint = load_checkpoint(source)
        ours, theirs = model.config.to_dict(), ModelConfig.from_dict(checkpoint.model_config).to_dict()
        differ = sorted(k for k in ours if k != "max_seq_len" and ours[k] != theirs[k])
        if differ:
            raise ValueError(f"{source} holds another model than this run builds (fields {differ})")
        checkpoint.load_model(model)  # strict: every weight present, of the same shape
        print(f"model initialized from {checkpoint.path} (step {checkpoint.step})")
        return model
    return build_model


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
    if args.diagonal:  # a probe, not a model option: every SH/MH layer of this process
        bst._PositionContext.mask = _diagonal
    if args.no_self_attention:
        bst.BlockSelfAttention.forward = _silent
    if args.direct_read:  # SH only: each layer also adds a linear read of its context outputs
        bst.BSTLayer.__init__ = _with_read(bst.BSTLayer.__init__)
        bst.BSTLayer.forward = _read_forward
    if args.unit_context:  # SH: lift and key/value projection at unit scale (std 1/sqrt(fan-in))
        bst.SHContext.reset_parameters = _unit_context
    if args.init_from:  # a probe, not a model option: the model is built, then given these weights
        runner.build_model = _initialized(runner.build_model, args.init_from)
    overrides = tuple(sorted(parse_override(s) for s in args.set))
    task = (("gap", 64), ("num_pairs", args.pairs), ("seq_len", args.seq_len))
    run = Run("mqar", task, args.model, args.seed, overrides)
    record = train_run(run, Settings(steps=args.steps, batch_size=64, lr=args.lr,
                                     eval_sequences=256), log=print,
                       checkpoints=args.checkpoints, checkpoint_every=args.checkpoint_every)
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
