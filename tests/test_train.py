import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blockstate
from blockstate.checkpoint import load_latest_intact
from blockstate.cli import main
from blockstate.optim import learning_rate
from blockstate.train import TrainConfig, train
from blockstate.train_config import parse_duration

from reference import word_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """120 small documents of structured text: learnable, and every split non-empty."""
    return word_corpus(tmp_path_factory.mktemp("corpus"))


def _config(corpus: Path, tmp: Path, **kw) -> TrainConfig:
    fields = dict(model="bst-sh-s4", size="tiny", data=str(corpus), seq_len=64, batch_size=4,
                  warmup_steps=2, eval_every=1000, eval_batches=2, save_every=1000, log_every=1,
                  sample_tokens=0, cache_dir=str(tmp / "cache"),
                  model_overrides={"dropout": 0.1, "block_size": 16})
    fields.update(kw)
    return TrainConfig(**fields)


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "split" not in r}


def test_parse_duration_and_schedule():
    assert parse_duration("5m") == 300 and parse_duration("1.5h") == 5400 and parse_duration("90") == 90
    with pytest.raises(ValueError, match="duration"):
        parse_duration("5 minutes")
    config = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=110)
    assert learning_rate(0, config, 110) == pytest.approx(0.1)
    assert learning_rate(10, config, 110) == pytest.approx(1.0)
    assert learning_rate(109, config, 110) == pytest.approx(0.1, abs=1e-3)
    # budgeted by time only: the cosine follows the fraction of the time after warmup spent
    timed = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_time=60)
    assert learning_rate(5, timed, None, None) == pytest.approx(0.6)
    assert learning_rate(500, timed, None, 0.0) == pytest.approx(1.0)
    assert learning_rate(500, timed, None, 0.5) == pytest.approx(0.55)
    assert learning_rate(500, timed, None, 1.3) == pytest.approx(0.1)


@pytest.mark.slow
def test_time_budget_ends_at_the_final_learning_rate(corpus, tmp_path):
    """A run with only a time budget reaches (close to) its final learning rate at its end, not
    before: the schedule runs on time, whatever the speed of the steps. Each step's place in the
    cosine, read back from its learning rate, equals the share of the post-warmup time spent when
    it began (its end in metrics.jsonl less its duration), so the check holds on a loaded machine
    too, where steps are slow."""
    budget, peak, floor = 4.0, 1e-3, 1e-4
    train(_config(corpus, tmp_path, max_time=budget, lr=peak, min_lr_ratio=0.1), tmp_path / "run",
          quiet=True)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "lr" in r]
    assert len(records) >= 3 and [r["step"] for r in records] == list(range(1, len(records) + 1))
    lrs = [r["lr"] for r in records]
    assert all(a >= b - 1e-12 for a, b in zip(lrs[3:], lrs[4:], strict=False))  # decays
    tokens = [0] + [r["tokens"] for r in records]
    starts = [r["elapsed"] - (t1 - t0) / r["tokens_per_s"]
              for r, t0, t1 in zip(records, tokens, tokens[1:], strict=False)]
    warmup_end = starts[2]  # the first step after the 2 warmup steps starts the cosine (a slow
    # machine may run only a few steps in the budget: each is checked, however many there are)
    for start, lr in zip(starts[2:], lrs[2:], strict=True):
        on_time = min(1.0, (start - warmup_end) / (budget - warmup_end))
        in_cosine = math.acos(max(-1.0, min(1.0, 2 * (lr - floor) / (peak - floor) - 1))) / math.pi
        assert abs(in_cosine - on_time) < 0.02, (start, lr)
    # it stops once the budget is spent, not before: the last step began within the budget, and
    # the clock read at the boundary that stopped the run (the summary's) is past it. The last
    # record's own time may fall just short: writing it and the bookkeeping after a step come
    # between it and that boundary (the step's start is read a moment after the boundary's clock)
    assert starts[-1] < budget + 0.01
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["elapsed_s"] >= budget and summary["step"] == records[-1]["step"]
    if starts[-1] >= 0.9 * budget:  # steps short enough for the last to begin in the last tenth
        assert lrs[-1] < 0.2e-3                   # at the end: near the floor of 1e-4


def test_training_reduces_loss_and_writes_a_run(corpus, tmp_path):
    summary = train(_config(corpus, tmp_path, max_steps=30, lr=3e-3), tmp_path / "run", quiet=True)
    losses = _losses(tmp_path / "run")
    assert losses[30] < 0.6 * losses[1]
    assert summary["validation"]["perplexity"] < summary["unigram_perplexity"]
    run = tmp_path / "run"
    assert (run / "train_config.json").exists() and (run / "tokenizer" / "tokenizer.json").exists()
    assert (run / "checkpoints" / "latest").exists()


@pytest.mark.parametrize("model,extra", [("bst-sh-s4", {}), ("transformer-xl", {}),
                                         ("brt", {"grad_accum": 2}),
                                         ("bst-sh-s4", {"precision": "fp16"})])
def test_resume_reproduces_the_uninterrupted_run(corpus, tmp_path, model, extra):
    """Also for the segment-recurrent baselines, whose carried memory (Transformer-XL's inputs,
    BRT's state and window) is saved with the checkpoint."""
    config = _config(corpus, tmp_path, model=model, max_steps=6, save_every=3, **extra)
    train(config, tmp_path / "a", quiet=True)

    def crash(step, record):
        if step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, tmp_path / "b", quiet=True, on_step=crash)
    if model != "bst-sh-s4":
        from blockstate.checkpoint import load_checkpoint
        assert load_checkpoint(tmp_path / "b").memory() is not None
    train(config, tmp_path / "b", resume=True, quiet=True)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 7))
    assert a == b  # bitwise: same data order, dropout masks, optimizer state, schedule and memory


def test_existing_run_is_never_overwritten_silently(corpus, tmp_path):
    train(_config(corpus, tmp_path, max_steps=1), tmp_path / "run", quiet=True)
    with pytest.raises(ValueError, match="--resume"):
        train(_config(corpus, tmp_path, max_steps=1), tmp_path / "run", quiet=True)
    train(_config(corpus, tmp_path, max_steps=1), tmp_path / "run", overwrite=True, quiet=True)


def test_gradient_accumulation_matches_a_full_batch(corpus, tmp_path):
    cfg = dict(max_steps=3, model_overrides={"dropout": 0.0, "block_size": 16})
    train(_config(corpus, tmp_path, **cfg), tmp_path / "full", quiet=True)
    train(_config(corpus, tmp_path, grad_accum=2, **cfg), tmp_path / "accum", quiet=True)
    full, accum = _losses(tmp_path / "full"), _losses(tmp_path / "accum")
    assert all(abs(full[s] - accum[s]) < 1e-5 for s in full)


@pytest.mark.slow
def test_ddp_two_processes_match_one(corpus, tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        f'model = "bst-sh-s4"\nsize = "tiny"\ndata = "{corpus}"\nseq_len = 64\nbatch_size = 4\n'
        f'warmup_steps = 2\nmax_steps = 3\neval_batches = 1\nlog_every = 1\nsample_tokens = 0\n'
        f'cache_dir = "{tmp_path / "cache"}"\n[model_overrides]\nblock_size = 16\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "blockstate.cli", "train", "--config", str(cfg), "--out",
                    str(tmp_path / "single"), "--quiet"], check=True, env=env, cwd=ROOT, timeout=120)
    # --standalone: a free port, so that runs of this test side by side do not collide
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    "2", "-m", "blockstate.cli", "train", "--config", str(cfg),
                    "--out", str(tmp_path / "ddp"), "--quiet"], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=180)
    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert sorted(single) == sorted(ddp) == [1, 2, 3]
    assert all(abs(single[s] - ddp[s]) < 1e-5 for s in single), (single, ddp)


def _ddp_config(corpus: Path, tmp_path: Path) -> Path:
    """A tiny run's settings without a budget (each test gives its own on the command line)."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        f'model = "bst-sh-s4"\nsize = "tiny"\ndata = "{corpus}"\nseq_len = 64\nbatch_size = 4\n'
        f'warmup_steps = 2\neval_batches = 1\nlog_every = 1\nsample_tokens = 0\n'
        f'cache_dir = "{tmp_path / "cache"}"\n[model_overrides]\nblock_size = 16\n')
    return cfg


def _torchrun(report: Path, hooks: list[str], cli: list[str], timeout: float = 90) -> int:
    """Two gloo processes of `blockstate train` through tests/ddp_worker.py (test-only hooks; each
    process writes report/rank<R>.json). A run that outlasts `timeout` (processes waiting for each
    other) is killed with all its processes and fails the test."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(ROOT / "tests" / "ddp_worker.py"), "--report", str(report), *hooks, "--",
               *cli, "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    report.mkdir(parents=True, exist_ok=True)
    log = report / "output.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun starts each worker in a session of its own: kill them by the pids they wrote
            os.killpg(process.pid, signal.SIGKILL)
            for pid_file in report.glob("pid*"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            process.wait()
            pytest.fail(f"the processes did not finish in {timeout} s (one waits for the other):\n"
                        f"{log.read_text()[-3000:]}")
    missing = [r for r in (0, 1) if not (report / f"rank{r}.json").exists()]
    assert not missing, (f"rank(s) {missing} did not finish (exit {process.returncode}):\n"
                         f"{log.read_text()[-3000:]}")
    return process.returncode


def _ranks(report: Path) -> list[dict]:
    return [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_time_budget_is_agreed_with_a_slow_process(corpus, tmp_path):
    """Under --max-time the processes stop at the same step and use the same (process 0's) clock for
    the time-based learning rate, though process 1 starts its clock 1.5 s late and is slower at
    every step: the same learning rates, the same last step and bitwise equal parameters, and no
    process left waiting for the other (before, each read its own clock: process 0 stopped first
    and process 1 waited in an all-reduce, with other learning rates all along)."""
    report = tmp_path / "report"
    code = _torchrun(report, ["--slow-rank", "1", "--start-delay", "1.5", "--step-delay", "0.02"],
                     ["train", "--config", str(_ddp_config(corpus, tmp_path)), "--out",
                      str(tmp_path / "run"), "--max-time", "4s"])
    first, second = _ranks(report)
    assert code == 0 and first["exit"] == second["exit"] == 0
    assert first["final_step"] == second["final_step"] >= 3
    assert first["steps"] == second["steps"]  # the same step numbers and learning rates, bitwise
    assert first["parameters"] == second["parameters"]
    lrs = [lr for _, lr in first["steps"]]
    assert len(lrs) == 3 or lrs[-1] < lrs[2]  # after warmup, the cosine on (process 0's) time
    assert load_latest_intact(tmp_path / "run").train_state["step"] == first["final_step"]


@pytest.mark.slow
def test_ddp_sigterm_to_one_process_stops_all_and_resumes(corpus, tmp_path):
    """SIGTERM sent to process 1 alone: both stop after the same step, a checkpoint of that step is
    written and the run reports the signal; --resume continues from it to the budget with the
    processes still in step. Process 0 takes 2 s to write each checkpoint: process 1 waits for it
    before it exits with 143 (else torchrun, seeing a process fail, stops process 0 mid-write)."""
    cfg, run = _ddp_config(corpus, tmp_path), tmp_path / "run"
    _torchrun(tmp_path / "stopped", ["--sigterm-rank", "1", "--sigterm-at-step", "2",
                                     "--save-delay", "2"],
              ["train", "--config", str(cfg), "--out", str(run), "--max-steps", "6"])
    first, second = _ranks(tmp_path / "stopped")
    assert first["final_step"] == second["final_step"] == 3  # the step under way when it came
    assert first["exit"] == second["exit"] == 143  # both report SIGTERM, process 0 never got it
    assert first["parameters"] == second["parameters"]
    assert load_latest_intact(run).train_state["step"] == 3
    assert json.loads((run / "summary.json").read_text())["interrupted"] == "SIGTERM"
    code = _torchrun(tmp_path / "resumed", [], ["train", "--config", str(cfg), "--out", str(run),
                                                "--max-steps", "6", "--resume"])
    first, second = _ranks(tmp_path / "resumed")
    assert code == 0 and first["exit"] == second["exit"] == 0
    assert [s for s, _ in first["steps"]] == [3, 4, 5] and first["steps"] == second["steps"]
    assert first["parameters"] == second["parameters"]
    assert sorted(_losses(run)) == [1, 2, 3, 4, 5, 6]
    assert load_latest_intact(run).train_state["step"] == 6


def test_eval_json_by_length(corpus, tmp_path, capsys):
    train(_config(corpus, tmp_path, max_steps=2), tmp_path / "run", quiet=True)
    assert main(["eval", str(tmp_path / "run"), "--data", str(corpus), "--lengths", "32,64,256",
                 "--json", "--plot", str(tmp_path / "loss.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["lengths"]) == {"32", "64", "256"}
    for m in [result, *result["lengths"].values()]:
        # perplexity is exp(loss); with the byte tokenizer no scored token is longer than a byte,
        # so bits per byte are at least loss / ln 2; two steps leave the loss near uniform's
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-9)
        assert m["bits_per_byte"] >= m["loss"] / math.log(2) - 1e-9
        assert 0.5 * math.log(259) < m["loss"] < 1.5 * math.log(259)
    assert result["perplexity"] == result["lengths"]["64"]["perplexity"]  # the training length
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert result["aligned"]  # 32 and 64 divide 256: every length scores the same tokens
    assert len({m["tokens"] for m in result["lengths"].values()}) == 1


def test_precision_and_activation_checkpointing_options(corpus, tmp_path, capsys):
    """bf16 autocast trains on the CPU too; activation checkpointing does not change the run;
    evaluation can be forced to float32."""
    plain = train(_config(corpus, tmp_path, max_steps=3, model_overrides={"block_size": 16}),
                  tmp_path / "plain", quiet=True)
    checkpointed = train(_config(corpus, tmp_path, max_steps=3, activation_checkpointing=True,
                                 model_overrides={"block_size": 16}), tmp_path / "ckpt", quiet=True)
    assert _losses(tmp_path / "ckpt") == pytest.approx(_losses(tmp_path / "plain"), abs=1e-5)
    assert checkpointed["validation"]["loss"] == pytest.approx(plain["validation"]["loss"], abs=1e-5)
    records = []
    bf16 = train(_config(corpus, tmp_path, max_steps=3, precision="bf16", peak_tflops=0.001,
                         model_overrides={"block_size": 16}), tmp_path / "bf16", quiet=True,
                 on_step=lambda step, record: records.append(record))
    # bf16 autocast changes the numbers, but not by much: same loss as fp32 within tolerance
    assert bf16["validation"]["loss"] != pytest.approx(plain["validation"]["loss"], abs=1e-6)
    assert bf16["validation"]["loss"] == pytest.approx(plain["validation"]["loss"], abs=0.05)
    # MFU from a given peak: 6 FLOPs per parameter and token over the peak
    parameters = json.loads((tmp_path / "bf16" / "train_config.json").read_text())["parameters"]
    assert records[-1]["mfu"] == pytest.approx(6 * parameters * records[-1]["tokens_per_s"] / 1e9)
    # float16 with dynamic loss scaling: close to fp32 too, and the scaler's state is checkpointed
    fp16 = train(_config(corpus, tmp_path, max_steps=3, precision="fp16",
                         model_overrides={"block_size": 16}), tmp_path / "fp16", quiet=True)
    assert fp16["validation"]["loss"] != pytest.approx(plain["validation"]["loss"], abs=1e-6)
    assert fp16["validation"]["loss"] == pytest.approx(plain["validation"]["loss"], abs=0.05)
    assert load_latest_intact(tmp_path / "fp16").train_state["grad_scaler"]["_growth_tracker"] == 3
    train(_config(corpus, tmp_path, max_steps=5, precision="fp16", model_overrides={"block_size": 16}),
          tmp_path / "fp16", resume=True, quiet=True)  # the scaler continues where it stopped
    assert load_latest_intact(tmp_path / "fp16").train_state["grad_scaler"]["_growth_tracker"] == 5
    assert load_latest_intact(tmp_path / "plain").train_state["grad_scaler"] is None
    assert main(["eval", str(tmp_path / "bf16"), "--precision", "fp32", "--max-tokens", "500",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "fp32"
    with pytest.raises(ValueError, match="precision='fp8'"):
        _config(corpus, tmp_path, precision="fp8")


@pytest.mark.slow  # seconds: the whole suite runs it, the fast subset does not
def test_metrics_sinks_with_the_real_packages(corpus, tmp_path, monkeypatch):
    """The tensorboard and wandb extras themselves (setup.sh installs both): TensorBoard's event
    files hold metrics.jsonl's losses; an offline Weights & Biases run records the train and
    validation metrics and the run config in the run directory; --overwrite removes both."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(_config(corpus, tmp_path, max_steps=2, log_to="tensorboard,wandb", eval_every=2), run,
          quiet=True)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx(_losses(run), rel=1e-6)
    assert "validation/loss" in events.Tags()["scalars"]
    (record,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data = record.read_bytes()
    assert b"train/loss" in data and b"validation/loss" in data and b"max_steps" in data
    train(_config(corpus, tmp_path, max_steps=1, log_to="none"), run, overwrite=True, quiet=True)
    assert not (run / "wandb").exists() and not (run / "tensorboard").exists()


def test_metrics_sinks(corpus, tmp_path, monkeypatch):
    """--log-to: none writes metrics.jsonl only; wandb gets the run config and every float metric
    (a stand-in module records the calls); a sink that is not installed is named with its pip
    command; unknown sinks are refused."""
    import sys
    import types

    train(_config(corpus, tmp_path, max_steps=2, log_to="none"), tmp_path / "none", quiet=True)
    assert not (tmp_path / "none" / "tensorboard").exists()
    calls = {"log": []}

    class FakeRun:
        url = None

        def log(self, scalars, step):
            calls["log"].append((step, scalars))

        def finish(self):
            calls["finish"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    train(_config(corpus, tmp_path, max_steps=2, log_to="wandb", eval_every=2),
          tmp_path / "wb", quiet=True)
    assert calls["init"]["name"] == "wb" and calls["init"]["config"]["train"]["max_steps"] == 2
    assert [step for step, _ in calls["log"]][:2] == [1, 2] and calls["finish"]
    assert "train/loss" in calls["log"][0][1]
    assert any("validation/loss" in scalars for _, scalars in calls["log"])
    monkeypatch.setitem(sys.modules, "wandb", None)                 # not installed
    with pytest.raises(ValueError, match="pip install wandb"):
        train(_config(corpus, tmp_path, max_steps=1, log_to="wandb"), tmp_path / "wb2", quiet=True)
    assert not (tmp_path / "wb2").exists()                          # refused before any file
    with pytest.raises(ValueError, match="log_to='mlflow'"):
        _config(corpus, tmp_path, log_to="mlflow")


@pytest.mark.parametrize("max_tokens", [None, 300])
def test_aligned_windows_score_the_same_targets(max_tokens):
    import numpy as np

    from blockstate.data.dataset import PackedSequences, TokenizedSplit
    from blockstate.evaluate import aligned_windows, spread_windows

    offsets = np.cumsum([0, 5, 70, 1, 33, 128, 129, 2, 300])                   # awkward documents
    tokens = np.arange(offsets[-1], dtype=np.uint16)
    split = TokenizedSplit(tokens, offsets, 0, {}, Path("."))
    outer = PackedSequences(split, 64, pad_id=0)
    chosen = spread_windows(outer, max_tokens)

    def targets(dataset, indices):
        t = dataset.batch(indices.tolist())[1].flatten()
        return sorted(t[t != -100].tolist())

    expected = targets(outer, chosen)
    for n in (1, 8, 16, 32, 64):
        inner = PackedSequences(split, n, pad_id=0)
        assert targets(inner, aligned_windows(inner, outer, chosen)) == expected
    with pytest.raises(ValueError, match="does not divide"):
        aligned_windows(PackedSequences(split, 24, pad_id=0), outer, chosen)


def _cli_error(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("blockstate: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_give_one_line_errors(corpus, tmp_path, capsys):
    base = ["train", "--model", "bst-sh-s4", "--size", "tiny", "--max-steps", "1", "--quiet",
            "--cache-dir", str(tmp_path / "cache")]
    assert "does-not-exist" in _cli_error(base + ["--data", str(tmp_path / "does-not-exist"),
                                                  "--out", str(tmp_path / "r1")], capsys)
    (tmp_path / "empty").mkdir()
    _cli_error(base + ["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r2")], capsys)
    assert "budget" in _cli_error(["train", "--size", "tiny", "--data", str(corpus), "--out",
                                   str(tmp_path / "r3")], capsys)
    assert "n_layers" in _cli_error(base + ["--data", str(corpus), "--out", str(tmp_path / "r4"),
                                            "--set", "n_layers=0"], capsys)
    # foreign and corrupted checkpoints, tokenizer mismatch
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "checkpoint.json").write_text('{"hello": 1}')
    _cli_error(["eval", str(tmp_path / "foreign"), "--data", str(corpus)], capsys)
    run = tmp_path / "run"
    train(_config(corpus, tmp_path, max_steps=1, seq_len=32), run, quiet=True)
    step_dir = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    weights = step_dir / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    assert "corrupt" in _cli_error(["eval", str(run), "--data", str(corpus)], capsys)
    weights.write_bytes(good)
    cfg = json.loads((step_dir / "checkpoint.json").read_text())
    cfg["model_config"]["vocab_size"] = 300
    (step_dir / "checkpoint.json").write_text(json.dumps(cfg))
    assert "tokenizer mismatch" in _cli_error(["eval", str(run), "--data", str(corpus)], capsys)


def test_non_utf8_text_is_read_not_crashed_on(tmp_path):
    root = tmp_path / "latin1"
    root.mkdir()
    for i in range(60):
        (root / f"d{i}.txt").write_bytes(("caf\xe9 cr\xe8me " * 40).encode("latin-1"))
    summary = train(_config(root, tmp_path, max_steps=2), tmp_path / "run", quiet=True)
    assert summary["step"] == 2


@pytest.mark.parametrize("model", ["transformer-xl", "brt"])
def test_segment_recurrent_models_train_and_evaluate_with_carried_memory(corpus, tmp_path, capsys,
                                                                          model):
    run = tmp_path / model
    summary = train(_config(corpus, tmp_path, model=model, max_steps=40, lr=3e-3,
                            seq_len=32), run, quiet=True)
    losses = _losses(run)
    assert losses[40] < 0.7 * losses[1]
    assert summary["validation"]["perplexity"] < summary["unigram_perplexity"]
    assert main(["eval", str(run), "--data", str(corpus), "--lengths", "32,64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lengths"]["64"]["tokens"] > 0


def test_segment_stream_rows_continue_their_documents(corpus, tmp_path):
    from blockstate.data import ByteTokenizer, PackedSequences, SegmentStream, resolve_corpus, tokenize_split

    split = tokenize_split(resolve_corpus(str(corpus)), ByteTokenizer(), "train", tmp_path / "cache")
    data = PackedSequences(split, 32, ByteTokenizer().pad_id)
    stream = SegmentStream(data, 4, seed=1)
    lanes, keep = stream.lanes()
    doc_of = stream.doc_of
    for lane, kept in zip(lanes, keep, strict=True):
        for t in range(1, len(lane)):
            same = doc_of[lane[t]] == doc_of[lane[t - 1]]
            assert kept[t] == same
            if same:  # consecutive windows of one document
                assert data.starts[lane[t]] == data.starts[lane[t - 1]] + 32
    assert not keep[:, 0].any()
    batches = [stream.next_batch() for _ in range(3)]
    state = stream.state_dict()
    after = stream.next_batch()
    replay = SegmentStream(data, 4, seed=1)
    replay.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, replay.next_batch(), strict=True))
    two = [SegmentStream(data, 4, seed=1, rank=r, world_size=2).next_batch()[0] for r in range(2)]
    assert torch.equal(torch.cat(two), batches[0][0])


def test_generate_cli_streams_from_a_checkpoint(corpus, tmp_path, capsys):
    train(_config(corpus, tmp_path, max_steps=2), tmp_path / "run", quiet=True)
    assert main(["generate", str(tmp_path / "run"), "--prompt", "document 7\n", "--max-new-tokens",
                 "12", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("document 7\n") and len(out) > len("document 7\n")
    assert "empty" in _cli_error(["generate", str(tmp_path / "run"), "--prompt", ""], capsys)
    assert "exactly one" in _cli_error(["generate", str(tmp_path / "run")], capsys)
    assert "--threads -1" in _cli_error(["generate", str(tmp_path / "run"), "--prompt", "x",
                                         "--threads", "-1"], capsys)
    threads = torch.get_num_threads()
    try:  # one thread gives the same greedy text
        assert main(["generate", str(tmp_path / "run"), "--prompt", "document 7\n",
                     "--max-new-tokens", "12", "--temperature", "0", "--threads", "1"]) == 0
        assert capsys.readouterr().out == out and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    # the same greedy continuation through the Python loading API
    model, tokenizer = blockstate.load(tmp_path / "run")
    ids = model.generate([tokenizer.encode("document 7\n")], 12, temperature=0)[0]
    assert out.startswith(tokenizer.decode(ids)) and len(ids) > len(tokenizer.encode("document 7\n"))
    steps = sorted(p for p in (tmp_path / "run").glob("checkpoints/step-*") if p.is_dir())
    assert not model.training and blockstate.load(steps[-1])[0].config == model.config
    # exported in the Hugging Face layout, it loads and generates the same
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    exported, exported_tokenizer = blockstate.load(tmp_path / "hf")
    assert exported.generate([tokenizer.encode("document 7\n")], 12, temperature=0)[0] == ids
    assert exported_tokenizer.fingerprint() == tokenizer.fingerprint()
    assert "not an empty directory" in _cli_error(["export", str(tmp_path / "run"),
                                                    str(tmp_path / "hf")], capsys)


def test_loss_by_block_range_doubles_from_one_block():
    from blockstate.evaluate import loss_by_block_range

    count = torch.ones(100, dtype=torch.float64)      # one token at each position...
    count[90:] = 0                                     # ...but padding, not scored, at the end
    loss = torch.arange(100, dtype=torch.float64) * count   # summed loss: p at position p
    ranges = loss_by_block_range(loss, count, 16)
    assert [(r["start"], r["end"], r["tokens"]) for r in ranges] == [
        (0, 16, 16), (16, 32, 16), (32, 64, 32), (64, 100, 26)]
    assert ranges[1]["loss"] == sum(range(16, 32)) / 16
    assert ranges[3]["loss"] == sum(range(64, 90)) / 26


def test_segment_recurrent_models_can_train_on_shuffled_windows_without_memory(corpus, tmp_path):
    from blockstate.checkpoint import load_checkpoint

    run = tmp_path / "xl"
    train(_config(corpus, tmp_path, model="transformer-xl", max_steps=3, save_every=3,
                  carry_memory=False), run, quiet=True)
    checkpoint = load_checkpoint(run)
    assert checkpoint.memory() is None                       # nothing carried
    # the shuffled-window stream counts sequences (a lane stream would count batches: 3)
    assert checkpoint.train_state["data"]["position"] == 3 * 4


def test_a_planned_tokenizer_that_cannot_be_trained_falls_back_to_bytes_only_when_asked(tmp_path):
    """prepare_tokenizer: too little text for the vocabulary raises, unless the caller (a budget
    plan, not the user, chose the tokenizer) passes `fall_back`, which gets the reason."""
    from blockstate.data import DirectoryCorpus, TokenizerError
    from blockstate.train import prepare_tokenizer

    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"d{i}.txt").write_text("a tiny text\n" * 3)
    corpus = DirectoryCorpus(tmp_path / "corpus", validation=0, test=0)
    config = TrainConfig(tokenizer="bpe", vocab_size=4000)
    with pytest.raises(TokenizerError):
        prepare_tokenizer(config, corpus, tmp_path / "run1", is_main=True)
    lines = []
    tokenizer = prepare_tokenizer(config, corpus, tmp_path / "run2", is_main=True,
                                  fall_back=lines.append)
    assert tokenizer.kind == "byte" and len(lines) == 1 and "byte tokenizer instead" in lines[0]
