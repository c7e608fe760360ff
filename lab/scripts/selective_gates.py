"""Does a trained selective kernel select? For checkpoints of `bst-sh-ssd` runs on selective copying
(region 64), the input-dependent step dt of every BST layer's selective SSM at the symbols, at the
blanks between them, at the delimiter and at the blanks after it (where the symbols are to be
replayed): the mean over heads and 256 task sequences, and the largest ratios of a single head. A
kernel that writes the symbols and holds them through the blanks takes large steps at the symbols
and small ones at the blanks (the mechanism behind Mamba's selective-copying result); equal steps
everywhere is the time-invariant behaviour.

    .venv/bin/python lab/scripts/selective_gates.py CHECKPOINT_OR_RUN_DIR [...]
"""

from __future__ import annotations

import sys

import torch

from blockstate.loading import load_model
from blockstate.tasks import make_task


@torch.no_grad()
def steps(path: str) -> list[dict[str, float]]:
    model, _ = load_model(path)
    config = model.config
    task = make_task("selective_copying", region=64)
    inputs = task.sample(256, 0).inputs
    captured: dict[int, torch.Tensor] = {}
    ssms = {i: model.layers[i].context.ssm for i in config.resolved_bst_layers}
    hooks = [ssm.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(i, args[0]))
             for i, ssm in ssms.items()]
    model(inputs)
    for h in hooks:
        h.remove()
    blank = task.num_symbols
    before, after = torch.zeros_like(inputs, dtype=torch.bool), torch.zeros_like(inputs, dtype=torch.bool)
    before[:, :task.region] = inputs[:, :task.region] == blank
    after[:, task.region + 1:] = True
    kinds = {"symbols": inputs < blank, "blanks before the delimiter": before,
             "delimiter": inputs == blank + 1, "blanks after it": after}
    rows = []
    for i, ssm in ssms.items():
        _, _, dt, _, _ = ssm._inputs(captured[i].float())           # (B, L, K, G)
        dt = dt[:, :inputs.shape[1]].flatten(-2)     # the model pads to whole blocks; (B, L, heads)
        per_head = {k: dt[m].mean(0) for k, m in kinds.items()}         # (heads,) each
        blanks = per_head["blanks before the delimiter"]
        rows.append({"layer": i, **{k: v.mean().item() for k, v in per_head.items()},
                     "most selective head": (per_head["symbols"] / blanks).max().item(),
                     "most answer-driven head": (per_head["blanks after it"] / blanks).max().item()})
    return rows


def main() -> None:
    for path in sys.argv[1:]:
        print(f"\n{path}\n")
        rows = steps(path)
        keys = [k for k in rows[0] if k != "layer" and not k.startswith("most")]
        print("| layer | " + " | ".join(f"dt at {k}" for k in keys) + " | largest symbols / blanks "
              "of a head | largest blanks after / before the delimiter of a head |")
        print("|---|" + "---|" * (len(keys) + 2))
        for r in rows:
            print(f"| {r['layer']} | " + " | ".join(f"{r[k]:.4f}" for k in keys)
                  + f" | {r['most selective head']:.1f} | {r['most answer-driven head']:.1f} |")


if __name__ == "__main__":
    main()
