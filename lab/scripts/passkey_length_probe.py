"""Why a selective-SSM model trained on passkey retrieval at L fails at 4L, and whether capping
how long its state remembers filler changes that: a probe of one trained model (a checkpoint that
`blockstate tasks run --keep-models DIR` saved).

It measures, on the passkey task's own sequences:
- accuracy per digit and per whole passkey on a depth x length grid;
- drift: on pure filler (a period of 16 tokens), how far each SSM sublayer's output at positions
  k * L - 16 .. k * L drifts from its output at L - 16 .. L (relative norm of the difference). A
  state that settles into the filler's period gives drift 0; a state that keeps accumulating filler
  past L gives outputs the readout never saw in training;
- the memory horizon of each SSM head on filler, 1 / (dt |A|) positions (dt averaged over the
  filler), against L;
- the step each head takes at the passkey's digits, as a multiple of its median step over the
  training-length sequences: filler skipping (below) keeps what a head wrote only where that
  multiple exceeds the skip factor;
- with --cap H (repeatable), the same grid after raising |A| of every head whose filler horizon
  exceeds H so that it is H (a weight edit, no retraining): whether forgetting filler faster
  restores retrieval at 4L, and what it costs at L;
- with --gate F (repeatable), the same grid with the filler skipped instead (after LongMamba, Ye
  et al. 2025): in every head whose filler horizon exceeds L, a position whose dt is below F times
  that head's mean dt on filler gets dt = 0, so it neither decays the state nor writes to it;
- with --finetune STEPS, the library's filler skipping (`blockstate.ssm.skip.skip_filler`, factor
  2, calibrated on training-length sequences) switched on and the model then trained STEPS more
  steps on the task at L with it on (AdamW, lr 1e-4, batch 32, fresh sequences): whether the
  readout, trained on skipped states, keeps retrieval at L and carries it to 4L and 16L.

    OMP_NUM_THREADS=1 .venv/bin/python lab/scripts/passkey_length_probe.py \
        runs/task-models/passkey-seq_len256/bst-recommended-seed1 --cap 256 --cap 1024 \
        --out lab/runs/passkey_length/bst-recommended-seed1.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from blockstate.loading import load_model
from blockstate.ssm.skip import selective_ssms, ssm_inputs
from blockstate.tasks import make_task
from blockstate.tasks.generators import IGNORE


@torch.no_grad()
def grid(model, depths, lengths, sequences, batch_size=8):
    cells = []
    for length in lengths:
        for depth in depths:
            task = make_task("passkey", seq_len=length, depth=depth)
            digits, whole = [], []
            for start in range(0, sequences, batch_size):
                batch = task.sample(min(batch_size, sequences - start), 12345 + start)
                predictions = model(batch.inputs).argmax(-1)                  # (B, L)
                scored = batch.targets != IGNORE
                right = (predictions == batch.targets) | ~scored
                digits.append((predictions == batch.targets)[scored].float())
                whole.append(right.all(1).float())
            cells.append({"seq_len": length, "depth": depth,
                          "per_digit": round(float(torch.cat(digits).mean()), 3),
                          "whole": round(float(torch.cat(whole).mean()), 3)})
    return cells


@torch.no_grad()
def drift_and_horizons(model, train_len, multiples):
    filler = make_task("passkey", seq_len=train_len * max(multiples))
    tokens = 12 + torch.arange(filler.seq_len) % filler.FILLER                  # pure filler
    inputs = ssm_inputs(model, tokens[None])
    report = {}
    for name, ssm in selective_ssms(model):
        u = inputs[name]
        y = ssm(u)                                                               # (1, L, K, P)
        reference = y[0, train_len - 16:train_len]
        drift = {}
        for k in multiples:
            window = y[0, k * train_len - 16:k * train_len]
            drift[f"{k}x"] = round(float((window - reference).norm() / reference.norm()), 4)
        norms = {f"{k}x": round(float(y[0, k * train_len - 16:k * train_len].norm()), 3)
                 for k in multiples}
        _, _, dt, _, _ = ssm._inputs(u)                                          # (1, L, K, G)
        a = torch.exp(ssm.kernel.log_a)                                          # |A|: (K, G)
        if a.dim() != 2:
            raise SystemExit("the horizon cap handles ssd_decay='head' (one decay per head) only")
        horizon = 1 / (dt[0].mean(0) * a)                                        # (K, G)
        report[name] = {
            "drift_vs_1x": drift, "output_norm": norms,
            "horizon_quantiles": [round(float(q), 1) for q in torch.quantile(
                horizon.flatten(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))],
            "heads_beyond": {f"{k}x": int((horizon > k * train_len).sum()) for k in (1, 4, 16)},
            "heads": horizon.numel(), "horizon": horizon.tolist()}
    return report


@torch.no_grad()
def capped(model, train_len, cap):
    """A copy of `model` whose SSM heads forget filler within `cap` positions."""
    model = copy.deepcopy(model)
    report = drift_and_horizons(model, train_len, [1])
    for name, ssm in selective_ssms(model):
        horizon = torch.tensor(report[name]["horizon"])
        raise_by = torch.clamp(horizon / cap, min=1.0)
        ssm.kernel.log_a.add_(torch.log(raise_by))
    return model


@torch.no_grad()
def gated(model, train_len, factor):
    """A copy of `model` that skips filler in its long-memory heads (see --gate), through the
    selective SSM's `skip_below` thresholds, set here from the filler's mean step."""
    model = copy.deepcopy(model)
    report = drift_and_horizons(model, train_len, [1])
    for name, ssm in selective_ssms(model):
        horizon = torch.tensor(report[name]["horizon"])                          # (K, G)
        mean_dt = 1 / (horizon * torch.exp(ssm.kernel.log_a))
        ssm.skip_below = torch.where(horizon > train_len, factor * mean_dt,
                                     torch.zeros_like(mean_dt))
    return model


@torch.no_grad()
def digit_steps(model, train_len, sequences=32):
    """Per SSM head: mean dt at the passkey digits over its median dt (training-length sequences,
    uniform depth), and the head's horizon at its median step."""
    task = make_task("passkey", seq_len=train_len)
    batch = task.sample(sequences, 2**31 - 1)
    inputs = ssm_inputs(model, batch.inputs)
    position = torch.arange(train_len)
    key = (batch.inputs == task.KEY).float().argmax(1, keepdim=True)              # (B, 1)
    digits = (position > key) & (position <= key + task.digits)                    # (B, L)
    report = {}
    for name, ssm in selective_ssms(model):
        _, _, dt, _, _ = ssm._inputs(inputs[name])                               # (B, L, K, G)
        median = dt.flatten(0, 1).median(0).values                               # (K, G)
        at_digits = dt[digits].mean(0)                                           # (K, G)
        horizon = 1 / (median * torch.exp(ssm.kernel.log_a))
        report[name] = [{"head": [k, g], "horizon_at_median": round(float(horizon[k, g]), 1),
                         "digit_over_median": round(float(at_digits[k, g] / median[k, g]), 2)}
                        for k in range(median.shape[0]) for g in range(median.shape[1])]
    return report


def finetuned_with_skipping(model, train_len, steps, lr=1e-4, batch_size=32):
    """A copy of `model` with filler skipping on, trained `steps` steps with it (see --finetune)."""
    from blockstate.ssm.skip import skip_filler

    model = copy.deepcopy(model)
    task = make_task("passkey", seq_len=train_len)
    heads = skip_filler(model, task.sample(32, 2**31 - 1).inputs, 2.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        batch = task.sample(batch_size, 10**9 + step)
        logits = model(batch.inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(),
                                                 ignore_index=IGNORE)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append([step, round(float(loss.detach()), 4)])
    model.eval()
    return model, heads, losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a checkpoint saved by `blockstate tasks run --keep-models`")
    p.add_argument("--depths", default="0,25,50,75,100")
    p.add_argument("--multiples", default="1,4,16", help="evaluation lengths as multiples of L")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--cap", type=int, action="append", default=[],
                   help="also score the model with every filler horizon capped at this many positions")
    p.add_argument("--gate", type=float, action="append", default=[],
                   help="also score the model with filler skipped in its long-memory heads: dt "
                        "below this multiple of the head's mean filler dt set to 0")
    p.add_argument("--finetune", type=int, default=0,
                   help="also score the model after STEPS steps of training with skipping on")
    p.add_argument("--out", default="")
    args = p.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    multiples = [int(m) for m in args.multiples.split(",")]
    model, checkpoint = load_model(args.model)
    train_len = make_task("passkey", **dict(checkpoint.train_state["run"]["params"])).seq_len
    longest = train_len * max(multiples)
    model, _ = load_model(checkpoint, max_seq_len=longest)
    lengths = [train_len * m for m in multiples]
    result = {"model": str(args.model), "train_len": train_len,
              "ssm": drift_and_horizons(model, train_len, multiples),
              "digit_steps": digit_steps(model, train_len, args.sequences),
              "grids": {"as trained": grid(model, depths, lengths, args.sequences)}}
    for cap in args.cap:
        result["grids"][f"horizon capped at {cap}"] = grid(capped(model, train_len, cap), depths,
                                                           lengths, args.sequences)
    for factor in args.gate:
        result["grids"][f"filler skipped, gate {factor}"] = grid(gated(model, train_len, factor),
                                                               depths, lengths, args.sequences)
    if args.finetune:
        tuned, heads, losses = finetuned_with_skipping(model, train_len, args.finetune)
        result["finetune"] = {"steps": args.finetune, "lr": 1e-4, "heads": heads, "losses": losses}
        result["grids"][f"trained {args.finetune} more steps with filler skipped"] = grid(
            tuned, depths, lengths, args.sequences)
    for name, layer in result["ssm"].items():
        print(name, {k: v for k, v in layer.items() if k != "horizon"})
    for name, heads in result["digit_steps"].items():
        print(name, "long-memory heads (horizon > L): digit step / median step:",
              [h["digit_over_median"] for h in heads if h["horizon_at_median"] > train_len])
    for variant, cells in result["grids"].items():
        print(f"\n{variant}: per digit (whole passkey)")
        print("depth  " + "  ".join(f"{n:>12}" for n in lengths))
        for depth in depths:
            row = [c for c in cells if c["depth"] == depth]
            print(f"{depth:>5}  " + "  ".join(f"{c['per_digit']:>5} ({c['whole']:>4})" for c in row))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
