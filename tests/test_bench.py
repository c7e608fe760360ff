"""The benchmark harness: FLOP counting, layer construction, report files and CLI errors (tiny sizes;
no timing is asserted)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from blockstate import bench
from blockstate.bench.layers import _extrapolate
from blockstate.cli import main


def test_flop_formulas_count_ffts_and_cpu_attention():
    with FlopCounterMode(display=False, custom_mapping=bench.flop_formulas()) as counter:
        spectrum = torch.fft.rfft(torch.randn(3, 1024))
        torch.fft.irfft(spectrum, n=1024)
    assert counter.get_total_flops() == 2 * int(3 * 2.5 * 1024 * 10)
    q = torch.randn(2, 2, 16, 8, requires_grad=True)
    mask = torch.zeros(1, 1, 16, 16)
    with FlopCounterMode(display=False, custom_mapping=bench.flop_formulas()) as counter:
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert counter.get_total_flops() == 4 * 2 * 2 * 16 * 16 * 8  # QK^T and AV


@pytest.mark.parametrize("name", bench.LAYERS)
def test_every_benchmarked_layer_builds_and_runs(name):
    config = bench.layer_config(32, 2, 64, block=16, state=4, context_states=4)
    layer = bench.build_layer(name, config)
    x = torch.randn(1, 64, 32)
    y = layer(x, torch.randn(1, 4 * 16, 32)) if name == "transformer-xl" else layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    if name == "brt":
        assert layer.initial_state.shape[0] == config.block_size  # S = W, as in the BRT paper
    fields = bench.BENCH_LAYERS[name][1]
    if fields.get("ssd_decay", "head") != "head":  # a selective kernel of another decay kind
        kernel = layer.context.ssm.kernel
        assert kernel.decay == fields["ssd_decay"]
        assert kernel.log_a.dim() == (2 if fields["ssd_decay"] == "rotary" else 3)
        assert (kernel.a_imag is not None) == (fields["ssd_decay"] in ("complex", "rotary"))
    if fields.get("ssm_method") == "fft":
        assert layer.context.ssm.method == "fft"


@pytest.mark.slow  # seconds: the whole suite runs it, the fast subset does not
def test_layer_benchmark_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "layers"
    report = bench.run_layers(out, [(32, 2)], [128, 256], ["bst-sh-s4", "slide", "brt"],
                              repeats=1, budget_s=1.0, command="test", log=lambda _: None,
                              memory=False)  # (test_cpu_peak_memory_tracks_the_tensors)
    assert len(report["results"]) == 6
    data = json.loads(out.with_suffix(".json").read_text())
    r = data["results"][0]
    assert r["forward"]["flops"] > 0 and r["forward_backward"]["flops"] > r["forward"]["flops"]
    assert r["forward"]["seconds"] > 0 and data["machine_limits"]["32"]["matmul_peak_gflops"] > 0
    text = out.with_suffix(".md").read_text()
    assert "speed-up over BRT" in text and "| bst-sh-s4 |" in text
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_cpu_peak_memory_tracks_the_tensors():
    """Measured in a process of its own (whose allocator maps every large block), the peak of the
    slide layer's forward+backward holds at least its input, output and their gradients, and
    grows in proportion to L (the layer is linear in L)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    peaks = [bench.cpu_peak_memory("slide", bench.layer_config(64, 2, length, block=16, state=4,
                                                               context_states=4),
                                   1, torch.float32) for length in (4096, 16384)]
    assert peaks[0] > 4 * 4096 * 64 * 4
    assert 3 < peaks[1] / peaks[0] < 5


@pytest.mark.slow  # seconds: the whole suite runs it, the fast subset does not
def test_long_lengths_are_skipped_by_extrapolation(tmp_path):
    report = bench.run_layers(None, [(32, 2)], [128, 256, 1 << 20], ["slide"], repeats=1,
                              budget_s=0.1, max_seconds=1.0, log=lambda _: None, memory=False)
    assert [s["length"] for s in report["skipped"]] == [1 << 20]
    assert math.isclose(_extrapolate([(1, 1.0), (2, 4.0)], 4), 16.0)
    assert math.isclose(_extrapolate([(1, 2.0), (2, 2.0)], 4), 4.0)  # at least linear


def test_bench_cli_errors(capsys):
    assert main(["bench", "layers", "--widths", "512:7"]) == 2
    assert "HEADS dividing WIDTH" in capsys.readouterr().err
    assert main(["bench", "layers", "--layers", "bst-xx"]) == 2
    assert "unknown layer" in capsys.readouterr().err
    assert main(["bench", "layers", "--lengths", "1000"]) == 2
    assert "multiples of the window" in capsys.readouterr().err
    assert main(["bench", "models", "--models", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["bench", "imports", "--repeats", "0"]) == 2
    assert "--repeats 0 must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["layers", "--new-tokens", "3"], ["models", "--widths", "64:2"],
                                  ["generation", "--steps", "2"], ["imports", "--device", "cpu"],
                                  ["quality", "--models", "slide"], ["layers", "--minutes", "1"]])
def test_each_bench_suite_takes_only_its_own_flags(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv])
    assert exit_.value.code == 2 and f"unrecognized arguments: {argv[1]}" in capsys.readouterr().err


@pytest.mark.slow  # seconds: the whole suite runs it, the fast subset does not
def test_models_benchmark(tmp_path):
    out = tmp_path / "models"
    assert main(["bench", "models", "--models", "bst-sh-s4,slide", "--size", "tiny", "--length", "64",
                 "--batch", "2", "--steps", "1", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["model"] for r in data["results"]] == ["bst-sh-s4", "slide"]
    for r in data["results"]:  # a training step is about 6 FLOPs per parameter and token
        assert 5 < r["flops_per_token"] / r["parameters"] < 8
        assert 0 < r["mfu"] == pytest.approx(r["achieved_gflops"]
                                             / data["machine_limits"]["matmul_peak_gflops"])
    assert "| bst-sh-s4 |" in out.with_suffix(".md").read_text()


def test_generation_benchmark(tmp_path):
    out = tmp_path / "generation"
    assert main(["bench", "generation", "--models", "bst-sh-s4,slide,transformer", "--size", "tiny",
                 "--lengths", "32,160", "--batches", "1,2", "--new-tokens", "3", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["model"], r["context"]): r for r in data["results"]}
    assert set(rows) == {(m, c) for m in ("bst-sh-s4", "slide", "transformer") for c in (32, 160)}
    b1, b2 = rows["bst-sh-s4", 160]["batches"]["1"], rows["bst-sh-s4", 160]["batches"]["2"]
    assert b1["steps"] == 3 and "slide_median_step_s" in b1
    assert b2["state_bytes"] == 2 * b1["state_bytes"] > 0  # the rows' state; constants apart
    assert rows["bst-sh-s4", 160]["constant_bytes"] > 0
    # full attention's cache grows with the context, the S4 model's does not
    size = {key: r["batches"]["1"]["state_bytes"] for key, r in rows.items()}
    assert size["transformer", 160] > size["transformer", 32]
    assert size["bst-sh-s4", 160] == size["bst-sh-s4", 32]
    text = out.with_suffix(".md").read_text()
    assert "| bst-sh-s4 | 160 |" in text and "vs slide b2" in text and "constants MiB" in text
    assert out.with_suffix(".png").stat().st_size > 0


def test_import_benchmark_reports_against_torch(tmp_path):
    report = bench.run_imports(tmp_path / "imports", repeats=1, log=lambda _: None,
                               imports={"torch": "import math", "blockstate": "import json"})
    assert set(report["median"]) == {"python", "torch", "blockstate"}
    assert report["blockstate_over_torch_s"] == report["median"]["blockstate"] - report["median"]["torch"]
    assert "| blockstate | `import json` |" in (tmp_path / "imports.md").read_text()


def test_counted_flops_equal_a_hand_count():
    """The slide layer at width 32 (2 heads of 16, MLP 128), W = 16, L = 128, counted by hand:
    per token 2 x (32 x 96 + 32 x 32 + 2 x 32 x 128) = 24,576 for the projections and the MLP;
    attention scores and values, 2 x 2 x 32 x keys, over 16 keys in block 0 and 32 (the block
    and the previous one) elsewhere: (16 x 2,048 + 112 x 4,096) / 128 = 3,840 per token."""
    config = bench.layer_config(32, 2, 128, block=16, state=4, context_states=4)
    result = bench.measure_layer("slide", config, 1, torch.device("cpu"), torch.float32, 1, 0.5,
                                 ("forward",))
    assert result["forward"]["flops"] == 128 * (24_576 + 3_840)
