"""Which key positions a trained passkey model fails at its training length: whole-passkey accuracy
at every key position from 0 to the last one (right before the question), on the passkey task's
own held-out digits, for a model `blockstate tasks run --keep-models DIR` saved (it loads with the
skip thresholds it trained with, if any).

The task's depth grid samples 5 key positions; this sweeps all of them, to tell a failure at an
edge of the sequence from one spread over a range of depths.

    OMP_NUM_THREADS=1 .venv/bin/python lab/scripts/passkey_key_positions.py \
        runs/task-models/passkey-seq_len256/bst-recommended-seed0 \
        --out lab/runs/passkey_length/key-positions-stage-seed0.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from blockstate.loading import load_model
from blockstate.tasks import make_task
from blockstate.tasks.generators import IGNORE
from blockstate.tasks.runner import EVAL_SEED


@torch.no_grad()
def sweep(model: torch.nn.Module, seq_len: int, sequences: int) -> list[float]:
    """Whole-passkey accuracy for each key position (index = position)."""
    accuracies = []
    task = make_task("passkey", seq_len=seq_len, depth=0)
    batch = task.sample(sequences, EVAL_SEED)  # its digits; the key is moved below
    digits = batch.targets[:, seq_len - task.digits:]                              # (B, n)
    for position in range(task.key_positions):
        inputs = (12 + torch.arange(seq_len) % task.FILLER).expand(sequences, -1).clone()
        inputs[:, position] = task.KEY
        inputs[:, position + 1:position + 1 + task.digits] = digits
        inputs[:, seq_len - task.digits] = task.QUESTION
        inputs[:, seq_len - task.digits + 1:] = digits[:, :-1]
        predictions = model(inputs).argmax(-1)
        right = (predictions == batch.targets) | (batch.targets == IGNORE)
        accuracies.append(float(right.all(1).float().mean()))
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a kept model's checkpoint directory")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--below", type=float, default=0.9, help="list positions scoring below")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, checkpoint = load_model(args.model, max_seq_len=args.seq_len)
    accuracies = sweep(model, args.seq_len, args.sequences)
    failing = {position: round(a, 3) for position, a in enumerate(accuracies) if a < args.below}
    result = {"model": args.model, "seq_len": args.seq_len, "sequences": args.sequences,
              "skipping": bool(checkpoint.train_state.get("skip_below")),
              "accuracy_by_key_position": accuracies, f"below_{args.below:g}": failing}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.model}: {len(failing)} of {len(accuracies)} key positions below {args.below}: "
          f"{failing}")


if __name__ == "__main__":
    main()
