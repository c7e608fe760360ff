"""Chunked computation of structured (S4, S4D) convolutions: no FFT, no full-length kernel.

The sequence is cut into chunks of T steps. With x_t = dA x_{t-1} + dB u_t and y_t = s Re(C x_t)
(s = 2 for S4D, which keeps one state of each conjugate pair, 1 for S4), the output of step t of a
chunk whose previous state is x is

    y_t = s Re(C dA^(t+1) x)  +  sum_{j <= t} K[t - j] u_j,       K[l] = s Re(C dA^l dB),

and the state after the chunk is dA^T x + sum_j dA^(T-1-j) dB u_j. So a chunk costs a T x T
lower-triangular Toeplitz product (the first T kernel taps only) plus two products with an N-wide
state, all matrix multiplications; the states at chunk boundaries follow from a scan over the
L / T chunks, done here by log2(L / T) doubling steps so that no Python loop runs per chunk.

Per output element this is about T + 4N multiply-adds, against the FFT path's kernel of L taps
(an L x N complex Vandermonde for S4D, a Cauchy/Woodbury evaluation at L frequencies for S4) and
three transforms of size >= 2L. Everything is differentiable and equals the FFT path up to
float32 rounding (tests/test_chunked.py checks values and gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ChunkOperators:
    """Matrices of one chunk of T steps (computed from the discretized system, differentiable).

    taps (C, H, T) real: K[0..T-1].  inp (C, H, N, T): column j is dA^(T-1-j) dB.
    out (C, H, T, N): row t is s C dA^(t+1).  decay: dA^T, (C, H, N) when diagonal, else (C, H, N, N).
    readout (C, H, N): s C, so that y = Re(readout x). S4D's are complex (diagonal dA); S4's are
    real (dense dA in real coordinates).
    """

    taps: torch.Tensor
    inp: torch.Tensor
    out: torch.Tensor
    decay: torch.Tensor
    readout: torch.Tensor


def krylov(a: torch.Tensor, v: torch.Tensor, c: torch.Tensor, count: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For batches of matrices a (..., N, N) and vectors v, c (..., N): the columns
    [v, a v, ..., a^(count-1) v] (..., N, count), the rows [c; c a; ...; c a^(count-1)]
    (..., count, N) and a^count, by doubling (log2(count) rounds of batched products, the powers
    a^(2^k) shared by both sides) without materializing the other powers of a."""
    cols, rows, step = v.unsqueeze(-1), c.unsqueeze(-2), a
    while cols.shape[-1] < count:
        cols = torch.cat([cols, step @ cols], dim=-1)                           # a^m [v .. a^(m-1) v]
        rows = torch.cat([rows, rows @ step], dim=-2)
        step = step @ step
    if cols.shape[-1] != count:  # count is not a power of two
        step = torch.linalg.matrix_power(a, count)
    return cols[..., :count], rows[..., :count, :], step


def chunk_operators(kernel: torch.nn.Module, chunk: int) -> ChunkOperators:
    """The chunk matrices of a structured kernel (one with a `chunk_operators` method: `S4DKernel`,
    `S4Kernel`) for chunks of `chunk` steps."""
    build = getattr(kernel, "chunk_operators", None)
    if build is None:
        raise TypeError(f"chunked convolution needs a kernel with a state-space form (S4 or S4D), "
                        f"not {type(kernel).__name__}")
    return build(chunk)


def _toeplitz(taps: torch.Tensor) -> torch.Tensor:
    """taps (..., T) -> lower-triangular Toeplitz (..., T, T) with [t, j] = taps[t - j]."""
    t = taps.shape[-1]
    idx = torch.arange(t, device=taps.device)
    diff = idx[:, None] - idx[None, :]                                              # t - j
    full = taps[..., diff.clamp(min=0)]
    return full.masked_fill(diff < 0, 0.0)


def _scan(z: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """Inclusive scan over the chunk axis, s_k = decay s_{k-1} + z_k, for z (B, C, H, nc, N):
    complex with a diagonal decay (C, H, N), or real with a dense decay (C, H, N, N)."""
    nc = z.shape[-2]
    shift, g = 1, decay
    while shift < nc:
        moved = torch.cat([torch.zeros_like(z[..., :shift, :]), z[..., : nc - shift, :]], dim=-2)
        if decay.dim() == 3:
            z = z + g.unsqueeze(-2) * moved
            g = g * g
        else:
            z = z + torch.einsum("chnm,bchkm->bchkn", g, moved)
            g = g @ g
        shift *= 2
    return z


def _chunk_states(u: torch.Tensor, ops: ChunkOperators) -> torch.Tensor:
    """u (B, H, nc, T) -> states (B, C, H, nc, N) at the end of every chunk."""
    if ops.inp.is_complex():
        inp = torch.view_as_real(ops.inp)                                           # (C, H, N, T, 2)
        z = torch.view_as_complex(torch.einsum("chnjr,bhkj->bchknr", inp, u).contiguous())
    else:
        z = torch.einsum("chnj,bhkj->bchkn", ops.inp, u)
    return _scan(z, ops.decay)


def chunked_causal_conv(u: torch.Tensor, ops: ChunkOperators) -> torch.Tensor:
    """Causal convolution of u (B, H, L) with the structured kernel behind `ops` -> (B, C, H, L),
    equal to `fft_causal_conv(u, kernel(L))` (the D skip term is not included)."""
    batch, width, length = u.shape
    t = ops.taps.shape[-1]
    nc = -(-length // t)
    u = F.pad(u, (0, nc * t - length)).reshape(batch, width, nc, t)                  # (B, H, nc, T)
    real = ops.taps.dtype
    u = u.to(real)
    # Within each chunk: one Toeplitz product per (filter, channel).
    y = torch.einsum("chtj,bhkj->bchkt", _toeplitz(ops.taps), u)                    # (B, C, H, nc, T)
    states = _chunk_states(u, ops)                                                  # (B, C, H, nc, N)
    if nc > 1:  # chunk k starts from the state at the end of chunk k-1: Re(out @ state)
        prev = states[..., :-1, :]
        if ops.out.is_complex():
            prev, out = torch.view_as_real(prev), torch.view_as_real(ops.out)       # (..., N, 2)
            carry = torch.einsum("chtnr,bchknr->bchkt", torch.stack([out[..., 0], -out[..., 1]], -1),
                                 prev)
        else:
            carry = torch.einsum("chtn,bchkn->bchkt", ops.out, prev)
        y[..., 1:, :] += carry  # in place: the Toeplitz product's backward does not need y
    return y.reshape(batch, -1, width, nc * t)[..., :length]


def chunk_end_states(u: torch.Tensor, ops: ChunkOperators) -> torch.Tensor:
    """States (B, C, H, nc, N) at the ends of the chunks of u (B, H, L), L a multiple of T: complex
    for S4D, real coordinates for S4 (see `chunk_operators`)."""
    batch, width, length = u.shape
    t = ops.taps.shape[-1]
    if length % t:
        raise ValueError(f"length {length} is not a multiple of the chunk size {t}")
    return _chunk_states(u.to(ops.taps.dtype).reshape(batch, width, length // t, t), ops)


def end_outputs(states: torch.Tensor, ops: ChunkOperators) -> torch.Tensor:
    """Outputs s Re(C x) (B, C, H, nc) from states (B, C, H, nc, N), such as the chunk-end states
    of `chunk_end_states` (the D skip term is not included)."""
    if states.is_complex():
        return torch.einsum("chn,bchkn->bchk", ops.readout, states).real
    return torch.einsum("chn,bchkn->bchk", ops.readout, states)


__all__ = [
    "ChunkOperators", "chunk_operators", "chunked_causal_conv", "chunk_end_states", "end_outputs", "krylov",
]
