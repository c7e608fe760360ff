"""Summaries of task runs: `blockstate tasks report DIR` writes report.md, report.json and
accuracy-against-distance plots from the run files under DIR/runs, and for passkey runs a depth x
length grid of retrieval accuracy (in report.md, passkey.json and the heat map passkey.png)."""

from __future__ import annotations

import json
import statistics
import textwrap
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..fileio import atomic_write
from ..registry import PRESETS
from ..reporting import markdown_table
from .generators import make_task


def record_paths(out: str | Path) -> list[Path]:
    """The record files of the finished runs under `out`/runs, sorted."""
    return sorted((Path(out) / "runs").glob("*/*.json"))


def load_records(out: str | Path) -> list[dict[str, Any]]:
    """Every finished run under `out`/runs, in a stable order."""
    paths = record_paths(out)
    if not paths:
        raise ValueError(f"no finished task runs under {Path(out) / 'runs'}; run `blockstate tasks "
                         f"run --out {out}` first")
    records = []
    for path in paths:
        try:
            records.append(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a task run record (unreadable JSON: {e}); remove it "
                             f"or run the task again") from None
    presets = list(PRESETS)

    def order(record: dict) -> tuple:
        model = presets.index(record["model"]) if record["model"] in presets else len(presets)
        return (record["task"], sorted(record["params"].items()), model, record["label"], record["seed"])

    return sorted(records, key=order)


def _evaluation_key(record: dict, evaluation: dict) -> str:
    extra = evaluation.get("params")
    suffix = "" if not extra else " (evaluated at " + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")"
    return record["task_key"] + suffix


def _mean_spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "spread": (max(values) - min(values)) / 2,
            "n": len(values)}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """{evaluation key: {"chance", "bins", "models": {label: {"parameters", "accuracy",
    "bins": {"low-high": mean/spread/n}}}}} over seeds."""
    grouped: dict[str, dict[str, list[tuple[dict, dict]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for evaluation in record["evaluations"]:
            grouped[_evaluation_key(record, evaluation)][record["label"]].append((record, evaluation))
    summary: dict[str, Any] = {}
    for key, by_label in grouped.items():
        bins: set[tuple[int, int]] = set()
        models = {}
        for label, items in by_label.items():
            per_bin: dict[tuple[int, int], list[float]] = defaultdict(list)
            for _, evaluation in items:
                for b in evaluation["bins"]:
                    per_bin[(b["low"], b["high"])].append(b["accuracy"])
            bins.update(per_bin)
            models[label] = {
                "parameters": items[0][0]["parameters"],
                "seeds": sorted(r["seed"] for r, _ in items),
                "accuracy": _mean_spread([e["accuracy"] for _, e in items]),
                "bins": {f"{lo}-{hi}": _mean_spread(v) for (lo, hi), v in sorted(per_bin.items())},
            }
        first = next(iter(by_label.values()))[0]
        summary[key] = {"chance": first[1]["chance"], "seq_len": first[1]["seq_len"],
                        "block_size": first[0]["model_config"]["block_size"],
                        "bins": [f"{lo}-{hi}" for lo, hi in sorted(bins)], "models": models}
    return summary


def _cell(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "-"
    if stat["n"] == 1:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ± {stat['spread']:.2f}"


def report_markdown(summary: dict[str, Any]) -> str:
    """One table per task configuration: accuracy per distance bin (in tokens and blocks)."""
    parts = []
    for key, entry in summary.items():
        w = entry["block_size"]
        bins = entry["bins"]
        header = ["model", "params"] + [
            f"d {b.replace('-', '–')} ({int(b.split('-')[0]) // w}–{int(b.split('-')[1]) // w}W)"
            for b in bins] + ["all"]
        rows = [[label + (" †" if m.get("carried") else ""), f"{m['parameters'] / 1e3:.0f}k"]
                + [_cell(m["bins"].get(b)) for b in bins] + [_cell(m["accuracy"])]
                for label, m in entry["models"].items()]
        seeds = sorted({s for m in entry["models"].values() for s in m["seeds"]})
        carried = (" † from an earlier report.json, whose run records are not under runs/."
                   if any(m.get("carried") for m in entry["models"].values()) else "")
        parts.append(f"### {key}\n\nL = {entry['seq_len']}, W = {w}, chance {entry['chance']:.3f}; "
                     f"accuracy, mean ± half-range over seeds {seeds}; d = distance in tokens from "
                     f"the evidence to the query.{carried}\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts) + "\n"


def plot(summary: dict[str, Any], path: Path) -> bool:
    """Accuracy against distance, one panel per task configuration; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = list(summary)
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 3.2 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        entry = summary[key]
        for label, m in entry["models"].items():
            xs, ys, es = [], [], []
            for b, stat in m["bins"].items():
                low, high = (int(v) for v in b.split("-"))
                xs.append((low + high) / 2 / entry["block_size"])
                ys.append(stat["mean"])
                es.append(stat["spread"])
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.axhline(entry["chance"], color="grey", linestyle=":", label="chance")
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("distance from evidence to query (blocks of W)")
        ax.set_ylabel("accuracy")
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def passkey_grids(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The passkey runs as grids of whole-passkey accuracy (every digit right), mean over seeds,
    one per training configuration and model: {"<task_key> <label>": {"train_len", "seeds",
    "depths" (percent), "lengths", "exact" (depths x lengths, None where not evaluated)}}. Cells
    come from the evaluations at a fixed depth (`--eval-param depth=...`); the evaluation at the
    training's uniform depth (-1) is not a cell. A record scored with filler skipped
    (`--skip-filler`) also gives a grid of its own, its key ending in "[filler skipped xFACTOR]"."""
    cells: dict[str, dict[tuple[int, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    grids: dict[str, Any] = {}
    scored = []
    for record in records:
        if record["task"] != "passkey":
            continue
        key = f"{record['task_key']} {record['label']}"
        stage = record.get("filler_stage")
        if stage:
            every = stage.get("recalibrate_every")
            key += (f" [trained skipping x{stage['factor']:g} from step {stage['from_step']}"
                    f"{f', recalibrated every {every}' if every else ''}]")
        scored.append((key, record, record["evaluations"]))
        skipped = record.get("filler_skipped")
        if skipped:
            scored.append((f"{key} [filler skipped x{skipped['factor']:g}]", record,
                           skipped["evaluations"]))
    for key, record, evaluations in scored:
        grid = grids.setdefault(key, {"train_len": make_task("passkey", **record["params"]).seq_len,
                                      "seeds": []})
        grid["seeds"] = sorted(set(grid["seeds"]) | {record["seed"]})
        for evaluation in evaluations:
            task = make_task("passkey", **{**record["params"], **(evaluation.get("params") or {})})
            if task.depth >= 0:
                cells[key][(task.depth, task.seq_len)].append(evaluation["exact"])
    for key, grid in grids.items():
        depths = sorted({d for d, _ in cells[key]})
        lengths = sorted({n for _, n in cells[key]})
        grid.update(depths=depths, lengths=lengths, exact=[
            [statistics.fmean(cells[key][(d, n)]) if (d, n) in cells[key] else None for n in lengths]
            for d in depths])
    return {key: grid for key, grid in grids.items() if grid["depths"]}


def passkey_markdown(grids: dict[str, Any]) -> str:
    """One table per grid: rows the depth of the key, columns the evaluation length."""
    parts = []
    for key, grid in grids.items():
        train = grid["train_len"]
        header = ["depth"] + [f"L = {n} ({n / train:g}x)" for n in grid["lengths"]]
        rows = [[f"{d}%"] + ["-" if v is None else f"{v:.2f}" for v in row]
                for d, row in zip(grid["depths"], grid["exact"], strict=True)]
        parts.append(f"### passkey grid: {key}\n\nTrained at L = {train}; the fraction of "
                     f"sequences whose whole passkey is retrieved (every digit right), mean over "
                     f"seeds {grid['seeds']}; depth: where the key lies, in percent of the way "
                     f"from the start to the question.\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts) + "\n"


def plot_passkey(grids: dict[str, Any], path: Path) -> bool:
    """A heat map per grid (depth x evaluation length, whole-passkey accuracy); False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = list(grids)
    fig, axes = plt.subplots(1, len(keys), figsize=(1.5 + 3.6 * len(keys), 3.6), squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes[0], keys, strict=True):
        grid = grids[key]
        values = [[float("nan") if v is None else v for v in row] for row in grid["exact"]]
        image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid["exact"]):
            for j, v in enumerate(row):
                if v is not None:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.5 else "white")
        ax.set_xticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]])
        ax.set_yticks(range(len(grid["depths"])), [f"{d}%" for d in grid["depths"]])
        ax.set_xlabel(f"evaluation length (trained at {grid['train_len']})")
        if ax is axes[0, 0]:
            ax.set_ylabel("depth of the passkey")
        ax.set_title(textwrap.fill(key, 44), fontsize=8)  # long labels wrap within the panel
    fig.colorbar(image, ax=axes[0].tolist(), label="passkey retrieved")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def merge_previous(summary: dict[str, Any], previous: dict[str, Any],
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """`summary` (from the run records under runs/) with what an earlier report.json held that the
    records do not: a task configuration or model row with no records is kept as it was, marked
    "carried" (its records may be gone, e.g. in a fresh clone that has only the reports). A row
    whose records cover only some of its earlier seeds also keeps the earlier row (means over
    seeds cannot be re-split), with a warning; records covering every earlier seed replace it."""
    merged: dict[str, Any] = {}
    for key, entry in previous.items():
        if key not in summary:
            models = {label: {**m, "carried": True} for label, m in entry["models"].items()}
            merged[key] = {**entry, "models": models}
            continue
        new = summary[key]
        models = {}
        for label, m in entry["models"].items():
            fresh = new["models"].get(label)
            if fresh is None:
                models[label] = {**m, "carried": True}
            elif set(m["seeds"]) - set(fresh["seeds"]):
                log(f"{key}: run records for {label} hold seeds {fresh['seeds']} but report.json "
                    f"has seeds {m['seeds']}; keeping the report's row (add the missing records "
                    f"under runs/ to recompute it)")
                models[label] = {**m, "carried": True}
            else:
                models[label] = fresh
        models.update({label: m for label, m in new["models"].items() if label not in models})
        bins = sorted(set(entry["bins"]) | set(new["bins"]), key=lambda b: int(b.split("-")[0]))
        merged[key] = {**new, "bins": bins, "models": models}
    merged.update({key: entry for key, entry in summary.items() if key not in merged})
    return merged


def write_report(out: str | Path, command: str = "", log: Callable[[str], None] = print) -> Path:
    """Write report.md, report.json and report.png under `out` from the run records under
    `out`/runs, keeping what an existing report.json holds beyond them (`merge_previous`);
    return the markdown's path."""
    out = Path(out)
    previous_path = out / "report.json"
    previous = json.loads(previous_path.read_text()) if previous_path.exists() else None
    # with no run records (e.g. a fresh clone) the existing report is rewritten as it is
    records = load_records(out) if record_paths(out) or previous is None else []
    summary = summarize(records) if records else {}
    if previous is not None:
        summary = merge_previous(summary, previous, log)
    text = report_markdown(summary)
    grids = passkey_grids(records)
    if grids:
        text += "\n" + passkey_markdown(grids)
        atomic_write(out / "passkey.json", json.dumps(grids, indent=1) + "\n")
        plot_passkey(grids, out / "passkey.png")
    if command:  # the tables read every record under runs/, whichever command wrote it
        text = (f"Last command: `{command}`\n\nThe tables read every run record under "
                "`runs/`, from this command and any earlier one into the same folder.\n\n" + text)
    atomic_write(out / "report.md", text)
    atomic_write(out / "report.json", json.dumps(summary, indent=1) + "\n")
    plot(summary, out / "report.png")
    return out / "report.md"
