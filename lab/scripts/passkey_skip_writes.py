"""What a passkey model trained with filler skipping (`blockstate tasks run --skip-filler-stage`)
still writes into its skipping heads, and whether that explains where it stops carrying past the
training length L.

For each kept model (a checkpoint that `--keep-models` saved; its skip thresholds load with it):
- per skipping head: its threshold over the head's median step now (on training-length sequences,
  skipping off), with the threshold set when the stage began and the weights trained on after it;
  the share of pure-filler positions (the task's 16-token filler sentence) whose step reaches the
  threshold, i.e. that still decay and write the state; which of the 16 filler tokens those are;
- per SSM sublayer: the drift of its output on pure filler at 4L, 16L and 64L from its output at L
  (relative norm of the difference, skipping on), and the heads that do not skip but whose memory
  horizon at their median step now exceeds L (they were below L when the stage began).

A filler token that a skipping head writes is written once per filler period: at L it is a few
dozen writes the readout was trained on, at 16L sixteen times as many, so the state grows with the
length much as it did without skipping.

    OMP_NUM_THREADS=1 .venv/bin/python lab/scripts/passkey_skip_writes.py \
        runs/task-models-6000/passkey-seq_len256/bst-recommended-seed{0,1,2,3} \
        --out lab/runs/passkey_length/skip-writes-6000.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from blockstate.loading import load_model
from blockstate.ssm.skip import median_steps, selective_ssms, ssm_inputs, stop_skipping
from blockstate.tasks import make_task


@torch.no_grad()
def probe(path: str, train_len: int, multiples: list[int]) -> dict:
    longest = train_len * max(multiples)
    model = load_model(path, max_seq_len=longest)[0]
    thresholds = {name: ssm.skip_below for name, ssm in selective_ssms(model)}
    task = make_task("passkey", seq_len=train_len)
    filler = 12 + torch.arange(longest) % task.FILLER                           # (T,) pure filler
    on_filler = ssm_inputs(model, filler[None])                                 # skipping on
    stop_skipping(model)
    calibration = task.sample(32, 2**31 - 1).inputs                             # (32, L)
    at_train_len = ssm_inputs(model, calibration)                               # skipping off
    report = {"model": path, "train_len": train_len, "layers": {}}
    for name, ssm in selective_ssms(model):
        below = thresholds[name]
        ssm.skip_below = None
        median, horizon = median_steps(ssm, at_train_len[name])                # (K, G) each
        _, _, fdt, _, _ = ssm._inputs(on_filler[name].float())                 # (1, T, K, G)
        ssm.skip_below = below
        y = ssm(on_filler[name].float())                                       # skipping on
        reference = y[0, train_len - 16:train_len]
        drift = {f"{k}x": round(float((y[0, k * train_len - 16:k * train_len] - reference).norm()
                                      / reference.norm()), 4) for k in multiples if k > 1}
        heads = []
        for k in range(median.shape[0]):
            for g in range(median.shape[1]):
                skipping = below is not None and bool(below[k, g] > 0)
                entry = {"head": [k, g], "skipping": skipping,
                         "horizon_at_median": round(float(horizon[k, g]), 1)}
                if skipping:
                    written = fdt[0, :, k, g] >= below[k, g]                    # (T,)
                    entry.update({
                        "threshold_over_median": round(float(below[k, g] / median[k, g]), 2),
                        "filler_written_share": {f"{m}x": round(float(
                            written[:m * train_len].float().mean()), 4) for m in multiples},
                        "filler_tokens_written": sorted(
                            {int(t) - 12 for t in filler[written].tolist()})})
                heads.append(entry)
        report["layers"][name] = {
            "drift_vs_1x": drift, "heads": heads,
            "not_skipping_beyond_L": sum(1 for h in heads if not h["skipping"]
                                         and h["horizon_at_median"] > train_len)}
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="checkpoints saved by `tasks run --keep-models`")
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--multiples", default="1,4,16,64")
    p.add_argument("--out", default="")
    args = p.parse_args()
    multiples = [int(m) for m in args.multiples.split(",")]
    reports = []
    for path in args.models:
        report = probe(path, args.train_len, multiples)
        reports.append(report)
        print(path)
        for name, layer in report["layers"].items():
            print(f"  {name}: drift {layer['drift_vs_1x']}, heads not skipping with a horizon "
                  f"beyond L: {layer['not_skipping_beyond_L']}")
            for head in layer["heads"]:
                if head["skipping"]:
                    print(f"    head {head['head']}: threshold / median now "
                          f"{head['threshold_over_median']}, filler written "
                          f"{head['filler_written_share']}, filler tokens "
                          f"{head['filler_tokens_written']}")
    if args.out:
        Path(args.out).write_text(json.dumps(reports, indent=1) + "\n")


if __name__ == "__main__":
    main()
