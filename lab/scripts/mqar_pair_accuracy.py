"""Where an MQAR model's misses fall: accuracy by the pair's place in the list of pairs (the first
written is the oldest at query time) and by the query's place among the queries, for a checkpoint
saved by `lab/scripts/mqar_bst_probe.py --checkpoints` (or any task-suite MQAR run's checkpoint).

    python lab/scripts/mqar_pair_accuracy.py runs/ck/NAME [--pairs 16 --seq-len 128] [--out f.json]

If misses pile up on the oldest pairs, the state forgets (decay or overwriting); if they spread
evenly over the pairs, and a miss is mostly another stored pair's value, the keys are not told
apart (crosstalk between stored pairs); a falling accuracy over the queries would mean reading
disturbs the state; per key and value token, a few tokens never right and the rest always right
would mean the model learned some tokens' embeddings and not others. The held-out sequences are the
suite's (`EVAL_SEED`), so the overall accuracy is the one `evaluate` reports for the same weights.
"""

from __future__ import annotations

import argparse
import json

import torch

from blockstate.loading import load_model
from blockstate.tasks.generators import IGNORE, make_task
from blockstate.tasks.runner import EVAL_SEED


@torch.no_grad()
def pair_accuracy(model, task, sequences: int = 256, batch_size: int = 64) -> dict:
    """Accuracy per pair index (0 = written first), per query rank (0 = queried first), and per
    key and value token (how often each is right where it is the one queried or asked for)."""
    n = task.num_pairs
    by_pair, by_rank = torch.zeros(n), torch.zeros(n)
    key_hits, key_count = torch.zeros(task.num_keys), torch.zeros(task.num_keys)
    value_hits, value_count = torch.zeros(task.num_values), torch.zeros(task.num_values)
    misses = {"another_pair": 0, "other_value": 0, "not_a_value": 0}
    count = 0
    for start in range(0, sequences, batch_size):
        batch = task.sample(min(batch_size, sequences - start), EVAL_SEED + start)
        predictions = model(batch.inputs).argmax(-1)                                  # (B, L)
        scored = batch.targets != IGNORE                                              # (B, L)
        correct = (predictions == batch.targets) & scored                             # (B, L)
        keys = batch.inputs[:, 0:2 * n:2]                                             # (B, n)
        for row in range(batch.inputs.shape[0]):
            positions = scored[row].nonzero().squeeze(1)                              # (n,) in order
            queried = batch.inputs[row, positions]                                    # (n,) keys
            pair = (keys[row].unsqueeze(0) == queried.unsqueeze(1)).float().argmax(1)  # (n,)
            hits = correct[row, positions].float()                                    # (n,)
            by_pair.index_add_(0, pair, hits)
            by_rank += hits
            key_hits.index_add_(0, queried, hits)
            key_count.index_add_(0, queried, torch.ones(n))
            asked = batch.targets[row, positions] - task.num_keys                     # (n,)
            value_hits.index_add_(0, asked, hits)
            value_count.index_add_(0, asked, torch.ones(n))
            stored = set(batch.inputs[row, 1:2 * n:2].tolist())
            for guess, target in zip(predictions[row, positions].tolist(),
                                     batch.targets[row, positions].tolist(), strict=True):
                if guess == target:
                    continue
                if guess in stored:
                    misses["another_pair"] += 1
                elif task.num_keys <= guess < task.filler:
                    misses["other_value"] += 1
                else:
                    misses["not_a_value"] += 1
        count += batch.inputs.shape[0]
    return {"sequences": count, "accuracy": float(by_pair.sum() / (count * n)),
            "by_pair": [round(float(a), 4) for a in by_pair / count],
            "by_query_rank": [round(float(a), 4) for a in by_rank / count],
            "misses": misses, "chance_among_stored": round(1 / n, 4),
            "by_key": _spread(key_hits, key_count), "by_value": _spread(value_hits, value_count)}


def _spread(hits: torch.Tensor, count: torch.Tensor) -> dict:
    """Per-token accuracy and how it spreads: quartiles, and the share of tokens right at least
    90% / at most 10% of the time (tokens never seen are left out)."""
    seen = count > 0
    accuracy = hits[seen] / count[seen]
    q = torch.quantile(accuracy, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    return {"tokens": int(seen.sum()), "quartiles": [round(float(a), 3) for a in q],
            "share_at_least_0.9": round(float((accuracy >= 0.9).float().mean()), 3),
            "share_at_most_0.1": round(float((accuracy <= 0.1).float().mean()), 3),
            "accuracy": [round(float(a), 3) if c else None
                         for a, c in zip(hits / count.clamp(min=1), count, strict=True)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a run's checkpoint directory or one step directory")
    parser.add_argument("--pairs", type=int, default=None, help="default: the run's own")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--gap", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, checkpoint = load_model(args.checkpoint)
    run = checkpoint.train_state.get("run", {})
    params = dict(run.get("params", {}))
    if args.pairs is not None:
        params["num_pairs"] = args.pairs
    if args.seq_len is not None:
        params["seq_len"] = args.seq_len
    params.setdefault("gap", args.gap)
    task = make_task("mqar", **params)
    result = {"checkpoint": str(checkpoint.path), "step": checkpoint.step, "params": params,
              **pair_accuracy(model, task, args.sequences)}
    print(f"{checkpoint.path} step {checkpoint.step} {params}: accuracy {result['accuracy']:.3f}")
    print("by pair (oldest first):  " + " ".join(f"{a:.2f}" for a in result["by_pair"]))
    print("by query rank:           " + " ".join(f"{a:.2f}" for a in result["by_query_rank"]))
    m = result["misses"]
    total = max(1, sum(m.values()))
    print(f"misses: {total}; another pair's value {m['another_pair'] / total:.2f}, a value not stored "
          f"{m['other_value'] / total:.2f}, not a value {m['not_a_value'] / total:.2f} "
          f"(a guess among the stored values is right 1/{task.num_pairs} of the time)")
    for name in ("by_key", "by_value"):
        spread = result[name]
        print(f"{name}: quartiles {spread['quartiles']}, >= 0.9: {spread['share_at_least_0.9']:.2f}, "
              f"<= 0.1: {spread['share_at_most_0.1']:.2f} of {spread['tokens']} tokens")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
