"""Budget-aware defaults (`size="auto"`, blockstate.budget)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blockstate.budget import SHAPES, TOKENS_PER_PARAMETER, explicit_fields, plan_for_budget
from blockstate.registry import count_parameters
from blockstate.train import TrainConfig, train

CPU = torch.device("cpu")


def _params(config) -> int:
    return count_parameters(config.model, "small", **{**config.model_overrides, "vocab_size": 259})


def test_time_budget_picks_the_largest_shape_that_sees_enough_tokens():
    """With a fake throughput of 1e5 tokens/s and 300 s, about 2.7e7 tokens: the plan takes the
    largest rung with >= TOKENS_PER_PARAMETER tokens per parameter, and stops probing there."""
    probed = []

    def measure(config, vocab_size, device):
        probed.append(config.model_overrides["d_model"])
        return 1e5, _params(config)

    config = TrainConfig(max_time=300)
    planned, record = plan_for_budget(config, explicit_fields(config, None), 259, CPU,
                                      log=lambda m: None, measure=measure)
    budget_tokens = 1e5 * 0.9 * 300
    fitting = [s.d_model for s in SHAPES
               if budget_tokens >= TOKENS_PER_PARAMETER * _params(
                   TrainConfig(size="small", model_overrides=s.overrides()))]
    assert planned.model_overrides["d_model"] == max(fitting)
    assert probed == [s.d_model for s in SHAPES][:len(fitting) + 1]  # one rung past the choice
    assert planned.size == "small" and planned.max_time <= 300
    assert planned.beta2 == 0.99 and planned.seq_len == planned.model_overrides["max_seq_len"]
    assert record["chosen"]["batch_size"] == planned.batch_size
    assert 10 <= planned.warmup_steps <= 200


def test_plan_keeps_what_the_user_gave_and_token_budgets_count_parameters():
    config = TrainConfig(max_tokens=10_000_000, lr=5e-4, batch_size=2,
                         model_overrides={"n_layers": 3})
    planned, _ = plan_for_budget(config, explicit_fields(config, None), 259, CPU, log=lambda m: None,
                                 measure=lambda *a: pytest.fail("a token budget measures nothing"))
    assert planned.lr == 5e-4 and planned.batch_size == 2
    assert planned.model_overrides["n_layers"] == 3
    assert _params(planned) * TOKENS_PER_PARAMETER <= 10_000_000
    # nothing to plan for: the small size; an explicit size: no plan at all
    small, record = plan_for_budget(TrainConfig(max_steps=5), set(), 259, CPU, log=lambda m: None)
    assert small.size == "small" and record["rule"] == "no budget"
    same, record = plan_for_budget(TrainConfig(size="tiny", max_time=60), {"size"}, 259, CPU)
    assert same.size == "tiny" and record is None
    # the command line says what was given, whatever the values
    assert explicit_fields(TrainConfig(), {"lr"}) == {"lr"}


@pytest.mark.slow
def test_quick_start_command_sizes_its_model_records_the_plan_and_resumes(tmp_path, capsys):
    """The README's main job (no --size: auto) on a small corpus with a 6-second budget."""
    from blockstate.cli import main

    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    run = tmp_path / "run"
    assert main(["train", "--model", "bst-recommended", "--data", str(root), "--out", str(run),
                 "--max-time", "6s", "--overwrite", "--eval-batches", "1", "--sample-tokens", "30",
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "sample" in printed
    record = json.loads((run / "train_config.json").read_text())
    assert record["plan"]["chosen"]["size"] == "small"
    assert record["requested_train"]["size"] == "auto"
    assert record["model"]["d_model"] == record["plan"]["chosen"]["model_overrides"]["d_model"]
    assert record["model"]["bst_layers"] == [0]          # still a BST, with context states
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] > 0
    # the same request resumes the planned run (what the plan chose is not a change)
    more = train(TrainConfig(model="bst-recommended", data=str(root),
                             max_time=summary["elapsed_s"] + 2.0, eval_batches=1,
                             sample_tokens=30,
                             cache_dir=str(tmp_path / "cache")), run, resume=True, quiet=True)
    assert more["step"] > summary["step"]
    assert Path(more["out"]) == run


@pytest.mark.slow
def test_quality_benchmark_scores_both_models_on_the_same_bytes(tmp_path, monkeypatch):
    """`blockstate bench quality` end to end at a few seconds per model: both runs are scored on
    the same test bytes (pieces from every test document, each model with its own tokenizer),
    and the report renders with the paired spread."""
    from blockstate import budget
    from blockstate.bench import quality as bench_quality

    monkeypatch.setattr(budget, "AUTO_VOCAB", 300)  # a vocabulary this small corpus can give
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(120):
        (root / f"doc{i:03d}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 30)
    nano = {**bench_quality.NANOGPT_CPU, "sample_tokens": 20, "eval_batches": 1}
    monkeypatch.setattr(bench_quality, "ENTRIES", {
        "main": ("main job", {**bench_quality.MAIN_JOB, "sample_tokens": 20, "eval_batches": 1}),
        "nanogpt-cpu": ("transformer preset, nanoGPT's CPU hyperparameters", nano)})
    report = bench_quality.run_quality(tmp_path / "quality", [str(root)], minutes=0.05,
                                       runs_dir=tmp_path / "runs", eval_tokens=4096,
                                       cache_dir=str(tmp_path / "cache"), command="test")
    main, baseline = report["results"]
    assert main["test"]["bytes"] == baseline["test"]["bytes"] > 500
    assert main["test"]["pieces"] == baseline["test"]["pieces"] == len(main["test"]["piece_bits_per_byte"])
    assert main["test"]["pieces"] >= 2
    assert (main["test"]["tokenizer"], baseline["test"]["tokenizer"]) == ("sentencepiece 300", "byte")
    assert main["test"]["tokens"] < baseline["test"]["tokens"]    # fewer, longer tokens
    assert main["seq_len"] % baseline["seq_len"] == 0
    assert baseline["model"]["d_model"] == 128 and baseline["batch_size"] == 12
    text = (tmp_path / "quality.md").read_text()
    assert "nanoGPT's CPU hyperparameters" in text and "bits per byte" in text
    assert "standard errors" in text
    with pytest.raises(ValueError, match="unknown preset"):
        bench_quality.entries(["bst-nonesuch"])
    with pytest.raises(ValueError, match="is the main job already"):
        bench_quality.entries([bench_quality.MAIN_JOB["model"]])
    assert list(bench_quality.entries(["bst-sh-s4"])) == ["main", "nanogpt-cpu", "bst-sh-s4"]
    assert json.loads((tmp_path / "quality.json").read_text())["kind"] == "quality"


def test_quality_pieces_come_from_every_test_document_in_turn(tmp_path):
    """A corpus of a few long documents (books) gives pieces cut at line ends from all of them,
    round-robin, until the byte budget; the paired difference counts where the first is lower."""
    from blockstate.bench.quality import _test_pieces, paired_difference
    from blockstate.data import resolve_corpus

    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(200):
        (root / f"book{i:03d}.txt").write_text("".join(f"book {i} line {j}\n" for j in range(400)))
    source = resolve_corpus(str(root))
    test_docs = [d.text for d in source.documents("test")]
    assert len(test_docs) >= 2
    pieces = _test_pieces(source, 40_000, 2_000)
    assert 40_000 <= sum(len(p.encode()) for p in pieces) < 40_000 + 2_100
    assert len(pieces) > len(test_docs)                   # more than one piece of some documents
    assert all(p.endswith("\n") and len(p) >= 2_000 for p in pieces)
    assert all(any(p in doc for doc in test_docs) for p in pieces)
    assert {p.split()[1] for p in pieces[:len(test_docs)]} == {d.split()[1] for d in test_docs}
    assert pieces[len(test_docs)].split()[3] != "0"       # a second turn: each document goes on
    d = paired_difference([1.0, 2.0, 3.0], [1.5, 1.5, 3.5])
    assert d["mean"] == pytest.approx(-1 / 6) and d["lower"] == 2 and d["pieces"] == 3
    assert d["standard_error"] == pytest.approx(np.std([-0.5, 0.5, -0.5], ddof=1) / np.sqrt(3))


def test_resuming_with_size_auto_keeps_the_runs_own_size(tmp_path):
    """`size="auto"` (the default) asks for no particular size: resuming a run trained at an
    explicit size continues it at that size instead of refusing the request as a change."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(f"line {i}\n" * 40)
    fields = dict(data=str(root), seq_len=64, batch_size=2, eval_batches=1, sample_tokens=0,
                  cache_dir=str(tmp_path / "cache"), model_overrides={"block_size": 16})
    train(TrainConfig(size="tiny", max_steps=2, **fields), tmp_path / "run", quiet=True)
    more = train(TrainConfig(max_steps=3, **fields), tmp_path / "run", resume=True, quiet=True)
    assert more["step"] == 3 and more["parameters"] == count_parameters(
        TrainConfig().model, "tiny", block_size=16, vocab_size=259)


def test_budget_plans_a_bpe_tokenizer_unless_one_is_given():
    """Tokenizer "auto" (the default) with size auto and a budget: a small BPE vocabulary (a
    vocabulary size given alone is kept); without a budget or with an explicit size: bytes. A
    tokenizer given is kept."""
    from blockstate.budget import AUTO_VOCAB, plan_tokenizer

    def plan(**fields):
        config = TrainConfig(**fields)
        return plan_tokenizer(config, explicit_fields(config, None))

    planned, note = plan(max_time=60)
    assert (planned.tokenizer, planned.vocab_size) == ("bpe", AUTO_VOCAB) and "--tokenizer byte" in note
    assert plan(max_tokens=10**6, vocab_size=512)[0].vocab_size == 512
    for fields in ({"max_time": 60, "tokenizer": "byte"}, {"max_steps": 5},
                   {"max_time": 60, "size": "tiny"}, {"max_time": 60, "tokenizer": "unigram"}):
        config, note = plan(**fields)
        assert note is None and config.tokenizer == fields.get("tokenizer", "byte")


def _words_corpus(root: Path, docs: int) -> Path:
    """Varied text (2,000 distinct words) that a few-hundred-piece BPE vocabulary can be trained on."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    root.mkdir()
    for i in range(docs):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)))
    return root


@pytest.mark.slow
def test_planned_tokenizer_time_counts_against_the_budget_and_falls_back_to_bytes(tmp_path,
                                                                                  monkeypatch):
    """A time-budgeted auto run trains the planned BPE tokenizer, deducts its data preparation
    from the budget with the probe's time, and uses bytes where the corpus cannot give the
    planned vocabulary."""
    from blockstate import budget

    corpus = _words_corpus(tmp_path / "corpus", 30)
    fields = dict(data=str(corpus), max_time=3.0, eval_batches=1, sample_tokens=0,
                  cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(budget, "AUTO_VOCAB", 300)
    train(TrainConfig(**fields), tmp_path / "bpe", quiet=True)
    record = json.loads((tmp_path / "bpe" / "train_config.json").read_text())
    assert record["tokenizer"] == "sentencepiece" and record["train"]["vocab_size"] == 300
    assert record["requested_train"]["tokenizer"] == "auto"      # what was asked: the default
    plan = record["plan"]
    assert plan["prepare_seconds"] > 0, plan
    assert record["train"]["max_time"] == pytest.approx(
        max(1.0, 3.0 - plan["prepare_seconds"] - plan["probe_seconds"]), abs=0.05)
    # far more pieces than this corpus holds: SentencePiece refuses, the run trains on bytes
    monkeypatch.setattr(budget, "AUTO_VOCAB", 50_000)
    summary = train(TrainConfig(**fields), tmp_path / "bytes", quiet=True)
    record = json.loads((tmp_path / "bytes" / "train_config.json").read_text())
    assert record["tokenizer"] == "byte" and record["train"]["tokenizer"] == "byte"
    assert summary["step"] > 0
