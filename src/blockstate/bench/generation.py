"""Generation benchmark (`blockstate bench generation`): time per decoded token, tokens/s and
inference-state size against context length, for every preset, batch 1 and batch 8.

    blockstate bench generation --size small --lengths 1024,4096,16384,65536 --batches 1,8 \\
        --out docs/benchmarks/generation

For every model and context length C: one random prompt of C tokens is prefilled (timed: prefill
tokens/s), its cache is copied to each batch size (`InferenceCache.select`: the rows then hold the
same context, which does not change the work of a step), and `--new-tokens` one-token steps are
timed after a few warm-up steps. Reported per batch: the median step time (ms per step, each step
decoding one token per row), tokens/s from the mean step time (so the steps that complete a block,
which cost more for MF and BRT, are counted), and the bytes of the cache (`InferenceCache.nbytes`:
keys/values, states, histories and per-model step operators). Ratios: against the same model's
block-recompute path where the report holds it (batch 1; see below) and against `slide`'s
step at the same context and batch. Outputs `<out>.json` (after every measurement), `<out>.md` and
`<out>.png`.

The block-recompute generation that preceded the one-token step (each new token recomputed the
current block's positions through every layer) was measured beside it once, with `--old-path` at
commit 527bd9c, and then removed; docs/benchmarks/generation.md keeps that comparison, and a report
that holds such measurements still renders them.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..reporting import machine_info, markdown_table
from .report import write_outputs
from .timing import synchronize, timed_calls

WARMUP_STEPS = 4
ROUNDS = 6  # timed rounds per measurement, interleaved across contexts, batch sizes and models


class _Decoder:
    """Greedy one-token steps through a model's inference cache."""

    def __init__(self, model, cache, first: torch.Tensor):
        self.model, self.cache, self.tokens = model, cache, first

    def __call__(self) -> None:
        self.tokens = self.model.step(self.tokens, self.cache).argmax(-1)


def _summary(times: list[float], batch: int) -> dict:
    return {"median_step_s": statistics.median(times), "mean_step_s": statistics.mean(times),
            "tokens_per_s": batch / statistics.mean(times), "steps": len(times)}


def _prefilled(name: str, size: str, lengths: list[int], batches: list[int],
               device: torch.device, seed: int = 0) -> tuple[dict, dict]:
    """A model's decoders for every (context, batch), each from a prefill of a random prompt of
    that context length, and per context its parameters, prefill time and cache sizes."""
    from ..registry import build_model

    torch.manual_seed(seed)
    model = build_model(name, size, vocab_size=256).to(device).eval()
    decoders, info = {}, {}
    for context in lengths:
        prompt = torch.randint(0, 256, (1, context), device=device)
        cache = model.allocate_inference_cache(1)
        synchronize(device)
        t0 = time.perf_counter()
        first = model.prefill(prompt, cache)[:, -1].argmax(-1)
        synchronize(device)
        prefill_s = time.perf_counter() - t0
        info[context] = {"prefill_s": prefill_s, "prefill_tokens_per_s": context / prefill_s,
                         "parameters": model.num_parameters(), "state_bytes": {}}
        for b in batches:
            decoders[context, b] = _Decoder(model, cache.select([0] * b), first.repeat(b))
            info[context]["state_bytes"][b] = decoders[context, b].cache.nbytes(constants=False)
        info[context]["constant_bytes"] = cache.nbytes() - cache.nbytes(constants=False)
    return decoders, info


def measure(name: str, size: str, lengths: list[int], batches: list[int], new_tokens: int,
            device: torch.device, reference: dict | None = None) -> list[dict]:
    """One model at every context length and batch size: after the prefills and a few warm-up
    steps, ROUNDS rounds of new_tokens / ROUNDS timed steps for every (context, batch), each
    followed by the same number of steps of the `reference` model's decoder at the same context
    and batch (slide's), so that load on the machine hits all of them and the ratios alike."""
    with warnings.catch_warnings():  # unstructured kernels past their training length: timing only
        warnings.simplefilter("ignore", UserWarning)
        decoders, info = _prefilled(name, size, lengths, batches, device)
        reference = {k: v for k, v in (reference or {}).items() if k in decoders}
        times = {key: [] for key in decoders}
        ref_times = {key: [] for key in reference}
        rounds = max(1, min(ROUNDS, new_tokens))
        per_round = max(1, new_tokens // rounds)
        for decoder in [*decoders.values(), *reference.values()]:
            timed_calls(decoder, WARMUP_STEPS, device)
        keys = list(decoders)
        for r in range(rounds):  # each round starts at another (context, batch)
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                times[key] += timed_calls(decoders[key], per_round, device)
                if key in reference:
                    ref_times[key] += timed_calls(reference[key], per_round, device)
    results = []
    for context in lengths:
        if (context, batches[0]) not in decoders:
            continue
        r = {"model": name, "size": size, "context": context, "batches": {},
             **{k: v for k, v in info[context].items() if k != "state_bytes"}}
        for b in batches:
            r["batches"][str(b)] = {**_summary(times[context, b], b),
                                    "state_bytes": info[context]["state_bytes"][b]}
            if (context, b) in ref_times:
                r["batches"][str(b)]["slide_median_step_s"] = statistics.median(ref_times[context, b])
        results.append(r)
    return results


def run_generation(out: Path | None, presets: list[str], size: str, lengths: list[int],
                   batches: list[int], new_tokens: int, max_context_full_attention: int = 16384,
                   device: str = "cpu", command: str = "", log: Callable[[str], None] = print
                   ) -> dict:
    dev = torch.device(device)
    report = {"kind": "generation", "command": command, "machine": machine_info(dev),
              "size": size, "batches": batches, "new_tokens": new_tokens,
              "warmup_steps": WARMUP_STEPS, "rounds": ROUNDS, "results": [], "skipped": []}
    reference = None
    if "slide" in presets:  # interleaved beside every other model
        reference, _ = _prefilled("slide", size, lengths, batches, dev)
    for name in presets:
        use = lengths
        if name == "transformer":
            use = [n for n in lengths if n <= max_context_full_attention]
            report["skipped"] += [{"model": name, "context": n,
                                   "why": "full attention's prefill is quadratic"}
                                  for n in lengths if n > max_context_full_attention]
        load = os.getloadavg()
        for r in measure(name, size, use, batches, new_tokens, dev,
                         None if name == "slide" else reference):
            r["load_average_before"] = load
            report["results"].append(r)
            one = r["batches"][str(batches[0])]
            log(f"  {name} @ {r['context']}: {one['median_step_s'] * 1e3:.2f} ms/step at batch "
                f"{batches[0]}")
        if out is not None:
            write_outputs(out, report, False, generation_markdown, plot_generation)
    if out is not None:
        write_outputs(out, report, True, generation_markdown, plot_generation)
    return report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def generation_markdown(report: dict) -> str:
    info, batches = report["machine"], report["batches"]
    results = report["results"]
    slide = {(r["context"], b): r["batches"][b]["median_step_s"]
             for r in results if r["model"] == "slide" for b in r["batches"]}
    header = ["model", "context"]
    for b in batches:
        header += [f"ms/step b{b}", f"tok/s b{b}", f"vs slide b{b}"]
    header += [f"state MiB b{batches[0]}", "constants MiB", "prefill tok/s"]
    has_old = any("old_path" in r for r in results)
    if has_old:
        header += ["old path ms/token", "old / new"]
    rows = []
    for r in results:
        row = [r["model"], f"{r['context']:,}"]
        for b in map(str, batches):
            m = r["batches"][b]
            ref = m.get("slide_median_step_s", slide.get((r["context"], b)))
            row += [_ms(m["median_step_s"]), f"{m['tokens_per_s']:.0f}",
                    f"{m['median_step_s'] / ref:.2f}" if ref else "-"]
        row += [_mib(r["batches"][str(batches[0])]["state_bytes"]),
                _mib(r["constant_bytes"]) if "constant_bytes" in r else "-",
                f"{r['prefill_tokens_per_s']:.0f}"]
        if has_old:
            old = r.get("old_path")
            new = r["batches"][str(batches[0])]["median_step_s"] if str(batches[0]) == "1" else None
            row += ["-", "-"] if old is None else [
                _ms(old["median_step_s"]), f"{old['median_step_s'] / new:.1f}" if new else "-"]
        rows.append(row)
    flat = []
    for name in dict.fromkeys(r["model"] for r in results):
        steps = [r["batches"][str(batches[0])]["median_step_s"] for r in results if r["model"] == name]
        sizes = [r["batches"][str(batches[0])]["state_bytes"] for r in results if r["model"] == name]
        if len(steps) > 1:
            flat.append([name, f"{max(steps) / min(steps):.2f}", f"{max(sizes) / min(sizes):.2f}"])
    parts = [
        "# Generation benchmark", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {info['cpu']} ({info['cpus']} CPUs, {info['threads']} torch threads), torch "
        f"{info['torch']}, Python {info['python']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in info['load_average_at_start'])}.", "",
        f"Size `{report['size']}`, byte vocabulary (256), greedy decoding; {report['new_tokens']} "
        f"timed steps per measurement after {report['warmup_steps']} warm-up steps, in "
        f"{report['rounds']} rounds interleaved across contexts, batch sizes and slide's steps, "
        "each round starting at another context and batch. ms/step: median time of one step (one "
        "token for every row); tok/s: tokens per second from the mean step time; "
        "vs slide: ms/step over slide's at the same context and batch; state: bytes the "
        "inference cache holds for the rows after the prefill (keys/values, states, histories); "
        "constants: what it holds besides, computed once from the parameters and shared by the "
        "rows (step operators, stacked projections, kernel taps).", "",
        markdown_table(header, rows), "",
        "Spread over the context lengths (batch " + str(batches[0]) + "): largest over smallest",
        "", markdown_table(["model", "ms/step max / min", "state max / min"], flat),
    ]
    if report["skipped"]:
        parts += ["", "Skipped: " + "; ".join(f"{s['model']} at {s['context']:,} ({s['why']})"
                                              for s in report["skipped"])]
    return "\n".join(parts) + "\n"


def plot_generation(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = str(report["batches"][0])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["model"] for r in report["results"]):
        rows = [r for r in report["results"] if r["model"] == name]
        contexts = [r["context"] for r in rows]
        ax_t.plot(contexts, [r["batches"][batch]["median_step_s"] * 1e3 for r in rows], "o-",
                  label=name)
        ax_m.plot(contexts, [r["batches"][batch]["state_bytes"] / 2**20 for r in rows], "o-",
                  label=name)
    for ax, label in ((ax_t, f"ms per step (batch {batch})"), (ax_m, "inference cache (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["generation_markdown", "measure", "plot_generation", "run_generation"]
