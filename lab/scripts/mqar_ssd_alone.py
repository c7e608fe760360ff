"""The selective SSM without BST around it, on the MQAR task of lab/logs/long_range.md, 8e
(4 pairs, queried 4 blocks of 16 or more later): a stack of `layers` blocks
x + Out(SSM(In(Norm x))), then x + MLP(Norm x), with no attention, so the only path from a pair to
its query is the SSM state. The same task, batch, learning rate and step count as the BST runs
beside it; the optimizer here is plain AdamW with a cosine to 0. Prints the loss every 250 steps
and the accuracy on 256 held-out sequences; --out writes the record as JSON.

    python lab/scripts/mqar_ssd_alone.py --width 64 --state 16 --steps 3000 [--small-init]

--chain reads the SSM through three linear maps in series (width -> d with a bias, d -> d, d -> d),
as BST's SH context path does (lift, value projection, output projection), instead of one;
--suite-optimizer uses the task suite's AdamW betas (0.9, 0.98) and cosine to 10% of the lr;
--bc-norm RMS-normalizes B_t and C_t (`ssd_bc_norm`); --tied ties the output head to the
embedding, as BST's language model does; --pairs, --gap and --seq-len change the task
(default 4, 64, 96; --gap 0 --seq-len 32 puts the queries right after the pairs).
--small-init gives it BST's initialization (BlockStateLM.reset_parameters: Normal(0, 0.02)
embeddings and projections, residual outputs scaled by 1/sqrt(2 layers), the SSM's own left as
they are); without it, PyTorch's defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from blockstate.ssm.selective import SelectiveSSM
from blockstate.tasks import make_task
from blockstate.tasks.generators import IGNORE


class Block(nn.Module):
    def __init__(self, d: int, width: int, state: int, decay: str, chain: bool = False,
                 bc_norm: bool = False):
        super().__init__()
        self.norm, self.mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.inp = nn.Linear(d, width, bias=False)
        self.out = (nn.Sequential(nn.Linear(width, d), nn.Linear(d, d, bias=False),
                                  nn.Linear(d, d, bias=False)) if chain
                    else nn.Linear(width, d, bias=False))
        self.ssm = SelectiveSSM(1, width, state, 1e-3, 1e-1, chunk_size=16, decay=decay,
                                bc_norm=bc_norm)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.out(self.ssm(self.inp(self.norm(x)))[:, :, 0])
        return x + self.mlp(self.mlp_norm(x))


class Stack(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, width: int, state: int, decay: str,
                 chain: bool = False, bc_norm: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, width, state, decay, chain, bc_norm) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, vocab)
        self.tied = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        for block in self.blocks:
            x = block(x)
        if self.tied:  # BST's output head: the embedding's weight, no bias
            return F.linear(self.norm(x), self.embedding.weight)
        return self.head(self.norm(x))

    def small_init(self, layers: int) -> None:
        nn.init.normal_(self.embedding.weight, std=0.02)
        for name, module in self.named_modules():
            if ".kernel" in name or not isinstance(module, nn.Linear):
                continue
            scale = 1 / math.sqrt(2 * layers) if name.endswith((".out", ".out.2", "mlp.2")) else 1.0
            nn.init.normal_(module.weight, std=0.02 * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=16, help="SSM width P")
    parser.add_argument("--state", type=int, default=8, help="SSM state size N")
    parser.add_argument("--decay", default="head", help="ssd_decay")
    parser.add_argument("--d", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small-init", action="store_true")
    parser.add_argument("--chain", action="store_true")
    parser.add_argument("--suite-optimizer", action="store_true")
    parser.add_argument("--bc-norm", action="store_true", help="ssd_bc_norm: RMS-normalized B_t, C_t")
    parser.add_argument("--tied", action="store_true", help="output head tied to the embedding")
    parser.add_argument("--pairs", type=int, default=4, help="key-value pairs")
    parser.add_argument("--gap", type=int, default=64, help="filler between the pairs and the queries")
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    task = make_task("mqar", num_pairs=args.pairs, gap=args.gap, seq_len=args.seq_len)
    model = Stack(task.vocab_size, args.d, args.layers, args.width, args.state, args.decay,
                  args.chain, args.bc_norm)
    if args.tied:
        del model.head
        model.tied = True
    if args.small_init:
        model.small_init(args.layers)
    params = sum(p.numel() for p in model.parameters())
    betas, floor = ((0.9, 0.98), 0.1) if args.suite_optimizer else ((0.9, 0.999), 0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=betas, weight_decay=0.0)
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / warmup) * (
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * s / args.steps))))
    losses, started = [], time.time()
    for step in range(args.steps):
        batch = task.sample(args.batch, seed=1000 + step)
        logits = model(batch.inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            print(f"step {step + 1} loss {sum(losses[-250:]) / 250:.3f} "
                  f"({time.time() - started:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        held_out = task.sample(256, seed=10**9)
        scored = held_out.targets != IGNORE
        accuracy = (model(held_out.inputs).argmax(-1)[scored] == held_out.targets[scored]).float()
    print(f"width {args.width} state {args.state} decay {args.decay} params {params}: "
          f"accuracy {accuracy.mean().item():.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "params": params, "accuracy": accuracy.mean().item(),
                       "losses": losses, "seconds": time.time() - started}, f)


if __name__ == "__main__":
    main()
