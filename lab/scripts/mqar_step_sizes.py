"""How far a selective BST's state turns and decays between the pairs and the queries of MQAR: for
each layer and head of a checkpoint (`ssm_kernel="ssd"`; its first SSM channel, the only one in
SH), the sum of the input-chosen step sizes dt over the pair region and over the 64 positions
after it (medians over held-out sequences), the head's decay rate a (the state shrinks by
exp(-a * sum dt)) and, for the rotating kinds ("complex", "rotary"), how many of the head's modes
turn by less than one radian over those 64 positions (mode m turns by omega_m * sum dt). A key
written in the pairs and read at a query is matched through C_t . B_s; a mode that has turned by
a sequence-dependent angle no longer matches.

    python lab/scripts/mqar_step_sizes.py runs/ck/NAME [more checkpoints] [--pairs 8 --seq-len 96]
"""

from __future__ import annotations

import argparse
import json

import torch

from blockstate.loading import load_model
from blockstate.ssm.selective import SelectiveSSM
from blockstate.tasks.generators import make_task
from blockstate.tasks.runner import EVAL_SEED


@torch.no_grad()
def step_sizes(model, task, sequences: int = 64) -> list[dict]:
    """Per layer: dt summed over the pairs and over the next 64 positions (median per head), a,
    and for rotating kinds the count of modes per head turning by < 1 rad over those positions."""
    batch = task.sample(sequences, EVAL_SEED)
    inputs = {}
    hooks = [layer.context.ssm.register_forward_pre_hook(
        lambda module, args, i=i: inputs.__setitem__(i, (module, args[0])))
        for i, layer in enumerate(model.layers)]
    try:
        model(batch.inputs)
    finally:
        for hook in hooks:
            hook.remove()
    pairs = 2 * task.num_pairs
    rows = []
    for i, (ssm, u) in sorted(inputs.items()):
        if not isinstance(ssm, SelectiveSSM):
            raise SystemExit(f"layer {i} does not use the selective kernel (ssm_kernel='ssd')")
        _, _, dt, _, _ = ssm._inputs(u.float())                                   # (B, L, K, G)
        dt = dt[:, :, 0]                                                          # (B, L, G)
        over_pairs = dt[:, :pairs].sum(1).median(0).values                        # (G,)
        after = dt[:, pairs:pairs + 64].sum(1).median(0).values                   # (G,)
        kernel = ssm.kernel
        a = torch.exp(kernel.log_a[0])                                            # (G,) or (G, N)
        row = {"layer": i, "dt_sum_pairs": [round(v, 4) for v in over_pairs.tolist()],
               "dt_sum_next_64": [round(v, 4) for v in after.tolist()],
               "decay_rate": [round(v, 3) for v in (a if a.dim() == 1 else a.mean(-1)).tolist()]}
        if kernel.a_imag is not None:
            turn = kernel.a_imag[0].abs() * after.unsqueeze(-1)                   # (G, N/2) radians
            row["modes"] = kernel.a_imag.shape[-1]
            row["modes_turning_under_1_rad"] = (turn < 1).sum(-1).tolist()
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="run or step directories")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--out", help="write the rows of every checkpoint as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = make_task("mqar", gap=64, num_pairs=args.pairs, seq_len=args.seq_len)
    records = []
    for path in args.checkpoints:
        model, checkpoint = load_model(path)
        rows = step_sizes(model, task)
        print(f"{checkpoint.path} (step {checkpoint.step}), {args.pairs} pairs:")
        for row in rows:
            print(f"  layer {row['layer']}: sum dt over the pairs  {row['dt_sum_pairs']}")
            print(f"           sum dt over the next 64 {row['dt_sum_next_64']}")
            print(f"           decay rate a            {row['decay_rate']}")
            if "modes" in row:
                turning = row["modes_turning_under_1_rad"]
                print(f"           of {row['modes']} modes, turning < 1 rad: {turning}")
        records.append({"checkpoint": str(checkpoint.path), "step": checkpoint.step,
                        "pairs": args.pairs, "seq_len": args.seq_len, "layers": rows})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
