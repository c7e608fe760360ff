"""The failure matrix of `blockstate train` / `eval` / `generate`: a user's data is never lost,
training is never silently wrong, and bad input gets one line naming the problem."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blockstate import ModelConfig, build_model
from blockstate.checkpoint import CheckpointError, load_checkpoint
from blockstate.cli import main
from blockstate.rundir import RunLock, read_metrics
from blockstate.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _write_corpus(root: Path, n: int = 80) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        words = [WORDS[(i * 7 + j * (i % 5 + 1)) % len(WORDS)] for j in range(60)]
        (root / f"doc{i:03d}.txt").write_text(f"document {i}\n" + " ".join(words) + "\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


def _config(corpus: Path, tmp: Path, **kw) -> TrainConfig:
    fields = dict(model="bst-sh-s4", size="tiny", data=str(corpus), seq_len=64, batch_size=4,
                  warmup_steps=2, eval_every=1000, eval_batches=2, save_every=1000, log_every=1,
                  sample_tokens=0, cache_dir=str(tmp / "cache"), max_steps=4,
                  model_overrides={"block_size": 16, "dropout": 0.1})
    fields.update(kw)
    return TrainConfig(**fields)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


# ---------------------------------------------------------------- never lose data

def test_overwrite_never_removes_foreign_files_or_the_corpus(corpus, tmp_path):
    foreign = tmp_path / "paper"
    foreign.mkdir()
    (foreign / "draft.tex").write_text("precious")
    with pytest.raises(ValueError, match="draft.tex"):
        train(_config(corpus, tmp_path), foreign, overwrite=True, quiet=True)
    assert (foreign / "draft.tex").read_text() == "precious"
    # the corpus inside the output directory (the case that deleted a user's data)
    out = tmp_path / "od"
    data = _write_corpus(out / "data", 40)
    train(_config(data, tmp_path, max_steps=1), out / "run", quiet=True)  # a run beside it is fine
    with pytest.raises(ValueError, match="data"):
        train(_config(data, tmp_path, max_steps=1), out, overwrite=True, quiet=True)
    assert len(list(data.iterdir())) == 40
    # a failing request removes nothing either: the unknown corpus is found before any removal
    run = tmp_path / "run"
    train(_config(corpus, tmp_path, max_steps=1), run, quiet=True)
    with pytest.raises(ValueError, match="corpus"):
        train(_config(corpus, tmp_path, data="no-such-corpus"), run, overwrite=True, quiet=True)
    assert load_checkpoint(run).step == 1
    # a run is replaced; a file of the user's inside it (an evaluation plot) is kept
    (run / "loss.png").write_bytes(b"plot")
    train(_config(corpus, tmp_path, max_steps=2), run, overwrite=True, quiet=True)
    assert load_checkpoint(run).step == 2 and (run / "loss.png").read_bytes() == b"plot"


def test_a_second_writer_is_refused_with_the_holders_pid(corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        with pytest.raises(ValueError, match=f"in use by another process \\(PID {os.getpid()}\\)"):
            train(_config(corpus, tmp_path), run, quiet=True)
    train(_config(corpus, tmp_path, max_steps=1), run, quiet=True)  # released: accepted


def test_metrics_survive_a_kill_during_the_resume_rewrite(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(_config(corpus, tmp_path, max_steps=4, save_every=2), run, quiet=True)
    before = (run / "metrics.jsonl").read_text()

    def killed(*args):
        raise KeyboardInterrupt  # dies between writing the new file and renaming it

    monkeypatch.setattr("blockstate.rundir.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_config(corpus, tmp_path, max_steps=6, save_every=2), run, resume=True, quiet=True)
    assert (run / "metrics.jsonl").read_text() == before  # untouched, never half-written


def test_partial_last_metrics_line_is_repaired_and_a_corrupt_one_named(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(_config(corpus, tmp_path, max_steps=2, save_every=2), run, quiet=True)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a full disk or a kill mid-line
    train(_config(corpus, tmp_path, max_steps=3, save_every=2), run, resume=True)
    assert "partial last line" in capsys.readouterr().out
    assert sorted(_losses(run)) == [1, 2, 3]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:1] + ["garbage"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl: line 2"):
        train(_config(corpus, tmp_path, max_steps=4, save_every=2), run, resume=True, quiet=True)


def test_a_full_disk_leaves_the_last_checkpoint_and_a_resumable_run(corpus, tmp_path, monkeypatch):
    import blockstate.checkpoint as ck

    run = tmp_path / "run"
    real = ck.save_file
    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 3:  # the second checkpoint's files: ENOSPC
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint"):
        train(_config(corpus, tmp_path, max_steps=4, save_every=2), run, quiet=True)
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]
    assert load_checkpoint(run).step == 2
    monkeypatch.setattr(ck, "save_file", real)
    train(_config(corpus, tmp_path, max_steps=4, save_every=2), run, resume=True, quiet=True)
    assert load_checkpoint(run).step == 4


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path, capsys):
    config = _config(corpus, tmp_path, max_steps=6, save_every=2)
    train(config, tmp_path / "a", quiet=True)
    run = tmp_path / "b"
    train(_config(corpus, tmp_path, max_steps=4, save_every=2), run, quiet=True)
    model_file = run / "checkpoints" / "step-00000004" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-7] + b"corrupt")
    train(config, run, resume=True)
    out = capsys.readouterr().out
    assert "skipping checkpoint step-00000004" in out and "at step 2" in out
    assert _losses(run) == _losses(tmp_path / "a")  # steps 3-6 retrained exactly
    # --resume PATH: from an explicit step directory
    train(config, run, resume=run / "checkpoints" / "step-00000004", quiet=True)
    assert _losses(run) == _losses(tmp_path / "a")


# ---------------------------------------------------------------- never train silently wrong

def test_sigint_stops_at_a_step_boundary_and_resumes_exactly(corpus, tmp_path):
    config = _config(corpus, tmp_path, max_steps=6, save_every=1000)
    train(config, tmp_path / "a", quiet=True)

    def interrupt(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C, in the middle of the run

    summary = train(config, tmp_path / "b", quiet=True, on_step=interrupt)
    assert summary["interrupted"] == "SIGINT" and summary["step"] == 3
    assert load_checkpoint(tmp_path / "b").train_state["data"]["position"] == 3 * 4  # 3 batches
    train(config, tmp_path / "b", resume=True, quiet=True)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")  # bitwise


@pytest.mark.slow
def test_sigterm_to_the_cli_exits_143_with_a_resumable_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "blockstate.cli", "train", "--model", "bst-sh-s4", "--size",
               "tiny", "--data", str(corpus), "--out", str(run), "--seq-len", "64", "--batch-size",
               "4", "--max-steps", "100000", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not _losses(run):  # step 1 is logged: training is under way
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "SIGTERM: stopped at step" in err and "Traceback" not in err
    step = load_checkpoint(run).step
    assert step >= 1 and f"stopped at step {step};" in err


@pytest.mark.slow
def test_sigint_to_the_cli_resumes_exactly(corpus, tmp_path):
    """Ctrl-C sent to a `blockstate train` process at some step: it exits 130, and resuming
    reproduces the loss curve of an uninterrupted run bitwise (all runs in subprocesses, one
    thread each, so that their arithmetic is the same)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(run, *extra):
        return [sys.executable, "-m", "blockstate", "train", "--model", "bst-sh-s4", "--size", "tiny",
                "--data", str(corpus), "--out", str(run), "--seq-len", "64", "--batch-size", "4",
                "--max-steps", "40", "--log-every", "1", "--eval-every", "1000",
                "--sample-tokens", "0", "--cache-dir", str(tmp_path / "cache"), "--quiet", *extra]

    subprocess.run(command(tmp_path / "a"), cwd=ROOT, env=env, check=True, capture_output=True)
    run = tmp_path / "b"
    process = subprocess.Popen(command(run), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(_losses(run)) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    stopped = load_checkpoint(run).step
    assert process.returncode == 130 and "Traceback" not in err, err
    assert stopped < 40  # interrupted before the end
    subprocess.run([sys.executable, "-m", "blockstate", "train", "--out", str(run), "--resume",
                    "--max-steps", "40", "--quiet"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    assert _losses(run) == _losses(tmp_path / "a")


def test_a_leftover_tokenizer_is_not_reused_by_a_run_that_asks_for_another(corpus, tmp_path):
    run = tmp_path / "run"

    def crash(step, record):
        raise RuntimeError("killed before the first checkpoint")

    with pytest.raises(RuntimeError):
        train(_config(corpus, tmp_path, max_steps=3), run, quiet=True, on_step=crash)
    # a plain rerun of the same request is accepted (nothing to resume), and so is --resume
    train(_config(corpus, tmp_path, max_steps=1), run, quiet=True)
    with pytest.raises(RuntimeError):
        train(_config(corpus, tmp_path, max_steps=3), tmp_path / "again", quiet=True, on_step=crash)
    assert train(_config(corpus, tmp_path, max_steps=1), tmp_path / "again", resume=True,
                 quiet=True)["step"] == 1
    # a request for another tokenizer gets it, not the byte tokenizer left behind
    with pytest.raises(RuntimeError):
        train(_config(corpus, tmp_path, max_steps=3, tokenizer="bpe", vocab_size=300),
              tmp_path / "other", quiet=True, on_step=crash)
    with pytest.raises(ValueError, match="other settings"):
        train(_config(corpus, tmp_path, max_steps=2), tmp_path / "other", quiet=True)
    train(_config(corpus, tmp_path, max_steps=1), tmp_path / "other", overwrite=True, quiet=True)
    saved = json.loads((tmp_path / "other" / "tokenizer" / "tokenizer.json").read_text())
    assert saved["kind"] == "byte"
    for attempt in range(2):
        with pytest.raises(RuntimeError):
            train(_config(corpus, tmp_path, max_steps=3, tokenizer="byte" if attempt == 0 else "bpe",
                          vocab_size=300), tmp_path / "third", quiet=True, on_step=crash,
                  overwrite=attempt == 1)
    saved = json.loads((tmp_path / "third" / "tokenizer" / "tokenizer.json").read_text())
    assert saved["kind"] == "sentencepiece" and saved["vocab_size"] == 300


def test_resume_on_a_changed_corpus_is_refused_unless_allowed(tmp_path):
    data = _write_corpus(tmp_path / "data", 40)
    run = tmp_path / "run"
    train(_config(data, tmp_path, max_steps=1, save_every=1), run, quiet=True)
    (data / "new.txt").write_text("a document added after the run started\n" * 20)
    with pytest.raises(ValueError, match="changed since"):
        train(_config(data, tmp_path, max_steps=2, save_every=1), run, resume=True, quiet=True)
    train(_config(data, tmp_path, max_steps=2, save_every=1), run, resume=True, quiet=True,
          allow_changed_data=True)
    saved = json.loads((run / "train_config.json").read_text())["train"]["data"]
    assert Path(saved).is_absolute()  # a resume from another working directory finds it


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_losses_are_skipped_or_stop_and_are_never_saved(corpus, tmp_path, monkeypatch,
                                                                    policy):
    import blockstate.train as tr

    real, calls = tr.token_loss, []

    def sometimes_nan(model, inputs, targets, device, **forward):
        calls.append(1)
        total, losses = real(model, inputs, targets, device, **forward)
        return (total * float("nan") if len(calls) == 3 else total), losses

    monkeypatch.setattr(tr, "token_loss", sometimes_nan)
    run = tmp_path / policy
    config = _config(corpus, tmp_path, max_steps=4, nonfinite=policy)
    if policy == "stop":
        with pytest.raises(ValueError, match="non-finite loss"):
            train(config, run, quiet=True)
    else:
        train(config, run, quiet=True)
        assert sorted(_losses(run)) == [1, 2, 3, 4]
    records = read_metrics(run / "metrics.jsonl")  # valid JSON throughout
    assert any(r.get("skipped_batch") for r in records)
    state = load_checkpoint(run).model_state()
    assert all(torch.isfinite(t).all() for t in state.values())


def test_fp16_overflow_lowers_the_loss_scale_and_skips_only_that_step(corpus, tmp_path, monkeypatch):
    """A step whose scaled float16 gradients overflow (its loss blown up 1e4-fold here: finite in
    float32, not in float16 gradients) is skipped by the gradient scaler, which halves its scale;
    training goes on to its budget with finite parameters."""
    import blockstate.train as tr

    real, calls = tr.token_loss, []

    def one_huge(model, inputs, targets, device, **forward):
        calls.append(1)
        total, losses = real(model, inputs, targets, device, **forward)
        return (total * 1e4 if len(calls) == 2 else total), losses

    monkeypatch.setattr(tr, "token_loss", one_huge)
    run = tmp_path / "fp16"
    train(_config(corpus, tmp_path, max_steps=3, precision="fp16"), run, quiet=True)
    records = read_metrics(run / "metrics.jsonl")
    overflow = [r for r in records if r.get("reason") == "fp16 overflow"]
    assert len(overflow) == 1 and overflow[0]["loss_scale"] == 2.0 ** 15
    assert sorted(_losses(run)) == [1, 2, 3]                  # the budget is still 3 steps
    checkpoint = load_checkpoint(run)
    assert checkpoint.train_state["grad_scaler"]["scale"] == 2.0 ** 15
    assert all(torch.isfinite(t).all() for t in checkpoint.model_state().values())


# ---------------------------------------------------------------- one-line errors

def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


CASES = [
    (["--set", "n_layers=abc"], "n_layers='abc' is not valid"),
    (["--config", "TOML:lr = \"fast\""], "lr='fast' is not valid"),
    (["--config", "TOML:model_overrides = 5"], "model_overrides=5 is not valid"),
    (["--config", "TOML:seed = \"x\""], "seed='x' is not valid"),
    (["--config", "TOML:eval_every = true"], "eval_every=True is not valid"),
    (["--config", "TOML:sample_tokens = \"many\""], "sample_tokens='many' is not valid"),
    (["--device", "tpu9"], "device='tpu9' is not valid"),
    (["--seq-len", "1"], "seq_len=1 must be >= 2"),
    (["--grad-clip", "-1"], "grad_clip=-1.0 must be > 0"),
    (["--grad-clip", "0"], "grad_clip=0.0 must be > 0"),
    (["--weight-decay", "-1"], "weight_decay=-1.0 must be >= 0"),
    (["--set", "block_size=1000"], "block_size=1000 is longer than the training length"),
    (["--config", "TOML:nonfinite = \"ignore\""], "nonfinite='ignore' is not valid"),
    (["OUT_IS_FILE"], "is a file, not a directory"),
    (["--cache-dir", "FILE"], "--cache-dir"),
]


@pytest.mark.parametrize("extra,message", CASES, ids=[c[1][:30] for c in CASES])
def test_train_errors_are_one_line(corpus, tmp_path, capsys, extra, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = str(tmp_path / "run")
    argv = ["train", "--model", "bst-sh-s4", "--size", "tiny", "--data", str(corpus), "--seq-len",
            "64", "--max-steps", "1", "--cache-dir", str(tmp_path / "cache")]
    for item in extra:
        if item.startswith("TOML:"):
            argv.append(_toml(tmp_path, item[5:]))
        elif item == "OUT_IS_FILE":
            out = str(a_file)
        else:
            argv.append(str(a_file) if item == "FILE" else item)
    assert main(argv + ["--out", out]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_eval_and_generate_errors_are_one_line(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(_config(corpus, tmp_path, max_steps=1), run, quiet=True)
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    for argv, message in [
        (["eval", str(run), "--data", str(corpus), "--output", str(a_dir)], "is a directory"),
        (["generate", str(run), "--prompt-file", str(a_dir)], "is a directory"),
        (["generate", str(run), "--prompt", "hi", "--temperature", "nan"], "finite"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_evaluation_memory_follows_the_scored_tokens(corpus, tmp_path, capsys):
    """A length far beyond every document computes only the positions that hold tokens (the run
    was killed at 24 GB before). `--data` defaults to the run's corpus."""
    run = tmp_path / "run"
    train(_config(corpus, tmp_path, max_steps=1), run, quiet=True)
    assert main(["eval", str(run), "--lengths", "10000000", "--max-tokens", "2000", "--json",
                 "--cache-dir", str(tmp_path / "cache"), "--batch-tokens", "4096"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lengths"]["10000000"]["tokens"] > 0


def test_resume_refuses_changed_settings_unless_overridden(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", "bst-sh-s4", "--size", "tiny", "--data", str(corpus), "--out",
            str(run), "--seq-len", "64", "--batch-size", "4", "--cache-dir", str(tmp_path / "c"),
            "--quiet", "--sample-tokens", "0"]
    assert main(argv + ["--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "2", "--lr", "5",
                 "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "batch_size=4, lr=0.001" in err and "batch_size=2, lr=5.0" in err and "--override" in err
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "2", "--quiet"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "3", "--lr", "0.002",
                 "--override", "--quiet"]) == 0
    assert load_checkpoint(run).train_state["train_config"]["lr"] == 0.002


def test_every_training_option_is_a_flag_with_help():
    import dataclasses

    from blockstate.cli import build_parser
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {a.dest: a for a in train_parser._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model_overrides":
            assert f.name in flags and flags[f.name].help, f.name
    assert flags["schedule"].choices == ["cosine", "inverse_sqrt", "constant"]
    assert "bst-sh-s4" in flags["model"].choices and "tiny" in flags["size"].choices


def test_python_api_raises_value_errors():
    for fields, message in [({"n_layers": "two"}, "n_layers='two'"), ({"init_std": float("nan")},
                            "finite"), ({"norm_eps": 0.0}, "norm_eps"), ({"dropout": "0.1"}, "dropout")]:
        with pytest.raises(ValueError, match=message):
            ModelConfig(**fields)
    with pytest.raises(ValueError, match="data=5"):
        TrainConfig(data=5)
    with pytest.raises(ValueError, match="n_layers='two'"):
        build_model("bst-sh-s4", "tiny", n_layers="two")
    model = build_model("bst-sh-s4", "tiny")
    with pytest.raises(ValueError, match="integers"):
        model.generate([[1.5, 2.0]], 3)
