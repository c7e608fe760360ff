"""`blockstate bench quality`: the README's main job against this project's `transformer` preset
trained with nanoGPT's CPU hyperparameters (not nanoGPT itself), in equal minutes.

For each corpus, one after the other in this process (same threads): the main job (`MAIN_JOB`:
`bst-recommended`, size "auto" planned for the time budget, every other setting at its default) and
the `transformer` preset configured as nanoGPT's published CPU recipe (4 layers, 4 heads, width 128,
context 64, batch 12, lr 1e-3 decaying to 1e-4, warmup 100, beta2 0.99, weight decay 0.1, clip 1.0),
each trained for the same minutes on the same training split (the recipe with the byte tokenizer,
the main job with the tokenizer its plan picks). Both are then scored on the same bytes: pieces of
about 16 KB taken in turn from every document of the test split, each model reading each piece from
its start with its own tokenizer, in windows of its own training length. The report is held-out bits
per byte, and the paired difference over the pieces (mean and standard error). Finished runs are
kept (the benchmark resumes where it stopped); pass --overwrite to train them again.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..reporting import machine_info, markdown_table
from .report import write_outputs
from .timing import measure_machine

# nanoGPT's CPU recipe (README "I only have a macbook"): train_shakespeare_char with these flags.
NANOGPT_CPU: dict[str, Any] = {
    "model": "transformer", "size": "small", "seq_len": 64, "batch_size": 12, "lr": 1e-3,
    "min_lr_ratio": 0.1, "warmup_steps": 100, "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0,
    "model_overrides": {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512,
                        "block_size": 64, "max_seq_len": 64},
}
# The README quick start's main job: everything else at its default (size "auto").
MAIN_JOB: dict[str, Any] = {"model": "bst-recommended"}
# Each entry's run directory name (under --runs-dir/CORPUS), label and training fields.
ENTRIES: dict[str, tuple[str, dict[str, Any]]] = {
    "main": (f"main job ({MAIN_JOB['model']}, size auto)", MAIN_JOB),
    "nanogpt-cpu": ("transformer preset, nanoGPT's CPU hyperparameters", NANOGPT_CPU),
}


def _train_entry(name: str, fields: dict[str, Any], corpus: str, seconds: float, run_dir: Path,
                 cache_dir: str | None, overwrite: bool) -> dict[str, Any]:
    from ..train import TrainConfig, train

    summary_path = run_dir / "summary.json"
    if summary_path.exists() and not overwrite:
        return json.loads(summary_path.read_text())
    config = TrainConfig(data=corpus, max_time=seconds, cache_dir=cache_dir, **fields)
    print(f"{corpus}: training {name} for {seconds:.0f} s -> {run_dir}", flush=True)
    return train(config, run_dir, overwrite=True, quiet=True)


def _test_pieces(source, max_bytes: int, piece_bytes: int) -> list[str]:
    """Pieces of the test split's text holding about `max_bytes` UTF-8 bytes in all: each
    document cut at line ends into pieces of about `piece_bytes` (a shorter document is one
    piece), taken in turn from every document, in a fixed pseudo-random order of documents, so
    that a corpus of a few long documents (books) still gives many pieces from all of them."""
    per_document = []
    for document in source.documents("test"):
        pieces, current, size = [], [], 0
        for line in document.text.splitlines(keepends=True):
            current.append(line)
            size += len(line.encode("utf-8"))
            if size >= piece_bytes:
                pieces.append("".join(current))
                current, size = [], 0
        if current:
            pieces.append("".join(current))
        per_document.append(pieces)
    if not per_document:
        raise ValueError(f"corpus {source.name!r} has no test documents to score")
    order = np.random.default_rng(0).permutation(len(per_document))
    chosen, total, turn = [], 0, 0
    while total < max_bytes and any(turn < len(per_document[d]) for d in order):
        for d in order:
            if turn < len(per_document[d]) and total < max_bytes:
                chosen.append(per_document[d][turn])
                total += len(chosen[-1].encode("utf-8"))
        turn += 1
    return chosen


def _score_pieces(model, tokenizer, pieces: list[str], length: int, batch_tokens: int
                  ) -> tuple[list[float], list[int], int]:
    """(loss in nats summed over each piece's tokens, bytes of each piece, tokens scored): each
    piece read from a BOS token in windows of `length`, every byte predicted once."""
    from ..data.dataset import PackedSequences, TokenizedSplit
    from ..evaluate import evaluate_length

    widths = np.asarray(tokenizer.token_byte_lengths(), dtype=np.float64)
    nats, sizes, tokens = [], [], 0
    for piece in pieces:
        ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(piece)], dtype=np.int64)  # (n,)
        split = TokenizedSplit(ids, np.asarray([0, len(ids)], np.int64), 0, {}, Path("."))
        dataset = PackedSequences(split, length, tokenizer.pad_id)
        result = evaluate_length(model, dataset, widths, None, batch_tokens, torch.device("cpu"),
                                 np.arange(len(dataset)), carry=False)
        nats.append(result["loss"] * result["tokens"])
        sizes.append(int(result["bytes"]))
        tokens += result["tokens"]
    return nats, sizes, tokens


def _score_same_bytes(run_dirs: list[Path], corpus: str, eval_tokens: int,
                      piece_bytes: int = 16384, batch_tokens: int = 8192) -> list[dict[str, Any]]:
    """Test-split loss of each run on the same bytes (`_test_pieces`), each run reading them with
    its own tokenizer in windows of its own training length, with bits per byte of every piece
    for the spread."""
    from ..data import resolve_corpus
    from ..loading import load

    pieces = _test_pieces(resolve_corpus(corpus), eval_tokens, piece_bytes)
    results = []
    for run_dir in run_dirs:
        model, tokenizer = load(run_dir)
        length = json.loads((run_dir / "train_config.json").read_text())["seq_len"]
        nats, sizes, tokens = _score_pieces(model, tokenizer, pieces, length, batch_tokens)
        if sizes != [len(p.encode("utf-8")) for p in pieces]:
            raise ValueError(f"{run_dir}: its tokenizer does not count the bytes of the test text "
                             f"exactly, so bits per byte would not compare")
        results.append({"length": length, "tokens": tokens, "bytes": sum(sizes),
                        "loss": sum(nats) / tokens, "pieces": len(pieces),
                        "tokenizer": tokenizer.kind if tokenizer.kind == "byte"
                        else f"{tokenizer.kind} {tokenizer.vocab_size}",
                        "bits_per_byte": sum(nats) / math.log(2) / sum(sizes),
                        "piece_bits_per_byte": [n / math.log(2) / b
                                                for n, b in zip(nats, sizes, strict=True)]})
    return results


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean and standard error of a - b over paired pieces, and in how many a is lower."""
    diff = np.asarray(a) - np.asarray(b)                                      # (pieces,)
    error = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"mean": float(diff.mean()), "standard_error": error,
            "lower": int((diff < 0).sum()), "pieces": len(diff)}


def entries(also: list[str] | tuple[str, ...] = ()) -> dict[str, tuple[str, dict[str, Any]]]:
    """ENTRIES, then each preset of `also` trained as the main job is (size auto, every other
    setting at its default), for the question "would this preset be the better main job?"."""
    from .. import list_models

    unknown = sorted(set(also) - set(list_models()))
    if unknown:
        raise ValueError(f"quality: unknown preset(s) {unknown}; see `blockstate models`")
    if MAIN_JOB["model"] in also:
        raise ValueError(f"quality: {MAIN_JOB['model']} is the main job already; --also names "
                         f"other presets to train the same way")
    extra = {name: (f"{name} (size auto)", {"model": name}) for name in also}
    return {**ENTRIES, **extra}


def run_quality(out: Path | None, corpora: list[str], minutes: float, runs_dir: Path,
                eval_tokens: int = 400_000, cache_dir: str | None = None, overwrite: bool = False,
                command: str = "", also: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Train and score every entry (`entries(also)`) on every corpus; write `out`.{json,md}
    after each corpus."""
    chosen = entries(also)
    report: dict[str, Any] = {"kind": "quality", "command": command, "minutes": minutes,
                              "threads": torch.get_num_threads(), "eval_tokens": eval_tokens,
                              "machine": machine_info(torch.device("cpu")), "results": []}
    # the machine's float32 matmul rate at these threads: the denominator of MFU
    peak = measure_machine(torch.device("cpu"), 128, [], torch.float32)["matmul_peak_gflops"]
    report["matmul_peak_gflops"] = peak
    for corpus in corpora:
        run_dirs, summaries = [], []
        for slug, (name, fields) in chosen.items():
            # one folder per corpus under runs_dir, also for a path (never inside the corpus)
            run_dir = runs_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", corpus.strip("/")) / slug
            summary = _train_entry(name, fields, corpus, minutes * 60, run_dir, cache_dir, overwrite)
            run_dirs.append(run_dir)
            summaries.append(summary)
        scores = _score_same_bytes(run_dirs, corpus, eval_tokens)
        for (slug, (name, _)), run_dir, summary, score in zip(chosen.items(), run_dirs,
                                                              summaries, scores, strict=True):
            record = json.loads((run_dir / "train_config.json").read_text())
            report["results"].append({
                "corpus": corpus, "entry": name, "slug": slug, "run": str(run_dir),
                "parameters": summary["parameters"], "steps": summary["step"],
                "tokens": summary["tokens"], "train_seconds": summary["elapsed_s"],
                "tokens_per_s": summary["tokens_per_s"], "seq_len": record["seq_len"],
                # 6 FLOPs per parameter and token over the measured matmul rate
                "mfu": 6 * summary["parameters"] * summary["tokens_per_s"] / (peak * 1e9),
                "model": {k: record["model"][k] for k in ("d_model", "n_layers", "n_heads",
                                                          "block_size", "bst_layers")},
                "batch_size": record["train"]["batch_size"], "lr": record["train"]["lr"],
                "test": score, "sample": summary.get("sample")})
        print(quality_markdown(report), flush=True)
        if out is not None:
            write_outputs(out, report, False, quality_markdown)
    return report


def _comparison(corpus: str, main: dict[str, Any], other: dict[str, Any]) -> str:
    """One line: the main job against another entry, pooled and over paired pieces."""
    a, b = main["test"]["bits_per_byte"], other["test"]["bits_per_byte"]
    name = ("transformer (nanoGPT hyperparameters)" if other["slug"] == "nanogpt-cpu"
            else other["entry"])
    line = (f"- {corpus}: main job {a:.3f} vs {name} {b:.3f} bits per byte "
            f"({'better' if a < b else 'worse'} by {abs(a - b):.3f}, {abs(a - b) / b:.1%})")
    pieces = [main["test"].get("piece_bits_per_byte"), other["test"].get("piece_bits_per_byte")]
    if all(pieces):
        d = paired_difference(*pieces)
        line += (f"; over {d['pieces']} pieces the difference is {d['mean']:+.3f} +- "
                 f"{2 * d['standard_error']:.3f} (mean +- 2 standard errors), the main job "
                 f"lower on {d['lower']} of {d['pieces']}")
    return line + "."


def quality_markdown(report: dict[str, Any]) -> str:
    rows = []
    for r in report["results"]:
        m = r["model"]
        rows.append([r["corpus"], r["entry"], f"{r['parameters'] / 1e6:.2f}M",
                     f"{m['d_model']} x {m['n_layers']}, W={m['block_size']}, L={r['seq_len']}",
                     r["test"].get("tokenizer", "byte"),
                     f"{r['batch_size']} / {r['lr']:g}", f"{r['steps']:,}",
                     f"{r['tokens'] / 1e6:.2f}M", f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.0%}",
                     f"**{r['test']['bits_per_byte']:.3f}**"])
    lines = ["# Quality in equal minutes: the main job against the transformer preset with nanoGPT's "
             "CPU hyperparameters", "",
             f"`{report['command']}`: {report['minutes']:g} minutes of training each, one after "
             f"the other, {report['threads']} torch thread(s); held-out bits per byte on the "
             f"same ~{report['eval_tokens']:,} bytes of each corpus's test split (pieces of about "
             f"16 KB from every test document), each model with its own tokenizer (lower is "
             f"better). Machine: "
             f"{report['machine'].get('cpu', '?')}.", "",
             markdown_table(["corpus", "model", "parameters", "shape", "tokenizer", "batch / lr",
                             "steps", "tokens", "tokens/s", "MFU", "test bits/byte"], rows),
             "", f"MFU: 6 FLOPs per parameter and training token over the measured float32 matmul "
                 f"rate at these threads ({report['matmul_peak_gflops']:.0f} GFLOP/s, a 2048 x "
                 f"2048 product).", ""]
    by_corpus: dict[str, list[dict[str, Any]]] = {}
    for r in report["results"]:
        by_corpus.setdefault(r["corpus"], []).append(r)
    for corpus, results in by_corpus.items():
        main = next((r for r in results if r["slug"] == "main"), None)
        for other in results:
            if main is not None and other is not main:
                lines.append(_comparison(corpus, main, other))
    for r in report["results"]:
        if r.get("sample") and r["slug"] == "main":
            lines += ["", f"Sample of the main job on {r['corpus']} (prompt, then the model's "
                          f"continuation):", "", "```", r["sample"]["prompt"] + "│"
                      + r["sample"]["continuation"], "```"]
    return "\n".join(lines) + "\n"


__all__ = ["ENTRIES", "MAIN_JOB", "NANOGPT_CPU", "entries", "paired_difference",
           "quality_markdown", "run_quality"]
