"""`blockstate train --fsdp` (blockstate.fsdp): FSDP2 over 2 gloo CPU processes logs the losses of
one process, its sharded (DCP) checkpoints resume at 2 -> 1 -> 2 processes as if never stopped, the
last checkpoint carries whole weights for the other tools, and what FSDP is not combined with is
refused in one line.

Tolerance (float32, CPU): losses within 1e-5 relative of one process's, and parameters at the end
within 1e-5 root-mean-square and 2e-4 at the worst element (docs/distributed.md). Summing gradients
in another order moves a few elements further than the rest: with every process at one thread, the
2 -> 1 -> 2 run ends 6.7e-5 from one process's at its worst element but 5.4e-7 in RMS, while a resume
that loses or rescales Adam's moments, or restarts its step count, ends 3e-4 to 8e-4 away in RMS and
8e-4 to 1.7e-3 at the worst element."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import blockstate
from blockstate.checkpoint import CheckpointError, load_checkpoint
from blockstate.cli import main

from reference import word_corpus

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-5     # relative, per logged step
PARAM_RMS = 1e-5     # root-mean-square over every parameter at the end
PARAM_MAX = 2e-4     # absolute, the worst parameter element at the end (a fifth of one step's lr)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return word_corpus(tmp_path_factory.mktemp("corpus"))


def _config_file(corpus: Path, tmp_path: Path) -> Path:
    """A tiny run without a budget; a constant learning rate after warmup, so that runs stopped at
    other budgets follow the same schedule; no dropout, whose masks depend on the rows a process
    holds."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        f'model = "bst-sh-s4"\nsize = "tiny"\ndata = "{corpus}"\nseq_len = 64\nbatch_size = 4\n'
        f'warmup_steps = 2\nschedule = "constant"\neval_batches = 1\nlog_every = 1\n'
        f'save_every = 2\nsample_tokens = 0\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[model_overrides]\nblock_size = 16\ndropout = 0.0\n')
    return cfg


def _train_cli(args: list[str], processes: int) -> None:
    """`blockstate train ARGS` in one process (here) or under torchrun with `processes` gloo ones."""
    if processes == 1:
        assert main(["train", *args, "--quiet"]) == 0
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", str(processes), "-m", "blockstate.cli", "train", *args,
                          "--quiet"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "split" not in r}


def _assert_same_training(run: Path, reference: Path, steps: int) -> None:
    ours, theirs = _losses(run), _losses(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, steps + 1))
    worst = max(abs(ours[s] - theirs[s]) / abs(theirs[s]) for s in theirs)
    assert worst < LOSS_RTOL, (worst, ours, theirs)
    mine = load_checkpoint(run).model_state()
    other = load_checkpoint(reference).model_state()
    assert mine.keys() == other.keys()
    gaps = torch.cat([(mine[k] - other[k]).flatten() for k in mine])
    rms, worst = float(gaps.pow(2).mean().sqrt()), float(gaps.abs().max())
    assert rms < PARAM_RMS and worst < PARAM_MAX, (rms, worst)


def test_one_process_writes_sharded_checkpoints_that_resume_exactly(corpus, tmp_path):
    """With one process --fsdp trains the plain model and writes DCP checkpoints: only the last
    checkpoint of a run holds model.safetensors (a resume for zero steps writes it), a resume
    equals the uninterrupted run bit for bit, and the run loads with blockstate.load."""
    cfg = str(_config_file(corpus, tmp_path))
    _train_cli(["--config", cfg, "--max-steps", "4", "--out", str(tmp_path / "whole")], 1)
    _train_cli(["--config", cfg, "--fsdp", "--max-steps", "3", "--out", str(tmp_path / "run")], 1)
    step2 = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert (step2 / "sharded" / ".metadata").is_file() and not (step2 / "model.safetensors").exists()
    with pytest.raises(CheckpointError, match="only as FSDP shards"):
        blockstate.load(step2)
    # resumed for zero more steps, the checkpoint is written again with the whole weights
    _train_cli(["--config", cfg, "--max-steps", "2", "--out", str(tmp_path / "run"), "--resume",
                str(step2)], 1)
    assert blockstate.load(step2)[0].num_parameters() > 0
    _train_cli(["--config", cfg, "--max-steps", "4", "--out", str(tmp_path / "run"), "--resume"], 1)
    assert _losses(tmp_path / "run") == _losses(tmp_path / "whole")
    last = load_checkpoint(tmp_path / "run")
    assert last.step == 4 and last.sharded_dir is not None
    whole = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all(torch.equal(whole[k], v) for k, v in last.model_state().items())
    model, tokenizer = blockstate.load(tmp_path / "run")
    prompt = tokenizer.encode("alpha")
    assert len(model.generate([prompt], 4, temperature=0)[0]) == len(prompt) + 4


def test_fsdp_refuses_what_it_is_not_combined_with_in_one_line(corpus, tmp_path, capsys):
    argv = ["train", "--model", "bst-sh-s4", "--size", "tiny", "--data", str(corpus), "--out",
            str(tmp_path / "run"), "--max-steps", "1", "--cache-dir", str(tmp_path / "cache"),
            "--fsdp"]
    for extra, message in [(["--context-parallel", "2"], "fsdp is not combined with context_parallel=2"),
                           (["--precision", "fp16"], "precision='fp16' is not supported"),
                           (["--model", "transformer-xl"], "does not carry the memory of transformer-xl")]:
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_fsdp_processes_log_the_losses_of_one(corpus, tmp_path):
    """4 steps, global batch 4: FSDP over 2 gloo processes (2 micro-batches each: gradients
    reduced once, on the last) against one process without FSDP."""
    cfg = str(_config_file(corpus, tmp_path))
    _train_cli(["--config", cfg, "--max-steps", "4", "--out", str(tmp_path / "one")], 1)
    _train_cli(["--config", cfg, "--fsdp", "--grad-accum", "2", "--max-steps", "4", "--out",
                str(tmp_path / "two")], 2)
    _assert_same_training(tmp_path / "two", tmp_path / "one", 4)
    assert sorted(p.name for p in (load_checkpoint(tmp_path / "two").sharded_dir).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_sharded_checkpoints_resume_at_2_then_1_then_2_processes(corpus, tmp_path):
    """2 FSDP processes for 2 steps, then 1 process (the plain model, loading the shards) for 2
    more, then 2 FSDP processes again for 2 more: the run one process trains without stopping."""
    cfg = str(_config_file(corpus, tmp_path))
    run = str(tmp_path / "run")
    _train_cli(["--config", cfg, "--max-steps", "6", "--out", str(tmp_path / "one")], 1)
    _train_cli(["--config", cfg, "--fsdp", "--max-steps", "2", "--out", run], 2)
    _train_cli(["--config", cfg, "--max-steps", "4", "--out", run, "--resume"], 1)
    _train_cli(["--config", cfg, "--max-steps", "6", "--out", run, "--resume"], 2)
    _assert_same_training(tmp_path / "run", tmp_path / "one", 6)
    assert load_checkpoint(run).train_state["train_config"]["fsdp"] is True


@pytest.mark.slow
def test_bf16_fsdp_computes_in_bfloat16_and_keeps_float32_weights(corpus, tmp_path):
    """--precision bf16: bfloat16 parameters in compute, float32 ones stored; the losses stay
    within 1e-2 relative of float32 training over 3 steps (measured 1e-4)."""
    cfg = str(_config_file(corpus, tmp_path))
    _train_cli(["--config", cfg, "--max-steps", "3", "--out", str(tmp_path / "fp32")], 1)
    _train_cli(["--config", cfg, "--fsdp", "--precision", "bf16", "--max-steps", "3", "--out",
                str(tmp_path / "bf16")], 2)
    ours, theirs = _losses(tmp_path / "bf16"), _losses(tmp_path / "fp32")
    assert sorted(ours) == [1, 2, 3]
    assert all(abs(ours[s] - theirs[s]) < 1e-2 * theirs[s] for s in theirs), (ours, theirs)
    assert {v.dtype for v in load_checkpoint(tmp_path / "bf16").model_state().values()} == {
        torch.float32}


@pytest.mark.parametrize("preset", ["bst-sh-s4", "bst-mf-s4"])
def test_bf16_sharding_keeps_the_ssm_parameters_float32_and_marked(preset, tmp_path):
    """In a one-process gloo group: under a bf16 policy the MLP weights compute in bfloat16, the
    SSM's in float32 (also through MF's block-end outputs), a training step runs, and the SSM's
    parameters keep their no-weight-decay mark."""
    import torch.distributed as dist

    from blockstate.fsdp import shard_model
    from blockstate.model import BlockStateLM
    from blockstate.registry import model_config

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        model = BlockStateLM(model_config(preset, "tiny", block_size=16))
        marked = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
        shard_model(model, torch.device("cpu"), torch.bfloat16)
        seen = {}
        layer = model.layers[0]

        def record(name):
            def hook(module, args):
                seen[name] = next(module.parameters()).dtype
            return hook

        layer.context.ssm.kernel.register_forward_pre_hook(record("ssm"))
        layer.mlp.up.register_forward_pre_hook(record("mlp"))
        model(torch.zeros(2, 64, dtype=torch.long)).float().sum().backward()
        assert seen == {"ssm": torch.float32, "mlp": torch.bfloat16}
        assert all(p.grad is not None for p in model.parameters())
        assert marked and marked == {n for n, p in model.named_parameters()
                                     if getattr(p, "_no_weight_decay", False)}
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # as stored
    finally:
        dist.destroy_process_group()
