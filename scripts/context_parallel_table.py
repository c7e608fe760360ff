"""Context parallelism measured: outputs and gradients of a sequence split over P gloo processes
against one process, the peak memory each process adds for the forward and backward pass, and
the time it takes, for P in --processes and each length in --lengths.

    python scripts/context_parallel_table.py --out docs/benchmarks/context_parallel

writes a markdown table and JSON. Activation memory is what the forward pass saves for the
backward pass (the storages of the tensors autograd keeps, parameters excluded, counted once
each), the largest over the ranks; time is the slowest rank's forward+backward. On a CPU with
fewer cores than processes the times measure the machine, not the method.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blockstate import build_model
from blockstate.context_parallel import all_reduce_gradients, check_model, context_parallel, split


def _setup(preset: str, length: int, batch: int):
    torch.manual_seed(0)
    model = build_model(preset, "tiny", dropout=0.0)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    probe = torch.randn(batch, length, model.config.vocab_size, generator=generator)
    return model, tokens, probe


class _SavedBytes:
    """Bytes of the storages autograd saves for the backward pass (parameters excluded)."""

    def __init__(self, model: torch.nn.Module):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def total(self) -> int:
        return sum(self.seen.values())


def _worker(rank: int, size: int, init: str, preset: str, length: int, batch: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
    model, tokens, probe = _setup(preset, length, batch)
    check_model(model.config)
    block = model.config.block_size
    local, local_probe = split(tokens, rank, size, block), split(probe, rank, size, block)
    del tokens, probe
    dist.barrier()
    saved = _SavedBytes(model)
    start = time.perf_counter()
    with context_parallel(), torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        logits = model(local)
    (logits * local_probe).sum().backward()
    all_reduce_gradients(model)
    seconds, grown = time.perf_counter() - start, saved.total()
    parts = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(parts, logits.detach().contiguous())
    stats = torch.tensor([seconds, float(grown)])
    gathered = [torch.empty_like(stats) for _ in range(size)]
    dist.all_gather(gathered, stats)
    if rank == 0:
        torch.save({"logits": torch.cat(parts, 1), "stats": torch.stack(gathered),
                    "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}},
                   out)
    dist.destroy_process_group()


def measure(preset: str, length: int, size: int, batch: int) -> dict:
    model, tokens, probe = _setup(preset, length, batch)
    logits = model(tokens)
    (logits * probe).sum().backward()
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_worker, args=(size, f"{directory}/init", preset, length, batch,
                                f"{directory}/out.pt"), nprocs=size)
        got = torch.load(f"{directory}/out.pt")
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"preset": preset, "length": length, "processes": size, "batch": batch,
            "output_max_abs_error": float((got["logits"] - logits.detach()).abs().max()),
            "gradient_max_abs_error": max(float((got["grads"][n] - g).abs().max())
                                          for n, g in grads.items()),
            "gradient_max_abs": max(float(g.abs().max()) for g in grads.values()),
            "seconds": float(got["stats"][:, 0].max()),
            "activation_mib_per_process": float(got["stats"][:, 1].max()) / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bst-sh-s4d")
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for size in (int(x) for x in args.processes.split(",")):
            rows.append(measure(args.preset, length, size, args.batch))
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"`python {' '.join(sys.argv)}` ({args.preset}, tiny, float32, batch {args.batch}, "
             f"gloo on CPU, one thread per process)", "",
             "| length | processes | max abs error, outputs | max abs error, gradients (max |grad|) "
             "| activation MiB per process | seconds (slowest process) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['length']:,} | {r['processes']} | {r['output_max_abs_error']:.1e} | "
                     f"{r['gradient_max_abs_error']:.1e} ({r['gradient_max_abs']:.1e}) | "
                     f"{r['activation_mib_per_process']:,.1f} | {r['seconds']:.2f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps({"command": " ".join(sys.argv),
                                                        "rows": rows}, indent=2))
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
