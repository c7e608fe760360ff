"""scripts/gpu_check.sh, the one-command check of a CUDA machine, run in its CPU dry mode."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_the_check_names_every_test_file_that_needs_cuda():
    """The tests stage runs the files listed in CUDA_TESTS: a new CUDA-only test file is added there."""
    listed = set(re.search(r"^CUDA_TESTS=\(([^)]*)\)", SCRIPT.read_text(), re.M).group(1).split())
    asking = {f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py")
              if re.search(r"skipif\(.*torch\.cuda\.is_available\(\)", path.read_text())}
    assert listed == asking


@pytest.mark.slow
def test_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    """Every stage at toy sizes on the CPU: the CUDA tests (skipped here), a 3-step bf16 training
    run, the layer and generation benchmarks of BST:SH:S4, BRT and Slide; then the summary and the
    bundle."""
    out, log = tmp_path / "gpu_check", tmp_path / "log.txt"
    with log.open("w") as sink:  # a file, not a pipe: nothing waits on a stage left running
        result = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--python",
                                 sys.executable], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=sink, stderr=subprocess.STDOUT, timeout=300)
    assert result.returncode == 0, log.read_text()[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry-run" and summary["passed"]
    assert [s["status"] for s in summary["stages"].values()] == ["passed"] * 4
    counts = summary["tests"]["counts"]
    assert counts["failed"] == counts["error"] == 0 and counts["passed"] + counts["skipped"] >= 3
    assert summary["train"]["steps"] == 3 and summary["train"]["precision"] == "bf16"
    three = {"bst-sh-s4", "brt", "slide"}
    assert {r["layer"] for r in summary["layers"]["rows"]} == three
    assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 for r in summary["layers"]["rows"])
    assert {r["model"] for r in summary["generation"]["rows"]} == three
    markdown = (out / "summary.md").read_text()
    assert "all stages passed" in markdown and "| bst-sh-s4 | 256 |" in markdown
    with tarfile.open(out / "gpu_check.tar.gz") as bundle:
        names = bundle.getnames()
    assert "./summary.json" in names and "./layers/layers.json" in names
    assert not any("checkpoints" in name for name in names)


def test_a_failed_stage_fails_the_check(tmp_path):
    """The report marks a stage that failed or timed out, or whose outputs are missing, shows a
    training run cut short by its last logged step, and exits 1."""
    out = tmp_path / "gpu_check"
    out.mkdir()
    (out / "stages.tsv").write_text("tests\tpassed\t0\t3\ntrain\ttimeout\t124\t180\nlayers\tfailed\t2\t5\n")
    (out / "train" / "run").mkdir(parents=True)  # cut short: metrics, no summary
    (out / "train" / "run" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5.0 - s / 10, "tokens_per_s": 1e5, "elapsed": s / 2}) + "\n"
        for s in (1, 10, 20)))
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_report.py"), str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["passed"]
    assert [summary["stages"][s]["status"] for s in ("train", "layers", "generation")] == [
        "timeout", "failed", "not run"]
    train = summary["train"]
    assert not train["finished"] and train["steps"] == 20 and train["last_loss"] == 3.0
    markdown = (out / "summary.md").read_text()
    assert summary["tests"] is None and "no test report" in markdown and "did not finish" in markdown
    assert "no layer benchmark" in markdown and "NOT PASSED" in markdown
