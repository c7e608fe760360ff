"""The step-boundary agreement of data-parallel processes (blockstate.distributed_budget)."""

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blockstate.device import Distributed
from blockstate.distributed_budget import agree_at_boundary, saved_by_main


def test_one_process_decides_alone_without_a_collective():
    one = Distributed()
    assert not dist.is_initialized()
    now = agree_at_boundary(one, torch.device("cpu"), None, 3.5, lambda t: t >= 4)
    assert (now.signal, now.budget_spent, now.elapsed, now.stop) == (None, False, 3.5, False)
    now = agree_at_boundary(one, torch.device("cpu"), "SIGINT", 4.0, lambda t: t >= 4)
    assert (now.signal, now.budget_spent, now.stop) == ("SIGINT", True, True)
    calls = []
    assert saved_by_main(one, lambda: calls.append(1)) is not None and calls == []


def _process(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    ddp, cpu = Distributed(rank, 2, rank), torch.device("cpu")
    asked = []
    # each process reads another clock and holds another budget rule: process 0's are used
    rounds = [agree_at_boundary(ddp, cpu, None, 10.0 + 5 * rank,
                                lambda t: asked.append(t) or t >= (11 if rank == 0 else 0)),
              # a signal on process 1 alone stops both; SIGTERM wins over SIGINT
              agree_at_boundary(ddp, cpu, "SIGINT" if rank == 1 else None, 1.0, lambda t: False),
              agree_at_boundary(ddp, cpu, ["SIGTERM", "SIGINT"][rank], 1.0, lambda t: False)]
    written = []

    def save():  # process 0 writes slowly; process 1 must not return before it is done
        if rank == 0:
            time.sleep(0.5)
            written.append(time.time())

    saved_by_main(ddp, save)()
    returned = time.time()
    Path(out, f"{rank}.json").write_text(json.dumps({
        "rounds": [[r.signal, r.budget_spent, r.elapsed, r.stop] for r in rounds], "asked": asked,
        "written": written, "returned": returned}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_follow_process_0_and_any_signal(tmp_path):
    mp.spawn(_process, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert first["rounds"] == second["rounds"] == [[None, False, 10.0, False],
                                                   ["SIGINT", False, 1.0, True],
                                                   ["SIGTERM", False, 1.0, True]]
    assert second["asked"] == [] and first["asked"] == [10.0]  # only process 0 decides
    assert second["returned"] >= first["written"][0]  # process 1 waited for the checkpoint
