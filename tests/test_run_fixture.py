"""A run directory written by blockstate 0.1.0 (flat model config, checkpoint format of that
release; tests/fixtures/run_v0.1, 2 steps of a 16-wide bst-sh-s4 on the corpus below) keeps
loading and resuming with the current code: what a refactor of the config or checkpoint format
must not break."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch

import blockstate
from blockstate.checkpoint import load_latest_intact
from blockstate.train import train
from blockstate.train_config import TrainConfig

from reference import word_corpus

FIXTURE = Path(__file__).parent / "fixtures" / "run_v0.1"


def _corpus(root: Path) -> Path:
    """The fixture's corpus, written again (same names and content)."""
    return word_corpus(root)


def _resume(run: Path, corpus: Path, cache: Path, stop_after: int | None = None) -> None:
    """Resume `run` to 4 steps (with the corpus at its new path), or stop it with SIGINT after
    step `stop_after`, as a user's Ctrl-C would."""
    record = json.loads((run / "train_config.json").read_text())["train"]
    config = TrainConfig.from_dict({**record, "data": str(corpus), "cache_dir": str(cache),
                                    "max_steps": 4})

    def on_step(step, _record):
        if step == stop_after:
            os.kill(os.getpid(), signal.SIGINT)

    train(config, run, resume=True, override=True, quiet=True, on_step=on_step)


def test_old_run_loads_and_resumes_exactly(tmp_path):
    model, tokenizer = blockstate.load(FIXTURE)
    assert model.config.d_model == 16 and tokenizer.kind == "byte"
    assert load_latest_intact(FIXTURE).step == 2
    corpus, cache = _corpus(tmp_path / "corpus"), tmp_path / "cache"
    straight, halting = tmp_path / "straight", tmp_path / "halting"
    for run in (straight, halting):
        shutil.copytree(FIXTURE, run)
    _resume(straight, corpus, cache)
    _resume(halting, corpus, cache, stop_after=3)
    assert load_latest_intact(halting).step == 3
    _resume(halting, corpus, cache)
    a, b = load_latest_intact(straight), load_latest_intact(halting)
    assert a.step == b.step == 4
    for name, tensor in a.model_state().items():
        assert torch.equal(tensor, b.model_state()[name]), name
    losses = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()
              if "split" not in json.loads(line)]
    assert len(losses) == 4 and losses[2] < losses[0]
