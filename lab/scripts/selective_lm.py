"""Language-model perplexity of the selective kernel's parametrizations beside bst-sh-s4 (issue 13's
"tiny perplexity no worse than bst-sh-s4" target), with the settings of `blockstate reproduce
--scale tiny`: same model size, data budget (480k tokens), learning rate, seeds and evaluation.

Each run is one `blockstate.reproduce` run (resumable; finished runs are skipped), written under
OUT/runs/; the table (test perplexity at the training length, mean over seeds +- half the range)
goes to OUT/report.md and OUT/results.json.

    OMP_NUM_THREADS=1 .venv/bin/python lab/scripts/selective_lm.py [--corpora books,python-stdlib]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from blockstate.fileio import atomic_write
from blockstate.reproduce import SCALES, Run, execute

SETTINGS = [  # (label, preset, overrides beyond the tiny scale's)
    ("bst-sh-s4", "bst-sh-s4", {}),
    ("bst-sh-ssd", "bst-sh-ssd", {}),
    ("bst-sh-ssd, ssd_decay=state", "bst-sh-ssd", {"ssd_decay": "state"}),
    ("bst-sh-ssd, ssd_bc_norm=true", "bst-sh-ssd", {"ssd_bc_norm": True}),
    # Chunks of 16 instead of 64: with a decay per state dimension (complex or not) the in-chunk
    # decays are T x T per state dimension, and at this size the SSM's forward+backward takes 4.0 s
    # with T = 64 against 1.1 s with T = 16 (batch 16, L = 256, width 32, N = 16, one thread);
    # the function does not depend on T (tests/test_selective.py).
    ("bst-sh-ssd, ssd_decay=complex", "bst-sh-ssd", {"ssd_decay": "complex", "ssm_chunk_size": 16}),
    # One real decay per head with rotating modes: the scalar-decay scan, chunks of 64 as the default
    ("bst-sh-ssd, ssd_decay=rotary", "bst-sh-ssd", {"ssd_decay": "rotary"}),
    # The configuration that learns MQAR (lab/logs/long_range.md, 8f): normalized B and C, an
    # output head of its own (V x D more parameters) and the context outputs read directly
    ("bst-sh-ssd, ssd_bc_norm, untied head, context_direct", "bst-sh-ssd",
     {"ssd_bc_norm": True, "tie_embeddings": False, "context_direct": True}),
    # ... and the parts of it (is the gain the head's?)
    ("bst-sh-s4, untied head", "bst-sh-s4", {"tie_embeddings": False}),
    ("bst-sh-ssd, ssd_bc_norm, untied head", "bst-sh-ssd", {"ssd_bc_norm": True, "tie_embeddings": False}),
    ("bst-sh-s4, context_direct", "bst-sh-s4", {"context_direct": True}),
    ("bst-sh-s4, untied head, context_direct", "bst-sh-s4",
     {"tie_embeddings": False, "context_direct": True}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpora", default="books,python-stdlib")
    parser.add_argument("--out", default="docs/results/selective_lm")
    parser.add_argument("--settings", default=None,
                        help="comma-separated indices into SETTINGS to run (default: all)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds (default: the tiny scale's, 0 and 1)")
    args = parser.parse_args()
    chosen = (SETTINGS if args.settings is None
              else [SETTINGS[int(i)] for i in args.settings.split(",")])
    torch.set_num_threads(1)
    scale, out = SCALES["tiny"], Path(args.out)
    seeds = scale.seeds if args.seeds is None else tuple(int(s) for s in args.seeds.split(","))
    records = finished(out)
    for corpus in args.corpora.split(","):
        for seed in seeds:
            for label, preset, overrides in chosen:
                if (label, corpus, seed) in records:
                    continue
                run = Run("main", corpus, preset, seed, overrides, label)
                # as stored in its eval.json (lengths as string keys)
                record = json.loads(json.dumps(execute(run, scale, out, "cpu", print)))
                records[_key(record)] = record
                write(out, records, scale.seq_len)


def _key(record: dict) -> tuple:
    return record["label"], record["corpus"], record["seed"]


def finished(out: Path) -> dict[tuple, dict]:
    """Every finished run's record by (label, corpus, seed): the eval.json files under OUT/runs
    and, for runs whose files are gone (a fresh clone keeps only the records committed there and
    in results.json), OUT/results.json."""
    records = {}
    if (out / "results.json").exists():
        records = {_key(r): r for r in json.loads((out / "results.json").read_text())}
    for path in sorted(out.glob("runs/main/*/*/eval.json")):
        record = json.loads(path.read_text())
        records[_key(record)] = record
    return records


def write(out: Path, finished_runs: dict[tuple, dict], length: int) -> None:
    """results.json and report.md of every finished run (also earlier invocations')."""
    records = sorted(finished_runs.values(), key=lambda r: (r["corpus"], r["label"], r["seed"]))
    atomic_write(out / "results.json", json.dumps(records, indent=1))
    atomic_write(out / "report.md", report(records, length))


def report(records: list[dict], length: int) -> str:
    corpora = list(dict.fromkeys(r["corpus"] for r in records))
    lines = ["Test perplexity per byte at the training length (256), `tiny` reproduction settings "
             "(480k training tokens; mean +- half the range over the seeds run).",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python lab/scripts/selective_lm.py` (`--corpora`, "
             "`--settings` choose a part; finished runs are kept)", "",
             "| model | parameters | " + " | ".join(corpora) + " |",
             "|---|---|" + "---|" * len(corpora)]
    for label, _, _ in SETTINGS:
        mine = [r for r in records if r["label"] == label]
        if not mine:
            continue
        cells = []
        for corpus in corpora:
            ppl = [r["test"][str(length)]["perplexity"] for r in mine if r["corpus"] == corpus]
            cells.append(f"{sum(ppl) / len(ppl):.3f} +- {(max(ppl) - min(ppl)) / 2:.3f} "
                         f"({len(ppl)} seeds)" if ppl else "-")
        lines.append(f"| {label} | {mine[0]['parameters'] / 1e6:.3f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
