"""Gather the stages of scripts/gpu_check.sh into OUT/summary.json and OUT/summary.md.

    python scripts/gpu_check_report.py OUT [--mode gpu|dry-run]

Reads OUT/stages.tsv (each stage's status, exit code and seconds), the CUDA tests' JUnit XML, the
training run's summary and metrics, and the layer and generation benchmarks' JSON. A stage whose
outputs are missing is reported as such. Exits 0 when every stage passed (and the tests had no
failures or errors), else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

STAGES = ("tests", "train", "layers", "generation")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stages(out: Path) -> dict[str, dict[str, Any]]:
    stages = {name: {"status": "not run"} for name in STAGES}
    try:
        lines = (out / "stages.tsv").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        name, status, code, seconds = line.split("\t")
        stages[name] = {"status": status, "exit_code": int(code), "seconds": int(seconds)}
    return stages


def _tests(out: Path) -> dict[str, Any] | None:
    try:
        root = ElementTree.parse(out / "tests" / "junit.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return None
    cases = []
    for case in root.iter("testcase"):
        outcome, reason = "passed", None
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                reason = found.get("message")
                break
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "reason": reason, "seconds": float(case.get("time") or 0)})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def _train(out: Path) -> dict[str, Any] | None:
    run = out / "train" / "run"
    records = []
    try:
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    except (OSError, ValueError):
        pass
    steps = [r for r in records if "loss" in r and "split" not in r]
    summary = _json(run / "summary.json")
    finished = summary is not None
    if summary is None:  # stopped before its end (e.g. the stage's time limit): its last logged step
        if not steps:
            return None
        last = steps[-1]
        summary = {"step": last["step"], "elapsed_s": last.get("elapsed"),
                   "tokens_per_s": last.get("tokens_per_s")}
    validation = summary.get("validation") or {}
    config = _json(run / "train_config.json") or {}
    return {"finished": finished, "steps": summary.get("step"), "elapsed_s": summary.get("elapsed_s"),
            "tokens_per_s": summary.get("tokens_per_s"), "parameters": summary.get("parameters"),
            "first_loss": steps[0]["loss"] if steps else None,
            "last_loss": steps[-1]["loss"] if steps else None,
            "last_mfu": steps[-1].get("mfu") if steps else None,
            "validation_loss": validation.get("loss"),
            "validation_bits_per_byte": validation.get("bits_per_byte"),
            "device": config.get("device"), "precision": (config.get("train") or {}).get("precision"),
            "compile": (config.get("train") or {}).get("compile"), "shape": summary.get("shape")}


def _layers(out: Path) -> dict[str, Any] | None:
    report = _json(out / "layers" / "layers.json")
    if report is None:
        return None
    rows = []
    for r in report.get("results", []):
        row = {"layer": r["layer"], "length": r["length"], "width": r["width"]}
        for phase in ("forward", "forward_backward"):
            measured = r.get(phase) or {}
            row[f"{phase}_ms"] = (measured["seconds"] * 1e3 if measured.get("seconds") is not None
                                  else None)
            row[f"{phase}_peak_mib"] = (measured["peak_bytes"] / 2**20 if measured.get("peak_bytes")
                                        else None)
        rows.append(row)
    by = {(r["layer"], r["length"]): r for r in rows}
    for row in rows:  # BST's time over the baselines' at the same length (< 1: BST is faster)
        for baseline in ("brt", "slide"):
            other = by.get((baseline, row["length"]))
            for phase in ("forward", "forward_backward"):
                mine, theirs = row[f"{phase}_ms"], other and other[f"{phase}_ms"]
                if row["layer"].startswith("bst") and mine and theirs:
                    row[f"{phase}_over_{baseline}"] = mine / theirs
    return {"dtype": report.get("dtype"), "machine": report.get("machine"), "rows": rows,
            "skipped": report.get("skipped", [])}


def _generation(out: Path) -> dict[str, Any] | None:
    report = _json(out / "generation" / "generation.json")
    if report is None:
        return None
    rows = []
    for r in report.get("results", []):
        for batch, measured in r.get("batches", {}).items():
            rows.append({"model": r["model"], "context": r["context"], "batch": int(batch),
                         "ms_per_step": measured["median_step_s"] * 1e3,
                         "tokens_per_s": measured["tokens_per_s"],
                         "prefill_tokens_per_s": r.get("prefill_tokens_per_s")})
    return {"size": report.get("size"), "rows": rows, "skipped": report.get("skipped", [])}


def _number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# GPU check ({summary['mode']})", "", "| stage | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {s['status']} | {s.get('seconds', '-')} |"
              for name, s in summary["stages"].items()]
    tests = summary["tests"]
    lines += ["", "## CUDA-only tests", ""]
    if tests is None:
        lines.append("no test report")
    else:
        lines.append(", ".join(f"{v} {k}" for k, v in tests["counts"].items()))
        lines += [""] + [f"- {c['outcome']}: `{c['test']}`" + (f" ({c['reason']})" if c["reason"] else "")
                         for c in tests["cases"]]
    train = summary["train"]
    lines += ["", "## Training (bst-sh-s4, bf16" + (", compiled)" if train and train["compile"] else ")"), ""]
    if train is None:
        lines.append("no training summary")
    else:
        lines += [f"- steps: {train['steps']} in {_number(train['elapsed_s'], 1)} s on {train['device']}"
                  + ("" if train["finished"] else " (did not finish: its last logged step)"),
                  f"- tokens/s: {_number(train['tokens_per_s'], 0)}; MFU at the last logged step: "
                  f"{_number(train['last_mfu'], 3)}",
                  f"- training loss {_number(train['first_loss'], 3)} -> {_number(train['last_loss'], 3)}; "
                  f"validation loss {_number(train['validation_loss'], 3)}, bits per byte "
                  f"{_number(train['validation_bits_per_byte'], 3)}"]
    layers = summary["layers"]
    lines += ["", "## Layers (BST:SH:S4 against BRT and Slide)", ""]
    if layers is None:
        lines.append("no layer benchmark")
    else:
        lines += ["| layer | length | forward ms | fwd+bwd ms | fwd+bwd peak MiB | fwd / BRT | fwd / Slide |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['layer']} | {r['length']} | {_number(r['forward_ms'])} | "
                  f"{_number(r['forward_backward_ms'])} | {_number(r['forward_backward_peak_mib'], 0)} | "
                  f"{_number(r.get('forward_over_brt'))} | {_number(r.get('forward_over_slide'))} |"
                  for r in layers["rows"]]
        lines += [f"- skipped: {s}" for s in layers["skipped"]]
    generation = summary["generation"]
    lines += ["", "## Generation (ms per one-token step)", ""]
    if generation is None:
        lines.append("no generation benchmark")
    else:
        lines += ["| model | context | batch | ms/step | tokens/s | prefill tokens/s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['context']} | {r['batch']} | {_number(r['ms_per_step'])} | "
                  f"{_number(r['tokens_per_s'], 0)} | {_number(r['prefill_tokens_per_s'], 0)} |"
                  for r in generation["rows"]]
    lines += ["", f"**{'all stages passed' if summary['passed'] else 'NOT PASSED'}**", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", default="gpu")
    args = parser.parse_args(argv)
    summary: dict[str, Any] = {"mode": args.mode, "stages": _stages(args.out),
                               "tests": _tests(args.out), "train": _train(args.out),
                               "layers": _layers(args.out), "generation": _generation(args.out)}
    tests_ok = summary["tests"] is not None and not (summary["tests"]["counts"]["failed"]
                                                     or summary["tests"]["counts"]["error"])
    summary["passed"] = tests_ok and all(s["status"] == "passed" for s in summary["stages"].values())
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = markdown(summary)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
