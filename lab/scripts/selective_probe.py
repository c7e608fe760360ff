"""Two measurements behind lab/logs/long_range.md, section 8, that need no training.

1. The bag-of-symbols ceiling of selective copying: a model that knows which symbols occurred but
   not their order can do no better, at every answer position, than the most frequent symbol of
   the bag (each order of the bag is equally likely), so its expected accuracy is
   E[largest count] / length.
2. How strongly, at initialization, tokens beyond the window reach the context states of the
   first BST layer: the SSM's output without its skip term against the skip term, and the relative
   change of the outputs at the answer positions when every symbol at least 16 positions before
   the delimiter is replaced by another (the blanks, the delimiter and nearer symbols unchanged).
   Averaged over 3 initialization seeds; batch of 256 task sequences (seed 0).
3. Whether that distant part differs from one answer position to the next: the cosine between the
   changes of 2. at consecutive answer positions, and between the first and the last answer
   position (each flattened over channels and width), mean over sequences (and positions). The
   inputs at the answer positions are all the same blank, so only how the state evolves between
   them can tell the cross-attention which symbol to return at each; a cosine near 1 means the
   context states offer the same readout of the distant symbols at every answer position.

    .venv/bin/python lab/scripts/selective_probe.py
"""

from __future__ import annotations

import torch

from blockstate import build_model
from blockstate.tasks import make_task

SETTINGS = [  # (label, preset, overrides)
    ("bst-sh-s4", "bst-sh-s4", {}),
    ("bst-sh-s4d", "bst-sh-s4d", {}),
    ("bst-sh-s4d, S4D-Real, N = 16", "bst-sh-s4d", {"s4d_init": "real", "ssm_state_size": 16}),
    ("bst-sh-ssd", "bst-sh-ssd", {}),
    ("bst-sh-ssd, ssd_heads=16", "bst-sh-ssd", {"ssd_heads": 16}),
    ("bst-sh-ssd, ssd_decay=state", "bst-sh-ssd", {"ssd_decay": "state"}),
    ("bst-sh-ssd, ssd_bc_norm=true", "bst-sh-ssd", {"ssd_bc_norm": True}),
    ("bst-sh-ssd, ssd_decay=complex", "bst-sh-ssd", {"ssd_decay": "complex"}),
]


def bag_ceiling(task, samples: int = 200_000) -> float:
    generator = torch.Generator().manual_seed(0)
    symbols = torch.randint(0, task.num_symbols, (samples, task.length), generator=generator)
    counts = torch.nn.functional.one_hot(symbols, task.num_symbols).sum(1)
    return counts.max(1).values.float().mean().item() / task.length


def _ssm_outputs(model, tokens: torch.Tensor) -> torch.Tensor:
    """The first BST layer's SSM outputs for `tokens` (its context states before their maps)."""
    layer = model.layers[0]
    return layer.context.ssm(layer.context.down(layer.attn_norm(model.embedding(tokens))))


@torch.no_grad()
def reach(task, preset: str, overrides: dict, seeds=(0, 1, 2)) -> tuple[float, ...]:
    inputs = task.sample(256, 0).inputs
    answers = slice(task.region, task.seq_len)
    far = inputs < task.num_symbols
    far[:, task.region - 16:] = False
    changed = inputs.clone()
    generator = torch.Generator().manual_seed(1)
    shift = torch.randint(1, task.num_symbols, (int(far.sum()),), generator=generator)
    changed[far] = (inputs[far] + shift) % task.num_symbols
    ratios, sensitivities, cosines, spans = [], [], [], []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(preset, "tiny", vocab_size=task.vocab_size, **overrides).eval()
        ssm = model.layers[0].context.ssm

        y = _ssm_outputs(model, inputs)
        skip = ssm.D.clone()
        ssm.D.zero_()
        state_part = _ssm_outputs(model, inputs)
        ssm.D.copy_(skip)
        ratios.append((state_part.norm() / (y - state_part).norm()).item())
        y_changed = _ssm_outputs(model, changed)
        sensitivities.append(((y_changed - y)[:, answers].norm() / y[:, answers].norm()).item())
        distant = (y_changed - y)[:, answers].flatten(2)                # (B, answers, C * P)
        cosine = torch.nn.functional.cosine_similarity
        cosines.append(cosine(distant[:, 1:], distant[:, :-1], dim=-1).mean().item())
        spans.append(cosine(distant[:, -1], distant[:, 0], dim=-1).mean().item())
    return tuple(sum(v) / len(v) for v in (ratios, sensitivities, cosines, spans))


def main() -> None:
    torch.set_num_threads(1)
    task = make_task("selective_copying", region=64)
    print(f"bag-of-symbols ceiling ({task.length} symbols of {task.num_symbols}): "
          f"{bag_ceiling(task):.3f}\n")
    print("| model | state / skip at init | answer outputs' change from symbols >= 16 back | "
          "its cosine between consecutive answer positions | between the first and the last |")
    print("|---|---|---|---|---|")
    for label, preset, overrides in SETTINGS:
        ratio, sensitivity, cosine, span = reach(task, preset, overrides)
        print(f"| {label} | {ratio:.3f} | {sensitivity:.4f} | {cosine:.3f} | {span:.3f} |")


if __name__ == "__main__":
    main()
