"""Context parallelism (blockstate.context_parallel): a sequence split by whole blocks over P gloo
processes gives the single-process outputs and gradients, and what cannot be split is refused."""

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blockstate import build_model, model_config
from blockstate.context_parallel import (
    all_reduce_gradients,
    check_model,
    context_parallel,
    split,
)


def _model_and_data(preset: str, length: int, dtype: torch.dtype):
    torch.manual_seed(0)
    model = build_model(preset, "tiny", dropout=0.0).to(dtype)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (2, length), generator=generator)
    probe = torch.randn(2, length, model.config.vocab_size, generator=generator, dtype=dtype)
    return model, tokens, probe


def _worker(rank: int, size: int, init: str, preset: str, length: int, dtype: torch.dtype,
            out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
    model, tokens, probe = _model_and_data(preset, length, dtype)
    block = model.config.block_size
    with context_parallel():
        logits = model(split(tokens, rank, size, block))
    (logits * split(probe, rank, size, block)).sum().backward()  # this rank's share of the loss
    all_reduce_gradients(model)
    parts = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(parts, logits.detach().contiguous())
    if rank == 0:
        torch.save({"logits": torch.cat(parts, 1),
                    "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}},
                   out)
    dist.destroy_process_group()


def _errors(preset: str, length: int, size: int, dtype: torch.dtype) -> tuple[float, float]:
    """Max abs error of the outputs and of the gradients, P processes against one."""
    model, tokens, probe = _model_and_data(preset, length, dtype)
    logits = model(tokens)
    (logits * probe).sum().backward()
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_worker, args=(size, f"{directory}/init", preset, length, dtype,
                                f"{directory}/out.pt"), nprocs=size)
        got = torch.load(f"{directory}/out.pt")
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got["grads"]) == set(grads)
    return (float((got["logits"] - logits.detach()).abs().max()),
            max(float((got["grads"][n] - g).abs().max() / g.abs().max().clamp(min=1e-30))
                for n, g in grads.items()))


@pytest.mark.slow
@pytest.mark.parametrize("preset,length,size", [("bst-sh-s4", 256, 2), ("bst-mh-s4", 512, 4)])
def test_split_sequences_equal_one_process_in_float64(preset, length, size):
    out, grad = _errors(preset, length, size, torch.float64)
    assert out < 1e-10 and grad < 1e-9, (out, grad)


@pytest.mark.slow
def test_a_long_sequence_split_over_two_processes_in_float32():
    out, grad = _errors("bst-sh-s4d", 16384, 2, torch.float32)
    assert out < 1e-5 and grad < 1e-4, (out, grad)


@pytest.mark.parametrize("preset,message", [
    ("bst-mf-s4", "MF context states"), ("bst-sh-ssd", "ssm_kernel='ssd'"),
    ("bst-sh-unstruct", "ssm_kernel='unstruct'"), ("slide", "self_attention='sliding'"),
    ("transformer", "self_attention='full'"), ("brt", "arch 'brt'"),
    ("transformer-xl", "arch 'transformer-xl'")])
def test_what_cannot_be_split_is_refused_in_one_line(preset, message):
    with pytest.raises(ValueError, match="context parallelism supports") as error:
        check_model(model_config(preset, "tiny"))
    assert message in str(error.value) and "\n" not in str(error.value)
    check_model(model_config("bst-sh-s4", "tiny"))
    check_model(model_config("bst-mh-s4", "tiny", ssm_kernel="s4d"))


def test_split_takes_whole_blocks_in_rank_order():
    tokens = torch.arange(64).reshape(1, 64)
    assert split(tokens, 1, 2, 16).tolist() == [list(range(32, 64))]
    with pytest.raises(ValueError, match="multiple of 4 x W = 64"):
        split(tokens[:, :48], 0, 4, 16)
    with pytest.raises(ValueError, match="torch.distributed"):
        with context_parallel():
            pass


@pytest.mark.slow
def test_training_split_over_two_processes_logs_the_losses_of_one(tmp_path):
    """`blockstate train --context-parallel 2` under torchrun: every process reads the same
    sequences and computes its own blocks; the losses equal one process's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from blockstate.rundir import read_metrics

    root = Path(__file__).resolve().parents[1]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for i in range(40):
        (corpus / f"d{i}.txt").write_text(" ".join(words[(i * j) % 8] for j in range(200)))
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'model = "bst-sh-s4"\nsize = "tiny"\ndata = "{corpus}"\nseq_len = 64\n'
                   f'batch_size = 2\nwarmup_steps = 1\nmax_steps = 3\neval_batches = 1\nlog_every = 1\n'
                   f'sample_tokens = 0\ncache_dir = "{tmp_path / "cache"}"\n[model_overrides]\n'
                   f'block_size = 16\ndropout = 0.0\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "blockstate.cli", "train", "--config", str(cfg), "--out",
                    str(tmp_path / "one"), "--quiet"], check=True, env=env, cwd=root, timeout=120)
    split_run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "blockstate.cli", "train", "--config", str(cfg), "--context-parallel", "2", "--out",
         str(tmp_path / "two"), "--quiet"], env=env, cwd=root, capture_output=True, text=True,
        timeout=180)
    assert split_run.returncode == 0, split_run.stderr[-3000:]

    def losses(run):
        return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (one, two)


def test_train_refuses_context_parallelism_it_cannot_run_in_one_line(tmp_path, capsys):
    from blockstate.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text " * 200)
    argv = ["train", "--model", "bst-sh-s4", "--size", "tiny", "--data", str(corpus), "--out",
            str(tmp_path / "run"), "--max-steps", "1", "--cache-dir", str(tmp_path / "cache")]
    for extra, message in [(["--context-parallel", "2"], "needs exactly that many processes"),
                           (["--context-parallel", "0"], "context_parallel=0 must be")]:
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
