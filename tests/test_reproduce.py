"""`blockstate reproduce`: the plan, parameter matching, resumability and the report."""

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest

from blockstate import reproduce as rp
from blockstate.cli import main
from blockstate.registry import applicable_overrides, count_parameters

from reference import word_corpus


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BLOCKSTATE_CACHE", str(tmp_path / "cache"))
    return word_corpus(tmp_path / "corpus", 60, 80)


MICRO = dataclasses.replace(
    rp.SCALES["tiny"],
    overrides={"d_model": 32, "n_layers": 2, "n_heads": 2, "block_size": 16, "max_seq_len": 64,
               "context.states": 4, "ssm.state_size": 4, "rel_pos_max_distance": 16},
    batch_size=4, max_tokens=4 * 64 * 3, warmup_steps=1, eval_tokens=512, seeds=(0, 1),
    state_sizes=(4, 8), windows=(32,))


def test_tiny_plan_matches_parameters_within_five_percent():
    scale = rp.SCALES["tiny"]
    fixed = {**scale.overrides, "vocab_size": 259}
    target = count_parameters("bst-sh-s4", scale.size,
                              **applicable_overrides("bst-sh-s4", scale.size, fixed))
    for name in rp.BASELINES + rp.OTHER_BASELINES + ("bst-recommended",):
        params = count_parameters(name, scale.size, **applicable_overrides(
            name, scale.size, {**fixed, **rp.matched_overrides(name, scale)}))
        assert abs(params - target) <= 0.05 * target, name
    # bst-recommended keeps its own state size over the scale's, its MLP chosen again
    assert rp.matched_overrides("bst-recommended", scale)["ssm.state_size"] == 64
    assert rp.matched_overrides("bst-sh-ssd", scale) == {}
    runs = rp.plan(scale, ["python-stdlib", "books"])
    main_runs = [r for r in runs if r.group == "main"]
    assert len(main_runs) == len(rp.ZOO) * 2 * len(scale.seeds)
    ablations = {r.group for r in runs} - {"main"}
    assert ablations == {"state", "bst_layers", "window", "self_attention"}
    assert [r.overrides["bst_layers"] for r in runs if r.group == "bst_layers"] == [
        [0], [0, 2], [0, 2, 3], [0, 1, 2, 3]]


def test_ablation_points_equal_to_the_main_model_reuse_its_run(tmp_path):
    scale = rp.SCALES["tiny"]
    runs = rp.plan(scale, ["python-stdlib"])
    main_dir = rp.run_dir(tmp_path, runs[0], scale)
    default = [r for r in runs if r.group == "state" and r.overrides["ssm.state_size"] == 16][0]
    other = [r for r in runs if r.group == "state" and r.overrides["ssm.state_size"] == 8][0]
    assert rp.run_dir(tmp_path, default, scale) == main_dir
    assert rp.run_dir(tmp_path, other, scale) != main_dir


@pytest.mark.slow
def test_reproduce_end_to_end_resumes_and_reports(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(rp.SCALES, "micro", MICRO)
    out = tmp_path / "out"
    logs = []
    result = rp.reproduce("micro", [str(corpus)], out, device="cpu", models=("bst-sh-s4", "slide"),
                          command="test", log=logs.append)
    # 2 models x 2 seeds, then ablations: N=8, 1 layer, W=32, sliding (others reuse the main run).
    assert len(result["records"]) == 4 + 2 + 2 + 2 + 2
    trained = [line for line in logs if line.startswith("train ")]
    assert len(trained) == 4 + 4
    record = result["records"][0]
    assert set(record["test"]) == {"32", "64", "256", "1024"}
    text = (out / "results.md").read_text()
    for heading in ("Main table", "Length generalization", "Ablation: SSM state size",
                    "Loss by position", "Which claims hold"):
        assert heading in text
    ranges = record["test"]["1024"]["loss_by_block_range"]
    assert [(r["start"], r["end"]) for r in ranges][:3] == [(0, 16), (16, 32), (32, 64)]
    assert ranges[-1]["end"] == 1024 and all(r["loss"] > 0 for r in ranges if r["tokens"])
    assert "+-" in text and (out / "length_generalization.png").stat().st_size > 0
    slide = next(r for r in result["records"] if r["label"] == "slide")
    assert f"Settings of their own (parameter matching): `slide` d_ff = {slide['overrides']['d_ff']}." \
        in text  # the MLP width that matched its parameters, named beside the scale's settings
    # A second invocation trains nothing: every run is finished.
    logs.clear()
    again = rp.reproduce("micro", [str(corpus)], out, device="cpu", models=("bst-sh-s4", "slide"),
                         log=logs.append)
    assert not [line for line in logs if line.startswith("train ")]
    assert json.dumps(again["records"]) == json.dumps(result["records"])


def test_interrupted_run_resumes_from_its_checkpoint(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(rp.SCALES, "micro", dataclasses.replace(MICRO, seeds=(0,)))
    out = tmp_path / "out"
    run = rp.plan(MICRO, [str(corpus)], ("slide",), ablations=False)[0]
    directory = rp.run_dir(out, run, MICRO)
    from blockstate.train import TrainConfig, train

    # Simulate a crash: a checkpoint exists but no summary/eval yet.
    overrides = applicable_overrides("slide", "tiny", MICRO.overrides)
    partial = TrainConfig(model="slide", size="tiny", model_overrides=overrides, data=str(corpus),
                          seq_len=64, batch_size=4, warmup_steps=1, max_steps=1, sample_tokens=0,
                          eval_every=10**9, save_every=1)
    train(partial, directory, quiet=True)
    (directory / "summary.json").unlink()
    logs = []
    rp.reproduce("micro", [str(corpus)], out, device="cpu", models=("slide",), ablations=False,
                 log=logs.append)
    assert any("resuming" in line for line in logs)
    assert (directory / "eval.json").exists()


def test_a_run_stopped_by_a_signal_is_resumed_not_scored(corpus, tmp_path, monkeypatch):
    """A SIGTERM/SIGINT makes `train` checkpoint and return early with "interrupted" in its
    summary: reproduce then stops (no eval.json for the partial model), and the next invocation
    trains that run on from its checkpoint instead of taking the summary as finished."""
    import blockstate.train as train_module

    monkeypatch.setitem(rp.SCALES, "micro", dataclasses.replace(MICRO, seeds=(0,)))
    out = tmp_path / "out"
    run = rp.plan(MICRO, [str(corpus)], ("slide",), ablations=False)[0]
    directory = rp.run_dir(out, run, MICRO)
    real_spent, sent = train_module._budget_spent, []

    def spent(config, state, elapsed):  # a real SIGTERM to this process after the first step
        if state.step == 1 and not sent:
            sent.append(os.getpid())
            os.kill(os.getpid(), signal.SIGTERM)
        return real_spent(config, state, elapsed)

    monkeypatch.setattr(train_module, "_budget_spent", spent)
    logs = []
    with pytest.raises(KeyboardInterrupt):
        rp.reproduce("micro", [str(corpus)], out, device="cpu", models=("slide",),
                     ablations=False, log=logs.append)
    assert not (directory / "eval.json").exists() and "run the same command again" in logs[-1]
    assert "checkpoint at step 2" in logs[-1]
    monkeypatch.setattr(train_module, "_budget_spent", real_spent)
    logs.clear()
    result = rp.reproduce("micro", [str(corpus)], out, device="cpu", models=("slide",),
                          ablations=False, log=logs.append)
    assert any("resuming" in line for line in logs)
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["tokens"] >= MICRO.max_tokens and not summary.get("interrupted")  # full budget
    assert (directory / "eval.json").exists() and len(result["records"]) == 1


def test_reproduce_cli_errors(capsys, tmp_path):
    assert main(["reproduce", "--out", str(tmp_path / "x"), "--models", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["reproduce", "--out", str(tmp_path / "x"), "--corpora", ","]) == 2
    assert "at least one corpus" in capsys.readouterr().err
