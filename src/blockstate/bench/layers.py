"""Layer level (`blockstate bench layers`): single layers against the baselines, by length.

    blockstate bench layers --widths 512:16,256:4 --lengths 1024,2048,4096,8192,16384,32768,65536 \\
        --out docs/benchmarks/layers

For every layer and sequence length, the forward time (no gradients, kernels recomputed every
call, as in training), the forward+backward time, the peak memory of each, and the FLOPs of each
counted from the operations actually run (`torch.utils.flop_counter`, with FFTs counted as
2.5 n log2 n per real transform of size n and the CPU attention kernels added). Times are medians
of repeats after a warm-up. In the same run the machine is measured (matrix-multiply GFLOP/s at
the layer's shapes and FFT throughput at the sizes used), so every layer gets an achieved FLOP
rate and its fraction of the measured matmul peak, and ratios against the Block-Recurrent and
sliding-window layers come from the same run. Longer lengths are skipped for a layer once its
time or memory, extrapolated from the two previous lengths, would exceed the limits. On the CPU
the peak memory of each measurement is taken in a process of its own (`cpu_peak_memory`).

Outputs: `<out>.json` (written after every measurement), `<out>.md` and `<out>.png`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig, merge, nest, paths
from ..layers import BlockAttentionLayer, BlockRecurrentLayer, BSTLayer, GSSLayer, XLLayer
from ..reporting import machine_info, markdown_table
from ..ssm import SSM
from .report import write_outputs
from .timing import PeakMemory, map_large_blocks, measure_call, measure_machine

# The layer benchmark's layers: single layers at `layer_config`'s shape, not model presets. Each
# name maps to its layer class and the config overrides it sets (`ModelConfig.with_overrides`
# spellings); where a preset shares the name, the layer is that preset's BST layer.


def _bst(variant: str, kernel: str, **ssm: Any) -> tuple[type[nn.Module], dict[str, Any]]:
    return BSTLayer, {"context": variant, "ssm": {"kind": kernel, **ssm}}


BENCH_LAYERS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    **{f"bst-{v}-{k}": _bst(v, k) for v in ("sh", "mh", "mf") for k in ("s4", "s4d", "unstruct")},
    "bst-sh-ssd": _bst("sh", "ssd"),
    "bst-mf-ssd": _bst("mf", "ssd"),
    # The selective kernel with another decay kind: S6's decay per state dimension, rotating
    # complex modes, and the same with one real decay per head.
    "bst-sh-ssd-state": _bst("sh", "ssd", decay="state"),
    "bst-sh-ssd-complex": _bst("sh", "ssd", decay="complex"),
    "bst-mf-ssd-complex": _bst("mf", "ssd", decay="complex"),
    "bst-sh-ssd-rotary": _bst("sh", "ssd", decay="rotary"),
    "bst-mf-ssd-rotary": _bst("mf", "ssd", decay="rotary"),
    # The FFT path of a structured kernel, the reference the chunked path is timed against.
    "bst-sh-s4-fft": _bst("sh", "s4", method="fft"),
    "bst-sh-s4d-fft": _bst("sh", "s4d", method="fft"),
    # BRT keeps S = W recurrent states as in the Block-Recurrent Transformer paper; Transformer-XL
    # attends over a memory of 4W positions (the paper's Trsf-XL:2048 at W = 512); "gss" is one GSS
    # layer with F = 3D as in the GSS paper (the gss-hybrid preset stacks them with attention).
    "brt": (BlockRecurrentLayer, {"arch": "brt", "self_attention": "sliding"}),
    "slide": (BlockAttentionLayer, {"self_attention": "sliding"}),
    "transformer-xl": (XLLayer, {"arch": "transformer-xl"}),
    "transformer": (BlockAttentionLayer, {"self_attention": "full"}),
    "gss": (GSSLayer, {"ssm": "s4d", "arch": {"kind": "gss-hybrid", "expansion": 3}}),
}
LAYERS = tuple(BENCH_LAYERS)
# Drawn as solid lines in the layer plot: the single-head BST layers and the two main baselines.
PLOTTED_SOLID = tuple(name for name, (_, fields) in BENCH_LAYERS.items()
                      if fields.get("context") == "sh") + ("brt", "slide")


def layer_config(width: int, heads: int, length: int, block: int = 128, state: int = 16,
                 context_states: int = 32) -> ModelConfig:
    """The paper's speed-benchmark layer (width 512, 16 heads, window 128, SSM state 16) by default."""
    return ModelConfig(d_model=width, n_heads=heads, block_size=block, max_seq_len=length,
                       rel_pos_max_distance=block, ssm={"kind": "s4", "state_size": state},
                       context={"kind": "mf", "states": context_states})


def build_layer(name: str, config: ModelConfig) -> nn.Module:
    """Layer `name` of `BENCH_LAYERS` on `config` with the layer's own fields set; the sizes of
    `config`'s components (state size, context states) carry over to the layer's kinds."""
    if name not in BENCH_LAYERS:
        raise ValueError(f"unknown layer {name!r}; known layers: {', '.join(LAYERS)}")
    layer, fields = BENCH_LAYERS[name]
    # not `config.with_overrides`: the kinds of `config` do not carry over (a layer that sets no
    # context kind gets SH's, whose SSM width GSS uses), only their sizes
    sizes = {k: v for k, v in paths(config.to_dict()).items() if not k.endswith("kind")}
    return layer(ModelConfig.from_dict(merge([nest(sizes, lenient=True), nest(fields)])))


def _clear_ssm_caches(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, SSM):
            m.clear_cache()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # bench layers --dtype


def layer_calls(name: str, config: ModelConfig, batch: int, device: torch.device,
                dtype: torch.dtype, compile_layer: bool = False):
    """The layer and its three benchmark calls: (layer, forward without gradients, forward with
    gradients (what the FLOP counter runs), forward+backward)."""
    torch.manual_seed(0)
    layer = build_layer(name, config).to(device)
    x = torch.randn(batch, config.max_seq_len, config.d_model, device=device)
    memory = None
    if name == "transformer-xl":  # the previous segment's last positions, as many as it attends to
        memory = torch.randn(batch, layer.self_attn.memory_length, config.d_model, device=device)
    call = torch.compile(layer) if compile_layer else layer

    def run(inp):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return call(inp, memory) if memory is not None else call(inp)

    def forward():
        _clear_ssm_caches(layer)
        with torch.no_grad():
            run(x)

    grad = torch.randn_like(x)
    xg = x.clone().requires_grad_(True)

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        xg.grad = None
        run(xg).float().backward(grad)

    return layer, forward, (lambda: run(x)), forward_backward


def measure_layer(name: str, config: ModelConfig, batch: int, device: torch.device,
                  dtype: torch.dtype, repeats: int, budget_s: float, passes: tuple[str, ...],
                  compile_layer: bool = False, memory: bool = True) -> dict:
    layer, forward, counted, forward_backward = layer_calls(name, config, batch, device, dtype,
                                                            compile_layer)
    result = {"layer": name + ("+compile" if compile_layer else ""), "length": config.max_seq_len,
              "width": config.d_model, "heads": config.n_heads, "batch": batch,
              "parameters": sum(p.numel() for p in layer.parameters())}
    if "forward" in passes:
        # FLOPs are counted with gradients on (the counter's module tracker needs them): the same
        # operations run.
        result["forward"] = measure_call(forward, device, repeats, budget_s, count=counted)
    if "backward" in passes:
        result["forward_backward"] = measure_call(forward_backward, device, repeats, budget_s)
        if device.type == "cpu" and memory:
            del layer, forward, counted, forward_backward
            result["forward_backward"]["peak_bytes"] = cpu_peak_memory(name, config, batch, dtype,
                                                                       compile_layer)
    return result


def cpu_peak_memory(name: str, config: ModelConfig, batch: int, dtype: torch.dtype,
                    compile_layer: bool = False) -> int | None:
    """Peak memory of the layer's forward+backward on the CPU (bytes; None where it cannot be
    measured): the rise of peak RSS over a call, the smaller of two after a warm-up, in a fresh
    Python process whose allocator maps every large block (`map_large_blocks`)."""
    spec = {"name": name, "config": config.to_dict(), "batch": batch,
            "dtype": str(dtype).removeprefix("torch."),
            "compile": compile_layer, "threads": torch.get_num_threads()}
    child = "from blockstate.bench.layers import _child_peak_memory; _child_peak_memory()"
    done = subprocess.run([sys.executable, "-c", child], input=json.dumps(spec), capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the peak memory of {name} at L = {config.max_seq_len} "
                           f"failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def _child_peak_memory() -> None:
    """`cpu_peak_memory`'s process: reads its spec from stdin, prints {"peak_bytes": ...}."""
    mapped = map_large_blocks()
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])
    dtype = DTYPES[spec["dtype"]]
    device = torch.device("cpu")
    *_, forward_backward = layer_calls(spec["name"], ModelConfig.from_dict(spec["config"]),
                                       spec["batch"], device, dtype, spec["compile"])
    forward_backward()  # warm-up: caches, lazily built buffers
    memory, peaks = PeakMemory(device), []
    for _ in range(2):
        memory.start()
        forward_backward()
        peak = memory.stop()
        if peak is not None:
            peaks.append(peak)
    print(json.dumps({"peak_bytes": min(peaks) if peaks and mapped else None}))


def _extrapolate(points: list[tuple[int, float]], length: int) -> float:
    """Value at `length` from the last two (length, value) points, growing at least linearly."""
    if not points:
        return 0.0
    (l1, v1), = points[-1:]
    exponent = 1.0
    if len(points) >= 2:
        l0, v0 = points[-2]
        if v0 > 0 and v1 > 0 and l1 != l0:
            exponent = max(1.0, math.log(v1 / v0) / math.log(l1 / l0))
    return v1 * (length / l1) ** exponent


def run_layers(out: Path | None, widths: list[tuple[int, int]], lengths: list[int],
               layers: list[str], batch: int = 1, device: str = "cpu", dtype: str = "float32",
               repeats: int = 3, budget_s: float = 20.0, max_seconds: float = 30.0,
               max_memory_fraction: float = 0.5, compile_layers: tuple[str, ...] = (),
               command: str = "", log: Callable[[str], None] = print, memory: bool = True) -> dict:
    """Time every layer at every width and length (forward, forward+backward) and measure its peak
    memory (`memory`: on the CPU, in a child process per measurement); lengths predicted to take
    more than max_seconds, or more than max_memory_fraction of the device's memory, are skipped."""
    dev = torch.device(device)
    torch_dtype = DTYPES[dtype]
    total_memory = (torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda"
                    else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    report = {"kind": "layers", "command": command, "machine": machine_info(dev), "batch": batch,
              "dtype": dtype, "widths": [list(w) for w in widths], "lengths": lengths,
              "machine_limits": {}, "results": [], "skipped": []}
    if dev.type == "cpu":  # timed with glibc's own thresholds; memory in a child (map_large_blocks)
        report["cpu_peak_memory"] = "child process"
    for width, heads in widths:
        report["machine_limits"][str(width)] = limits = measure_machine(dev, width, lengths, torch_dtype)
        log(f"width {width}: matmul peak {limits['matmul_peak_gflops']:.1f} GFLOP/s")
        names = list(layers) + [f"{n}+compile" for n in compile_layers]
        for name in names:
            base, compiled = name.removesuffix("+compile"), name.endswith("+compile")
            seen: list[tuple[int, float, float]] = []
            for length in lengths:
                predicted_s = _extrapolate([(n, s) for n, s, _ in seen], length)
                predicted_b = _extrapolate([(n, b) for n, _, b in seen], length)
                if predicted_s > max_seconds or predicted_b > max_memory_fraction * total_memory:
                    report["skipped"].append({"layer": name, "width": width, "length": length,
                                              "predicted_seconds": predicted_s,
                                              "predicted_bytes": predicted_b})
                    log(f"  {name} L={length}: skipped (predicted {predicted_s:.1f} s, "
                        f"{predicted_b / 2**30:.1f} GiB)")
                    continue
                config = layer_config(width, heads, length)
                r = measure_layer(base, config, batch, dev, torch_dtype, repeats, budget_s,
                                  ("forward", "backward"), compile_layer=compiled, memory=memory)
                fb = r["forward_backward"]
                seen.append((length, fb["seconds"], fb["peak_bytes"] or 0))
                report["results"].append(r)
                log(f"  {name} L={length}: forward {r['forward']['seconds'] * 1e3:.1f} ms, "
                    f"forward+backward {fb['seconds'] * 1e3:.1f} ms, "
                    f"peak {(fb['peak_bytes'] or 0) / 2**20:.0f} MiB")
                if out is not None:
                    write_outputs(out, report, False, layers_markdown, plot_layers)
    if out is not None:
        write_outputs(out, report, True, layers_markdown, plot_layers)
    return report


def _fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else (f"{seconds * 1e3:.0f}" if seconds >= 0.1 else f"{seconds * 1e3:.1f}")


def _lookup(results: list[dict], width: int) -> dict[tuple[str, int], dict]:
    return {(r["layer"], r["length"]): r for r in results if r["width"] == width}


def layers_markdown(report: dict, reference_length: int = 8192) -> str:
    info = report["machine"]
    parts = [
        "# Layer benchmark", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {info['cpu']} ({info['cpus']} CPUs), device {info['device']}"
        + (f" ({info['gpu']})" if "gpu" in info else "") + f", {info['threads']} threads, "
        f"torch {info['torch']}, Python {info['python']}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in info['load_average_at_start'])}. Batch {report['batch']}, "
        f"{report['dtype']}. Times are medians after a warm-up, in ms; forward runs without "
        f"gradients and recomputes SSM kernels; peak memory is that of forward+backward"
        + (" (on the CPU, measured in a process of its own: see `cpu_peak_memory`)."
           if report.get("cpu_peak_memory") == "child process" else "."), "",
    ]
    for width, heads in report["widths"]:
        if str(width) not in report["machine_limits"]:  # not reached yet (written mid-run)
            continue
        limits = report["machine_limits"][str(width)]
        table = _lookup(report["results"], width)
        names = list(dict.fromkeys(r["layer"] for r in report["results"] if r["width"] == width))
        lengths = [n for n in report["lengths"] if any((name, n) in table for name in names)]
        parts += [f"## Width {width}, {heads} heads, window 128, SSM state 16", "",
                  "Measured limits: matmul " + ", ".join(
                      f"{k}: {v:.1f} GFLOP/s" for k, v in limits["matmul_gflops"].items())
                  + "; FFT (rfft+irfft, " + ", ".join(
                      f"L={k}: {v['gflops']:.1f} GFLOP/s" for k, v in limits["fft"].items()) + ").", ""]
        for key, title in (("forward", "Forward (ms)"), ("forward_backward", "Forward + backward (ms)")):
            rows = [[name] + [_fmt_ms(table[(name, n)][key]["seconds"]) if (name, n) in table else "-"
                              for n in lengths] for name in names]
            parts += [f"### {title}", "", markdown_table(["layer"] + [f"L={n}" for n in lengths], rows), ""]
        rows = []
        for name in names:
            cells = []
            for n in lengths:
                peak = table[(name, n)]["forward_backward"]["peak_bytes"] if (name, n) in table else None
                cells.append("-" if peak is None else f"{peak / 2**20:.0f}")
            rows.append([name] + cells)
        parts += ["### Peak memory, forward + backward (MiB)", "",
                  markdown_table(["layer"] + [f"L={n}" for n in lengths], rows), ""]
        ref = reference_length if reference_length in lengths else (lengths[-1] if lengths else None)
        if ref is None:
            continue
        brt, slide = table.get(("brt", ref)), table.get(("slide", ref))
        peak = limits["matmul_peak_gflops"]
        rows = []
        for name in names:
            r = table.get((name, ref))
            if r is None:
                continue
            f, fb = r["forward"], r["forward_backward"]
            rows.append([
                name, _fmt_ms(f["seconds"]), _fmt_ms(fb["seconds"]),
                f"{brt['forward']['seconds'] / f['seconds']:.2f}x" if brt else "-",
                f"{f['seconds'] / slide['forward']['seconds']:.2f}x" if slide else "-",
                f"{f['flops'] / 1e9:.1f}", f"{f['flops'] / f['seconds'] / 1e9:.1f}",
                f"{100 * f['flops'] / f['seconds'] / 1e9 / peak:.0f}%",
                f"{fb['flops'] / fb['seconds'] / 1e9:.1f}",
                "-" if fb["peak_bytes"] is None else f"{fb['peak_bytes'] / 2**20:.0f}"])
        parts += [f"### At L={ref}", "",
                  "Speed-up over BRT = BRT forward time / layer forward time; vs Slide = layer forward "
                  "time / Slide forward time. GFLOP counted from the operations run; % of peak against "
                  f"the measured matmul peak ({peak:.1f} GFLOP/s).", "",
                  markdown_table(["layer", "fwd ms", "fwd+bwd ms", "speed-up over BRT", "vs Slide",
                          "fwd GFLOP", "fwd GFLOP/s", "% of matmul peak", "fwd+bwd GFLOP/s",
                          "peak MiB"], rows), ""]
    if report["skipped"]:
        parts += ["Skipped (predicted over the time or memory limit): " + ", ".join(
            f"{s['layer']} at width {s['width']} L={s['length']}" for s in report["skipped"]) + ".", ""]
    return "\n".join(parts)


def plot_layers(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = report["widths"]
    fig, axes = plt.subplots(len(widths), 2, figsize=(12, 4.5 * len(widths)), squeeze=False)
    for row, (width, heads) in enumerate(widths):
        results = [r for r in report["results"] if r["width"] == width]
        for col, key in enumerate(("forward", "forward_backward")):
            ax = axes[row][col]
            for name in dict.fromkeys(r["layer"] for r in results):
                pts = [(r["length"], r[key]["seconds"] * 1e3) for r in results if r["layer"] == name]
                style = "o-" if name in PLOTTED_SOLID else ".--"
                ax.plot(*zip(*pts, strict=True), style, label=name, linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("ms")
            ax.set_title(f"{key.replace('_', ' + ')}, width {width}, {heads} heads")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["BENCH_LAYERS", "DTYPES", "LAYERS", "build_layer", "cpu_peak_memory", "layer_calls",
           "layer_config", "layers_markdown", "measure_layer", "plot_layers", "run_layers"]
