"""Context parallelism for BST: one long sequence split by whole blocks across processes.

A BST layer needs no attention across blocks: block self-attention and the cross-attention to
SH/MH context states read only the current block, and everything else but the SSM is pointwise.
Only the SSM's state crosses a block boundary. So rank r of P holds positions [r L/P, (r+1) L/P)
(whole blocks), runs every layer on them as if the sequence started there, and repairs each SSM
layer's outputs with the state the previous ranks leave:

    x_in(r) = sum_{q < r} dA^((r - 1 - q) L/P) e_q,      y_t += s Re(C dA^(t+1) x_in(r)),

where e_q is rank q's own end state (its inputs alone, from a zero state). The e_q (B, C, H, N per
layer, independent of the length) are exchanged by one all-gather per SSM layer in the forward
pass and one all-reduce in the backward pass, so forward and backward run on all ranks at once;
nothing of size L/P is ever sent, where ring attention passes every block's keys and values
around the ring. The gathered states are combined by each rank locally (a sequential sum over
the ranks before it, P terms).

The selective kernel (ssm/selective.py) needs two more things from the ranks before. Its causal
convolution reads the CONV_WIDTH - 1 = 3 inputs before each position: rank r takes rank r - 1's
last 3 (`previous_inputs`, one all-gather of B x 3 x width numbers). And its state decays by
input-dependent factors, so no fixed power moves e_q across the ranks between: each rank also
computes d_q, what a state is multiplied by across its part (the product of its per-step decays;
complex for rotating modes), the pairs (e_q, d_q) are all-gathered, and each rank combines the
ranks before it by a sequential scan, x_in(q + 1) = d_q x_in(q) + e_q (`incoming_state`), and adds
Re(C_t (decay from its start to t) x_in) to its outputs (`ssd.state_outputs`).

Supported: BST presets with SH or MH context states and an S4, S4D or selective kernel (every
decay kind), with block self-attention. MF (its summaries of the previous block cross rank
boundaries), the unstructured kernels, sliding or full self-attention and the segment-recurrent
baselines are refused with a one-line error by `check_model`.

Use it as

    with context_parallel(group):            # every process of `group`, same model and seed
        logits = model(local_tokens)         # this rank's whole blocks; loss over its targets

then sum the parameters' gradients over the group (`all_reduce_gradients`), as data parallelism
averages them. Outputs and gradients equal the single-process computation up to float rounding
(tests/test_context_parallel.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .ssm.chunked import ChunkOperators, chunk_end_states


@dataclass(frozen=True)
class _Group:
    group: dist.ProcessGroup | None
    rank: int
    size: int


_ACTIVE: list[_Group] = []


@contextmanager
def context_parallel(group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Within this block, SSM layers treat the input as this rank's part of a sequence split in
    rank order over `group` (default: the whole world)."""
    if not dist.is_initialized():
        raise ValueError("context parallelism needs torch.distributed initialized (torchrun)")
    _ACTIVE.append(_Group(group, dist.get_rank(group), dist.get_world_size(group)))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active() -> bool:
    return bool(_ACTIVE)


def check_model(config) -> None:
    """Raise ValueError, in one line, unless `config` (a ModelConfig) can run context-parallel."""
    problems = []
    if not config.arch.block_parallel:
        problems.append(f"arch {config.arch.kind!r} carries memory or states across blocks")
    if config.self_attention != "block":
        problems.append(f"self_attention={config.self_attention!r} reads keys from earlier blocks")
    if config.resolved_bst_layers:
        if config.context.summarizes_blocks:
            problems.append(f"{config.context.kind.upper()} context states summarise the previous "
                            f"block, which may lie on another rank")
        if not config.ssm.constant_state:
            problems.append(f"ssm kind {config.ssm.kind!r} has no state handed over between "
                            f"ranks here (s4, s4d and ssd do)")
    if problems:
        raise ValueError("context parallelism supports BST with SH/MH context states, an S4, S4D "
                         "or selective (ssd) kernel and block self-attention: "
                         + "; ".join(problems))


def split(tokens: torch.Tensor, rank: int, size: int, block_size: int) -> torch.Tensor:
    """This rank's part of `tokens` (B, L): L must be a multiple of size x block_size."""
    length = tokens.shape[1]
    if length % (size * block_size):
        raise ValueError(f"context parallelism over {size} processes needs a length that is a "
                         f"multiple of {size} x W = {size * block_size}, not {length}")
    part = length // size
    return tokens[:, rank * part:(rank + 1) * part]


def all_reduce_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every parameter's gradient over `group`: each rank's holds its own positions' share."""
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, group=group)


class _AllGather(torch.autograd.Function):
    """Differentiable all-gather along a new first axis (gloo has no reduce-scatter: the backward
    sums the gradients over ranks with an all-reduce and keeps this rank's slice)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
        ctx.group, ctx.rank = group, rank
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None


def previous_inputs(tail: torch.Tensor) -> torch.Tensor:
    """The last inputs of the previous rank's part, for this rank's own last ones tail (B, w, width):
    what a causal convolution of w + 1 taps reads before this rank's first position (zeros on
    rank 0, as before a sequence). One differentiable all-gather of B x w x width numbers."""
    grouping = _ACTIVE[-1]
    gathered = _AllGather.apply(tail, grouping.group, grouping.rank, grouping.size)  # (ranks, B, w, width)
    if grouping.rank == 0:  # zeros that still use the gather, so that rank 0's backward joins its
        return 0.0 * gathered[0]  # all-reduce (a collective all must join)
    return gathered[grouping.rank - 1]


def _as_real(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, numbers): complex entries as their real and imaginary parts."""
    return (torch.view_as_real(tensor) if tensor.is_complex() else tensor).flatten(1)


def _unpacked(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`_as_real`'s inverse for tensors gathered along a new first axis: (ranks, B, numbers) ->
    (ranks, *like.shape), complex where `like` is."""
    if not like.is_complex():
        return flat.reshape(flat.shape[0], *like.shape)
    parts = flat.reshape(flat.shape[0], *like.shape, 2)                        # (ranks, B, ..., 2)
    return torch.complex(parts[..., 0], parts[..., 1])


def incoming_state(own: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """The state of a selective SSM entering this rank's part (zeros on rank 0). own (B, K, G,
    P, N): the state this rank's inputs alone leave at its end (from a zero state); decay (B, K,
    G, N'): what the state is multiplied by across this rank's part (a decay per head or per
    state dimension, complex for rotating modes; `ssd.state_decays`). Both depend on the
    input, so each rank all-gathers every rank's pair, B x K x G x (P N + N') numbers (P: a
    head's width), in one differentiable all-gather, and combines the ranks before it by a
    sequential scan,

        x_in(0) = 0,      x_in(q + 1) = decay_q x_in(q) + own_q,

    one term per earlier rank, computed by every rank for itself."""
    grouping = _ACTIVE[-1]
    packed = torch.cat([_as_real(own), _as_real(decay)], dim=1)               # (B, numbers)
    gathered = _AllGather.apply(packed, grouping.group, grouping.rank, grouping.size)
    split_at = _as_real(own).shape[1]
    owns = _unpacked(gathered[..., :split_at], own)                           # (ranks, B, K, G, P, N)
    decays = _unpacked(gathered[..., split_at:], decay)                       # (ranks, B, K, G, N')
    incoming = torch.zeros_like(own)
    for q in range(grouping.rank):
        incoming = decays[q].unsqueeze(-2) * incoming + owns[q]
    return incoming + 0.0 * gathered.sum()  # every rank uses the gather (see `previous_inputs`)


def _powers(step: torch.Tensor, first: torch.Tensor, count: int, dense: bool) -> torch.Tensor:
    """[first, step first, ..., step^(count-1) first] along a new axis -2, by doubling:
    first (B, C, H, N) -> (B, C, H, count, N); step (C, H, N) diagonal or (C, H, N, N) dense."""
    states = first.unsqueeze(-2)                                             # (B, C, H, 1, N)
    while states.shape[-2] < count:
        if dense:
            moved = torch.einsum("chnm,bchkm->bchkn", step, states)
        else:
            moved = step.unsqueeze(-2) * states
        states = torch.cat([states, moved], dim=-2)
        step = step @ step if dense else step * step
    return states[..., :count, :]


def _power(step: torch.Tensor, exponent: int, dense: bool) -> torch.Tensor:
    return torch.linalg.matrix_power(step, exponent) if dense else step ** exponent


def _chunk(length: int, chunk_size: int) -> int:
    """The largest chunk <= chunk_size that divides length."""
    for chunk in range(min(chunk_size, length), 0, -1):
        if length % chunk == 0:
            return chunk
    return 1


def carried_outputs(operators: Callable[[int], ChunkOperators], u: torch.Tensor, chunk_size: int
                    ) -> torch.Tensor:
    """The part of the SSM's outputs (B, C, H, L) that the earlier ranks' inputs contribute, for
    this rank's inputs u (B, H, L): zero on rank 0. `operators(chunk)`: the SSM's chunk matrices
    (`SSM._operators`, cached while gradients are off)."""
    grouping = _ACTIVE[-1]
    length = u.shape[-1]
    ops = operators(_chunk(length, chunk_size))
    u = u.to(ops.taps.dtype)
    dense = not ops.decay.is_complex()
    own = chunk_end_states(u, ops)[..., -1, :]                               # (B, C, H, N)
    nc = length // ops.taps.shape[-1]
    span = _power(ops.decay, nc, dense)                                      # dA^(L/P)
    stored = own if dense else torch.view_as_real(own)
    gathered = _AllGather.apply(stored, grouping.group, grouping.rank, grouping.size)
    states = gathered if dense else torch.view_as_complex(gathered)          # (P, B, C, H, N)
    incoming = torch.zeros_like(own)
    for q in range(grouping.rank):
        if dense:
            incoming = torch.einsum("chnm,bchm->bchn", span, incoming) + states[q]
        else:
            incoming = span * incoming + states[q]
    incoming = incoming + 0.0 * states.sum(0)  # every rank uses the gathered states, so every
    # rank's backward reaches the gather's all-reduce (a collective all must join)
    starts = _powers(ops.decay, incoming, nc, dense)                         # (B, C, H, nc, N)
    if dense:
        carry = torch.einsum("chtn,bchkn->bchkt", ops.out, starts)
    else:
        carry = torch.einsum("chtn,bchkn->bchkt", ops.out, starts).real
    return carry.reshape(*carry.shape[:3], length)
