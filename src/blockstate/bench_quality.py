"""`blockstate bench quality`: the README's main job against this project's `transformer` preset
trained with nanoGPT's CPU hyperparameters (not nanoGPT itself), in equal minutes.

For each corpus, one after the other in this process (same threads): the main job (`bst-sh-s4`,
size "auto" planned for the time budget, every other setting at its default) and the `transformer`
preset configured as nanoGPT's published CPU recipe (4 layers, 4 heads, width 128, context 64,
batch 12, lr 1e-3 decaying to 1e-4, warmup 100, beta2 0.99, weight decay 0.1, clip 1.0), each
trained for the same minutes on the same training split (the recipe with the byte tokenizer, the
main job with the tokenizer its plan picks). Both are then scored on the same bytes: whole
documents of the test split, each model reading them with its own tokenizer in windows of its own
training length. The report is held-out bits per byte. Finished runs are kept (the benchmark resumes where it
stopped); pass --overwrite to train them again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bench import machine_info, markdown_table, measure_machine, write_outputs

# nanoGPT's CPU recipe (README "I only have a macbook"): train_shakespeare_char with these flags.
NANOGPT_CPU: dict[str, Any] = {
    "model": "transformer", "size": "small", "seq_len": 64, "batch_size": 12, "lr": 1e-3,
    "min_lr_ratio": 0.1, "warmup_steps": 100, "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0,
    "model_overrides": {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512,
                        "block_size": 64, "max_seq_len": 64},
}
# The README quick start's main job: everything else at its default (size "auto").
MAIN_JOB: dict[str, Any] = {"model": "bst-sh-s4"}
# Each entry's run directory name (under --runs-dir/CORPUS), label and training fields.
ENTRIES: dict[str, tuple[str, dict[str, Any]]] = {
    "main": ("main job (bst-sh-s4, size auto)", MAIN_JOB),
    "nanogpt-cpu": ("transformer preset, nanoGPT's CPU hyperparameters", NANOGPT_CPU),
}


def _train_entry(name: str, fields: dict[str, Any], corpus: str, seconds: float, run_dir: Path,
                 cache_dir: str | None, overwrite: bool) -> dict[str, Any]:
    from .train import TrainConfig, train

    summary_path = run_dir / "summary.json"
    if summary_path.exists() and not overwrite:
        return json.loads(summary_path.read_text())
    config = TrainConfig(data=corpus, max_time=seconds, cache_dir=cache_dir, **fields)
    print(f"{corpus}: training {name} for {seconds:.0f} s -> {run_dir}", flush=True)
    return train(config, run_dir, overwrite=True, quiet=True)


def _same_documents(split, byte_lengths: np.ndarray, max_bytes: int) -> np.ndarray:
    """Test documents (indices, in a fixed pseudo-random order) that together hold about
    `max_bytes` bytes, counted from `split` tokenized with the tokenizer of `byte_lengths`."""
    order = np.random.default_rng(0).permutation(split.n_docs)
    chosen, total = [], 0
    for d in order:
        if total >= max_bytes:
            break
        start, end = split.doc_offsets[d], split.doc_offsets[d + 1]
        total += int(byte_lengths[np.asarray(split.tokens[start:end], np.int64)].sum())
        chosen.append(int(d))
    return np.sort(np.asarray(chosen, np.int64))


def _sub_split(split, docs: np.ndarray):
    """The documents `docs` of a tokenized split, as a split of their own."""
    from .data.dataset import TokenizedSplit

    pieces = [np.asarray(split.tokens[split.doc_offsets[d]:split.doc_offsets[d + 1]]) for d in docs]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    return TokenizedSplit(np.concatenate(pieces), offsets, 0, {}, split.path)


def _score_same_bytes(run_dirs: list[Path], corpus: str, eval_tokens: int, cache_dir: str | None,
                      batch_tokens: int = 8192) -> list[dict[str, Any]]:
    """Test-split loss of each run on the same bytes: whole test documents holding about
    `eval_tokens` bytes, each run reading them with its own tokenizer in windows of its own
    training length (every byte is predicted exactly once, whatever the tokenizer)."""
    from .data import default_cache_dir, resolve_corpus, tokenize_split
    from .data.dataset import PackedSequences
    from .evaluate import evaluate_length
    from .loading import load

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    source = resolve_corpus(corpus)
    loaded = [load(d) for d in run_dirs]
    lengths = [json.loads((d / "train_config.json").read_text())["seq_len"] for d in run_dirs]
    splits = [tokenize_split(source, tokenizer, "test", cache) for _, tokenizer in loaded]
    widths = [np.asarray(tokenizer.token_byte_lengths(), dtype=np.float64) for _, tokenizer in loaded]
    docs = _same_documents(splits[0], widths[0], eval_tokens)
    results = []
    for (model, tokenizer), length, split, width in zip(loaded, lengths, splits, widths, strict=True):
        part = _sub_split(split, docs)
        dataset = PackedSequences(part, length, tokenizer.pad_id)
        # all windows: every token but a document's first is a target once
        result = evaluate_length(model, dataset, width, None, batch_tokens, torch.device("cpu"),
                                 np.arange(len(dataset)), carry=False)
        results.append({"length": length, "loss": result["loss"], "tokens": result["tokens"],
                        "bytes": result["bytes"], "documents": len(docs),
                        "tokenizer": tokenizer.kind if tokenizer.kind == "byte"
                        else f"{tokenizer.kind} {tokenizer.vocab_size}",
                        "bits_per_byte": result["bits_per_byte"]})
    if len({r["bytes"] for r in results}) != 1:
        raise ValueError(f"the runs predicted different numbers of bytes of the same documents "
                         f"({[r['bytes'] for r in results]}): a tokenizer does not count bytes exactly")
    return results


def run_quality(out: Path | None, corpora: list[str], minutes: float, runs_dir: Path,
                eval_tokens: int = 200_000, cache_dir: str | None = None, overwrite: bool = False,
                command: str = "") -> dict[str, Any]:
    """Train and score every entry on every corpus; write `out`.{json,md} after each corpus."""
    report: dict[str, Any] = {"kind": "quality", "command": command, "minutes": minutes,
                              "threads": torch.get_num_threads(), "eval_tokens": eval_tokens,
                              "machine": machine_info(torch.device("cpu")), "results": []}
    # the machine's float32 matmul rate at these threads: the denominator of MFU
    peak = measure_machine(torch.device("cpu"), 128, [], torch.float32)["matmul_peak_gflops"]
    report["matmul_peak_gflops"] = peak
    for corpus in corpora:
        run_dirs, summaries = [], []
        for slug, (name, fields) in ENTRIES.items():
            # one folder per corpus under runs_dir, also for a path (never inside the corpus)
            run_dir = runs_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", corpus.strip("/")) / slug
            summary = _train_entry(name, fields, corpus, minutes * 60, run_dir, cache_dir, overwrite)
            run_dirs.append(run_dir)
            summaries.append(summary)
        scores = _score_same_bytes(run_dirs, corpus, eval_tokens, cache_dir)
        for (slug, (name, _)), run_dir, summary, score in zip(ENTRIES.items(), run_dirs,
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
            write_outputs(out, report, plot=False, render=quality_markdown)
    return report


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
             f"same ~{report['eval_tokens']:,} bytes (whole documents) of each corpus's test "
             f"split, each model with its own tokenizer (lower is better). Machine: "
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
        if len(results) == 2:
            a, b = (r["test"]["bits_per_byte"] for r in results)
            lines.append(f"- {corpus}: main job {a:.3f} vs transformer (nanoGPT hyperparameters) "
                         f"{b:.3f} bits per byte "
                         f"({'better' if a < b else 'worse'} by {abs(a - b):.3f}, "
                         f"{abs(a - b) / b:.1%}).")
    for r in report["results"]:
        if r.get("sample") and r["slug"] == "main":
            lines += ["", f"Sample of the main job on {r['corpus']} (prompt, then the model's "
                          f"continuation):", "", "```", r["sample"]["prompt"] + "│"
                      + r["sample"]["continuation"], "```"]
    return "\n".join(lines) + "\n"


__all__ = ["ENTRIES", "MAIN_JOB", "NANOGPT_CPU", "quality_markdown", "run_quality"]
