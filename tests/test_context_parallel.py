"""Context parallelism (blockstate.context_parallel): a sequence split by whole blocks over P gloo
processes gives the single-process outputs and gradients, and what cannot be split is refused."""

import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, replace
from unittest import mock

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
from blockstate.ssm import selective


@dataclass(frozen=True)
class Case:
    """A model and a batch to run split over processes and in one."""
    preset: str
    length: int
    dtype: torch.dtype = torch.float64
    overrides: tuple = ()        # (name, value) pairs for build_model
    batch: int = 2
    changed: int | None = None   # the tokens [changed - 3, changed) replaced by others
    halo: bool = True            # False: each rank's convolution reads zeros before its part
    backward: bool = True


SMALL = (("d_model", 16), ("vocab_size", 64))  # for 64k tokens in seconds
# Steps small enough that states outlast a rank's part (at the default steps, 1e-3 to 1e-1, they
# fade within about 100 positions): at 64k tokens over 4 ranks each state handed over still moves
# the logits at the end of the next rank's 16k tokens (by 5e-8; the tolerance is 1e-10), and at
# 256 tokens rank 0's inputs move rank 3's last logits (by 7e-6), through ranks 1 and 2.
SLOW_DECAY = (("dt_min", 1e-5), ("dt_max", 1e-4))
LONG_MEMORY = (("dt_min", 1e-3), ("dt_max", 1e-2))


def _model_and_data(case: Case):
    torch.manual_seed(0)
    model = build_model(case.preset, "tiny", dropout=0.0, **dict(case.overrides)).to(case.dtype)
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (case.batch, case.length), generator=generator)
    probe = torch.randn(case.batch, case.length, vocab, generator=generator).to(case.dtype)
    if case.changed is not None:
        tokens[:, case.changed - 3:case.changed] = (tokens[:, case.changed - 3:case.changed] + 1) % vocab
    return model, tokens, probe


def _run(model, tokens, probe, backward: bool) -> dict:
    logits = model(tokens)
    if backward:
        (logits * probe).sum().backward()
    return {"logits": logits.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


def _worker(rank: int, size: int, init: str, cases: list[Case], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
    results = []
    for case in cases:
        model, tokens, probe = _model_and_data(case)
        block = model.config.block_size
        halo = nullcontext() if case.halo else mock.patch.object(
            selective, "previous_inputs", lambda tail: torch.zeros_like(tail))
        with context_parallel(), halo:  # this rank's share of the loss
            result = _run(model, split(tokens, rank, size, block), split(probe, rank, size, block),
                          case.backward)
        all_reduce_gradients(model)
        parts = [torch.empty_like(result["logits"]) for _ in range(size)]
        dist.all_gather(parts, result["logits"].contiguous())
        results.append({**result, "logits": torch.cat(parts, 1)})
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _split_and_whole(cases: list[Case], size: int) -> list[tuple[dict, dict]]:
    """For each case, (the results of `size` processes, those of one): logits and gradients. One
    process runs the cases while the spawned ones do."""
    with tempfile.TemporaryDirectory() as directory:
        spawned = mp.spawn(_worker, args=(size, f"{directory}/init", cases, f"{directory}/out.pt"),
                           nprocs=size, join=False)
        whole = [_run(*_model_and_data(case), case.backward) for case in cases]
        while not spawned.join():
            pass
        split_results = torch.load(f"{directory}/out.pt")
    return list(zip(split_results, whole, strict=True))


def _errors_of(got: dict, want: dict) -> tuple[float, float]:
    """Max abs error of the outputs, and of the gradients relative to each one's max abs."""
    assert set(got["grads"]) == set(want["grads"])
    return (float((got["logits"] - want["logits"]).abs().max()),
            max((float((got["grads"][n] - g).abs().max() / g.abs().max().clamp(min=1e-30))
                 for n, g in want["grads"].items()), default=0.0))


def _errors(preset: str, length: int, size: int, dtype: torch.dtype) -> tuple[float, float]:
    return _errors_of(*_split_and_whole([Case(preset, length, dtype)], size)[0])


@pytest.mark.slow
@pytest.mark.parametrize("preset,length,size", [("bst-sh-s4", 256, 2), ("bst-mh-s4", 512, 4)])
def test_split_sequences_equal_one_process_in_float64(preset, length, size):
    out, grad = _errors(preset, length, size, torch.float64)
    assert out < 1e-10 and grad < 1e-9, (out, grad)


# The selective kernel, each decay kind and 64k tokens over 2 and 4 processes, in two spawns. On
# 2 processes also the convolution's halo: rank 0's last 3 tokens changed (the inputs rank 1's
# first convolution taps read), run once as it is and once with the halo replaced by zeros.
HALO = Case("bst-sh-ssd", 256, changed=128)
SELECTIVE = {
    2: [Case("bst-sh-ssd", 256), Case("bst-mh-s4", 256, overrides=(("ssm_kernel", "ssd"),
                                                                   ("ssd_decay", "state"))),
        Case("bst-sh-ssd-rotary", 65536, overrides=SMALL, batch=1),
        HALO, replace(HALO, halo=False, backward=False)],
    4: [Case("bst-recommended", 256), Case("bst-sh-ssd-rotary", 256),
        Case("bst-sh-ssd", 256, overrides=(("ssd_decay", "complex"),)),
        Case("bst-sh-ssd", 65536, overrides=SMALL + SLOW_DECAY, batch=1),
        Case("bst-sh-ssd", 256, overrides=LONG_MEMORY)],
}


@pytest.fixture(scope="module")
def selective_runs():
    runs: dict[int, list[tuple[dict, dict]]] = {}

    def run(size: int) -> list[tuple[dict, dict]]:
        if size not in runs:
            runs[size] = _split_and_whole(SELECTIVE[size], size)
        return runs[size]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("size,index", [(2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2), (4, 3),
                                        (4, 4)])
def test_selective_ssms_split_over_processes_equal_one_process_in_float64(size, index,
                                                                          selective_runs):
    """The selective kernel's input-dependent state is handed over for every decay kind (head:
    bst-sh-ssd, bst-recommended; state; complex; rotary), at 256 tokens and at 64k (head and
    rotary)."""
    out, grad = _errors_of(*selective_runs(size)[index])
    assert out < 1e-10 and grad < 1e-9, (SELECTIVE[size][index], out, grad)


@pytest.mark.slow
def test_the_convolution_reads_the_previous_rank_s_last_inputs(selective_runs):
    """Changing rank 0's last tokens changes rank 1's outputs exactly as in one process, and
    would not without the halo (rank 1's convolution reading zeros before its part)."""
    (base, base_whole), (changed, changed_whole), (no_halo, _) = selective_runs(2)[:1] + \
        selective_runs(2)[3:]
    rank_1 = slice(HALO.changed, None)
    change = changed["logits"][:, rank_1] - base["logits"][:, rank_1]
    whole_change = changed_whole["logits"][:, rank_1] - base_whole["logits"][:, rank_1]
    assert whole_change[:, :3].abs().max() > 1e-3
    assert (change - whole_change).abs().max() < 1e-10
    assert max(_errors_of(changed, changed_whole)) < 1e-9
    assert (no_halo["logits"] - changed_whole["logits"])[:, rank_1].abs().max() > 1e-4


@pytest.mark.slow
def test_a_long_sequence_split_over_two_processes_in_float32():
    out, grad = _errors("bst-sh-s4d", 16384, 2, torch.float32)
    assert out < 1e-5 and grad < 1e-4, (out, grad)


@pytest.mark.parametrize("preset,message", [
    ("bst-mf-s4", "MF context states"), ("bst-mf-ssd-rotary", "MF context states"),
    ("bst-sh-unstruct", "ssm kind 'unstruct'"), ("slide", "self_attention='sliding'"),
    ("transformer", "self_attention='full'"), ("brt", "arch 'brt'"),
    ("transformer-xl", "arch 'transformer-xl'")])
def test_what_cannot_be_split_is_refused_in_one_line(preset, message):
    with pytest.raises(ValueError, match="context parallelism supports") as error:
        check_model(model_config(preset, "tiny"))
    assert message in str(error.value) and "\n" not in str(error.value)
    check_model(model_config("bst-sh-s4", "tiny"))
    check_model(model_config("bst-mh-s4", "tiny", ssm="s4d"))
    for preset in ("bst-sh-ssd", "bst-sh-ssd-rotary", "bst-recommended"):
        check_model(model_config(preset, "tiny"))


def test_split_takes_whole_blocks_in_rank_order():
    tokens = torch.arange(64).reshape(1, 64)
    assert split(tokens, 1, 2, 16).tolist() == [list(range(32, 64))]
    with pytest.raises(ValueError, match="multiple of 4 x W = 64"):
        split(tokens[:, :48], 0, 4, 16)
    with pytest.raises(ValueError, match="torch.distributed"):
        with context_parallel():
            pass


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["bst-sh-s4", "bst-recommended"])
def test_training_split_over_two_processes_logs_the_losses_of_one(tmp_path, preset):
    """`blockstate train --context-parallel 2` under torchrun: every process reads the same
    sequences and computes its own blocks; the losses equal one process's (S4, and the selective
    kernel)."""
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
    cfg.write_text(f'model = "{preset}"\nsize = "tiny"\ndata = "{corpus}"\nseq_len = 64\n'
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
