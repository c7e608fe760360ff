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

from reference import word_corpus

ROOT = Path(__file__).resolve().parents[1]
def _write_corpus(root: Path, n: int = 80) -> Path:
    return word_corpus(root, n)


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
    import blockstate.step as tr  # the one training step computes every training loss

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
    import blockstate.step as tr  # the one training step computes every training loss

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


# ---------------------------------------------------------------- red-team cases (second pass)
# Each case below failed before: data deleted or replaced, a silently wrong run, or a traceback.

def _one_line_error(capsys, argv: list[str], message: str, code: int = 2) -> str:
    assert _argparse_exit(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _train_argv(corpus: Path, run: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--model", "bst-sh-s4", "--size", "tiny", "--data", str(corpus), "--out",
            str(run), "--seq-len", "64", "--batch-size", "4", "--sample-tokens", "0", "--quiet",
            "--cache-dir", str(tmp_path / "cache"), *extra]


@pytest.mark.parametrize("damage", ["corrupt", "newer-version"])
def test_resume_never_restarts_over_checkpoints_that_fail_verification(corpus, tmp_path, capsys,
                                                                        damage):
    run = tmp_path / "run"
    train(_config(corpus, tmp_path, max_steps=4, save_every=2), run, quiet=True)
    steps = sorted((run / "checkpoints").glob("step-*"))
    assert len(steps) == 2
    for step in steps:
        if damage == "corrupt":
            path = step / "optimizer.safetensors"
            data = bytearray(path.read_bytes())
            data[-3:] = bytes(b ^ 0xFF for b in data[-3:])
            path.write_bytes(bytes(data))
        else:
            manifest = json.loads((step / "checkpoint.json").read_text())
            (step / "checkpoint.json").write_text(json.dumps({**manifest, "version": 99}))
    before = _snapshot(run)
    err = _one_line_error(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "6"],
                          "nothing was changed")
    assert all(step.name in err for step in steps)
    assert _snapshot(run) == before  # the intact model weights included


@pytest.mark.parametrize("files", [
    {"checkpoints/epoch1/model.pt": b"weights", "tokenizer/vocab.txt": b"a\nb", "README.md": b"#"},
    {"tensorboard/events.out": b"scalars", "eval.json": b"{}"},
])
def test_overwrite_never_removes_another_tools_files(corpus, tmp_path, capsys, files):
    out = tmp_path / "theirs"
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    _one_line_error(capsys, _train_argv(corpus, out, tmp_path, "--max-steps", "1", "--overwrite"),
                    "is not a blockstate run")
    assert _snapshot(out) == files


def test_training_into_a_foreign_directory_never_replaces_its_files(corpus, tmp_path, capsys):
    out = tmp_path / "theirs"
    files = {"summary.json": b'{"mine": 1}', "tokenizer/tokenizer.json": b'{"mine": 2}'}
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    _one_line_error(capsys, _train_argv(corpus, out, tmp_path, "--max-steps", "1"),
                    "which a run would replace")
    assert _snapshot(out) == files
    # a directory of other files only is used, and --overwrite later keeps those files
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    assert main(_train_argv(corpus, notes, tmp_path, "--max-steps", "1")) == 0
    assert main(_train_argv(corpus, notes, tmp_path, "--max-steps", "1", "--overwrite")) == 0
    assert (notes / "notes.txt").read_text() == "mine"


def test_a_run_written_before_the_marker_is_still_a_run(corpus, tmp_path):
    from blockstate.rundir import RUN_MARKER, is_run_dir

    run = tmp_path / "run"
    train(_config(corpus, tmp_path, max_steps=2, save_every=2), run, quiet=True)
    (run / RUN_MARKER).unlink()  # as an older blockstate left it
    assert is_run_dir(run)
    assert train(_config(corpus, tmp_path, max_steps=3, save_every=2), run, resume=True,
                 quiet=True)["step"] == 3
    assert (run / RUN_MARKER).is_file()
    train(_config(corpus, tmp_path, max_steps=1), run, overwrite=True, quiet=True)
    assert load_checkpoint(run).step == 1


def test_a_token_cache_corrupted_in_place_is_rebuilt_not_trained_on(corpus, tmp_path, capsys):
    config = _config(corpus, tmp_path, max_steps=3)
    train(config, tmp_path / "a", quiet=True)
    (tokens,) = [p for p in (tmp_path / "cache").glob("*-train-*/tokens.bin")]
    data = bytearray(tokens.read_bytes())
    data[100:110] = bytes(10)  # same length, other tokens
    tokens.write_bytes(bytes(data))
    train(config, tmp_path / "b", quiet=True)
    assert "does not match the sha256" in capsys.readouterr().err
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")  # trained on the true tokens
    assert tokens.read_bytes() != bytes(data)


def test_an_edit_that_keeps_size_and_mtime_is_a_changed_corpus(tmp_path):
    data = _write_corpus(tmp_path / "data", 40)
    run = tmp_path / "run"
    train(_config(data, tmp_path, max_steps=1, save_every=1), run, quiet=True)
    doc = data / "doc005.txt"
    status = doc.stat()
    text = doc.read_text()
    doc.write_text(text.replace("alpha", "ALPHA") if "alpha" in text else text.upper())
    os.utime(doc, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert doc.stat().st_size == status.st_size and doc.stat().st_mtime_ns == status.st_mtime_ns
    with pytest.raises(ValueError, match="changed since"):
        train(_config(data, tmp_path, max_steps=2, save_every=1), run, resume=True, quiet=True)


def test_resume_refuses_a_tokenizer_put_in_place_of_the_runs_own(corpus, tmp_path, capsys):
    from blockstate.data import build_tokenizer, resolve_corpus

    run = tmp_path / "run"
    fields = dict(tokenizer="bpe", vocab_size=300, max_steps=1, save_every=1)
    train(_config(corpus, tmp_path, **fields), run, quiet=True)
    other = _write_corpus(tmp_path / "other", 30)
    for path in other.iterdir():
        path.write_text(path.read_text().upper() + " zz yy xx ww\n")
    foreign = build_tokenizer("bpe", corpus=resolve_corpus(str(other)), vocab_size=300,
                              directory=tmp_path / "foreign")
    assert foreign.vocab_size == 300
    foreign.save(run / "tokenizer")
    before = _snapshot(run)
    _one_line_error(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "2"],
                    "is not the tokenizer that")
    assert _snapshot(run) == before
    # a run whose tokenizer/ was lost gets it back from the checkpoint's verified copy
    import shutil

    shutil.rmtree(run / "tokenizer")
    assert train(_config(corpus, tmp_path, **{**fields, "max_steps": 2}), run, resume=True,
                 quiet=True)["step"] == 2
    checkpoint = load_checkpoint(run)
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (
        checkpoint.tokenizer_dir / "tokenizer.json").read_bytes()


def test_resume_budgets_replace_the_runs_and_a_spent_budget_says_so(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(_config(corpus, tmp_path, max_steps=4), run, quiet=True)
    tokens = load_checkpoint(run).train_state["tokens"]
    # a token budget given on resume is the budget (the run's max_steps=4 no longer stops it)
    summary = train(_config(corpus, tmp_path, max_steps=None, max_tokens=tokens * 6 // 4), run,
                    resume=True, quiet=True)
    assert summary["step"] == 6
    summary = train(_config(corpus, tmp_path, max_steps=None, max_time=3600), run, resume=True,
                    quiet=True, on_step=lambda step, record: step == 7 and os.kill(os.getpid(),
                                                                                   signal.SIGINT))
    assert summary["step"] == 7  # time-budgeted from step 6 on (stopped by the signal here)
    capsys.readouterr()
    train(_config(corpus, tmp_path, max_steps=7), run, resume=True, quiet=True)
    err = capsys.readouterr().err
    assert "already meets the budget max_steps=7; nothing to train" in err


def test_empty_data_is_refused_and_a_local_folder_never_shadows_a_registered_corpus(
        corpus, tmp_path, monkeypatch, capsys):
    from blockstate.data import resolve_corpus
    from blockstate.train import local_corpus_path

    _one_line_error(capsys, _train_argv(corpus, tmp_path / "run", tmp_path, "--max-steps", "1",
                                        "--data", ""), "is empty")
    assert not (tmp_path / "run").exists()
    monkeypatch.chdir(tmp_path)
    _write_corpus(tmp_path / "python-stdlib", 3)
    notes = []
    assert local_corpus_path("python-stdlib", notes.append) is None
    assert "./python-stdlib" in notes[0]
    assert resolve_corpus("python-stdlib").name == "python-stdlib"
    assert type(resolve_corpus("python-stdlib")).__name__ == "StdlibCorpus"
    assert local_corpus_path("./python-stdlib") == (tmp_path / "python-stdlib").resolve()


def test_a_full_disk_inside_safetensors_is_one_line_and_leaves_no_partial_checkpoint(
        corpus, tmp_path, monkeypatch, capsys):
    import safetensors

    import blockstate.checkpoint as ck

    run = tmp_path / "run"
    real, calls = ck.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 3:  # the second checkpoint: safetensors' own error, a partial file left
            Path(path).write_bytes(b"partial")
            raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                                              'StorageFull, message: "No space left on device" })')
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full_disk)
    _one_line_error(capsys, _train_argv(corpus, run, tmp_path, "--max-steps", "4", "--save-every",
                                        "2"), "No space left on device; the previous checkpoint")
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert load_checkpoint(run).step == 2


@pytest.mark.parametrize("extra", [["--seq-len", "100000000"], ["--set", "n_layers=100000"],
                                   ["--set", "d_model=1000000"]], ids=["seq_len", "depth", "width"])
def test_requests_that_cannot_fit_in_memory_are_refused_before_anything_is_written(
        corpus, tmp_path, capsys, extra):
    run = tmp_path / "run"
    argv = [a for a in _train_argv(corpus, run, tmp_path, "--max-steps", "1") if a != "64"]
    argv.remove("--seq-len")
    _one_line_error(capsys, argv + extra, "GiB available")
    assert not run.exists() and not (tmp_path / "cache").exists()


def test_evaluation_at_a_huge_length_allocates_only_what_the_documents_hold(corpus, tmp_path,
                                                                             capsys):
    run = tmp_path / "run"
    train(_config(corpus, tmp_path, max_steps=1), run, quiet=True)
    assert main(["eval", str(run), "--lengths", "1000000000", "--max-tokens", "2000", "--json",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads(capsys.readouterr().out)["lengths"]["1000000000"]["tokens"] > 0


def test_bad_values_anywhere_are_one_line_errors(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(_config(corpus, tmp_path, max_steps=1), run, quiet=True)
    overrides = _toml(tmp_path, "model_overrides = 5")
    bench = ["bench", "models", "--models", "bst-sh-s4", "--size", "tiny"]
    for argv, message in [
        (["eval", str(run), "--device", "foo"], "is not a device"),
        (["eval", str(run), "--device", "mps"], "not available"),
        (["generate", str(run), "--prompt", "hi", "--device", "foo"], "is not a device"),
        (["generate", str(run), "--prompt", "hi", "--seed", str(10**23)], "out of range"),
        (bench + ["--device", "foo"], "is not a device"),
        (bench + ["--length", "-5"], "--length -5 must be >= 1"),
        (["bench", "imports", "--repeats", "0"], "--repeats 0 must be >= 1"),
        (["bench", "generation", "--new-tokens", "0"], "--new-tokens 0 must be >= 1"),
        (["eval", str(run), "--lengths", ","], "--lengths ','"),
        (["eval", str(run), "--max-tokens", "-5"], "--max-tokens -5"),
        (_train_argv(corpus, tmp_path / "r", tmp_path, "--config", overrides, "--set",
                     "n_layers=1", "--max-steps", "1"), "model_overrides=5 is not valid"),
        (_train_argv(corpus, tmp_path / "r", tmp_path, "--seed", str(10**23), "--max-steps", "1"),
         "out of range"),
        (_train_argv(corpus, tmp_path / "r", tmp_path, "--lr", "1e38", "--max-steps", "1"),
         "lr=1e+38 is out of range"),
        (_train_argv(corpus, tmp_path / "r", tmp_path, "--config", str(tmp_path), "--max-steps",
                     "1"), "is a directory"),
        (_train_argv(corpus, tmp_path / "r", tmp_path, "--max-time", "-5m"), "'-5m' is not a duration"),
        (_train_argv(corpus, tmp_path / "r", tmp_path, "--max-steps", "x"), "invalid int value"),
        (["train", "--bogus"], "the following arguments are required: --out"),
        (["eval"], "the following arguments are required"),
    ]:
        _one_line_error(capsys, argv, message)
    assert not (tmp_path / "r").exists()


def _argparse_exit(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_argparse_errors_are_one_line(capsys):
    for argv in (["train", "--seed", "1e23", "--out", "x"], ["eval"], ["nope"],
                 ["train", "--out", "x", "--max-time", "-5m", "--bogus"]):
        assert _argparse_exit(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--help" in err, err


def test_a_failed_start_leaves_the_disk_as_it_was(corpus, tmp_path, monkeypatch):
    import blockstate.train as tr

    def refuse(*args, **kwargs):
        raise ValueError("no tokenizer for you")

    monkeypatch.setattr(tr, "build_tokenizer", refuse)
    with pytest.raises(ValueError, match="no tokenizer"):
        train(_config(corpus, tmp_path, max_steps=1), tmp_path / "new", quiet=True)
    assert not (tmp_path / "new").exists()  # created by the request: removed again
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer"):
        train(_config(corpus, tmp_path, max_steps=1), tmp_path / "empty", quiet=True)
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    # --out inside the corpus directory: its files would become training data
    data = _write_corpus(tmp_path / "data", 40)
    with pytest.raises(ValueError, match="inside the corpus directory"):
        train(_config(data, tmp_path, max_steps=1), data / "run", quiet=True)
    assert not (data / "run").exists()


@pytest.mark.parametrize("stage", ["validation", "sample"])
def test_sigterm_during_the_final_stages_ends_with_a_summary(corpus, tmp_path, monkeypatch, capsys,
                                                             stage):
    import blockstate.train as tr

    target = "evaluate_batches" if stage == "validation" else "_sample"
    real = getattr(tr, target)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while this stage runs
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, target, signalled)
    run = tmp_path / "run"
    argv = _train_argv(corpus, run, tmp_path, "--max-steps", "2")
    argv[argv.index("--sample-tokens") + 1] = "8"
    err = _one_line_error(capsys, argv, "SIGTERM: stopped at step 2", code=143)
    assert "--resume" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and load_checkpoint(run).step == 2
