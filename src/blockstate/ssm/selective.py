"""A selective (input-dependent) state-space model for BST's context states, in the form of
Mamba-2's state-space duality (Dao and Gu 2024), computed chunk by chunk in pure PyTorch.

The SSM input u (B, L, P) is RMS-normalized and passes a short causal depthwise convolution and a
SiLU (as in Mamba), giving x. For each of C channels (1 for SH, H for MH, S for MF) and each of its
G heads of width P / G, with a decay A < 0 per head (Mamba-2; or, with decay="state", one per head
and state dimension, as Mamba's S6), an input-dependent step dt_t > 0 per head and input-dependent
B_t, C_t in R^N shared by the heads of a channel:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        (h_t: P/G x N per head; A scales its columns)
    y_t = h_t C_t + D x_t

With decay="complex" the N real dimensions are N/2 complex modes: B_t, C_t in C^(N/2) (the first
and second halves of the projections are the real and imaginary parts), A_m complex with negative
real part (S4D-Lin at initialization, -1/2 + i pi m), and y_t = Re(h_t C_t) + D x_t. A mode's
phase advances by dt_t Im(A_m) at every step, so it measures the steps the input chose to take
(a time-invariant rotation, as in S4D, measures positions). The cache keeps the complex state as
its real and imaginary halves, the same N numbers per head as the real kinds. With decay="rotary"
the modes of a head share one real part (a Mamba-2 decay) and keep a frequency each: in the frame
that turns with the phases, the scan is the scalar-decay one with rotated B_t and C_t (`ssd_rotary`),
so it costs about what decay="head" does, where "complex" forms T x T decays per mode.

so what enters the state, and how long it stays, depend on the token (unlike S4/S4D, whose filter
is the same whatever the input). The chunked algorithm: inside a chunk of T steps the outputs are
an attention-like product (C_t . B_s) exp(sum of a over (s, t]) dt_s x_s, masked causally; each
chunk's own contribution to the state at its end is one product; the states at chunk boundaries
follow from a product with the (nc x nc) matrix of decays between chunks. All matrix products,
memory O(L T) (O(L T N) with a decay per state dimension, whose in-chunk decays differ by
dimension), no loop over positions. State and arithmetic in float32.

On CUDA with the optional `mamba-ssm` package installed, the fused Triton chunk scan of that
package computes the same function (`use_fused`; one decay per head, and decay="rotary" through its
rotated B and C); elsewhere the PyTorch path does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cache import SelectiveSSMCache
from ..config import PAIRED_SSD_DECAYS, SSD_DECAYS
from ..context_parallel import active as context_parallel_active
from ..context_parallel import incoming_state, previous_inputs
from .eager import eager

CONV_WIDTH = 4        # taps of the causal depthwise convolution before the SSM (Mamba's d_conv)
# Heads per channel: each has its own step size and decay, so a channel holds several memory
# horizons at once (one head of random decay rarely reaches beyond a few blocks at
# initialization). Heads of at least 4 dimensions, at most 8 per channel (the in-chunk decay
# matrices grow with channels x heads).
MIN_HEAD_DIM, MAX_HEADS = 4, 8
# decay="rotary": steps whose phases are formed from one float64 reference (see `_rotations`)
PHASE_GROUP = 16
# decay="rotary", MF: numbers of turned B formed at a time (a few MB: kept in cache)
BLOCK_GROUP = 2 ** 20


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a (..., T) -> (..., T, T) with [t, s] = a[s+1] + ... + a[t] for s <= t, -inf above the
    diagonal: the log decay from step s to step t."""
    t = a.shape[-1]
    cumulative = torch.cumsum(a, dim=-1)
    sums = cumulative[..., :, None] - cumulative[..., None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~causal, float("-inf"))  # complex: -inf + 0i, whose exp is 0


def _chunks(chunk: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """(B, L, ...) -> (B, L / T, T, ...), padding L to a multiple of T with zeros (dt = 0 on the
    padding: no decay and no input, so states are unchanged by it)."""
    pad = -tensors[0].shape[1] % chunk
    out = []
    for t in tensors:
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        out.append(t.reshape(t.shape[0], t.shape[1] // chunk, chunk, *t.shape[2:]))
    return out


def _per_state(a: torch.Tensor) -> torch.Tensor:
    """Decays (K, G) (one per head) or (K, G, N) (one per head and state dimension) -> (K, G, N')
    with N' = 1 or N, so that one code path serves both."""
    return a.unsqueeze(-1) if a.dim() == 2 else a


def _log_decays(dt: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """dt (B, nc, T, K, G), a (K, G) or (K, G, N) -> log decays of every step (B, nc, K, G, N', T)."""
    return (dt.unsqueeze(-1) * _per_state(a)).permute(0, 1, 3, 4, 5, 2)


def _boundary_states(xdt: torch.Tensor, cumulative: torch.Tensor, b: torch.Tensor,
                     initial_state: torch.Tensor | None) -> torch.Tensor:
    """States at every chunk boundary (B, nc + 1, K, G, P, N): entry z is the state entering
    chunk z (z = nc: after the last chunk). xdt (B, nc, T, K, G, P) real, cumulative log decays
    (B, nc, K, G, N', T), b (B, nc, T, K, N) (complex, with the state, for complex modes)."""
    to_end = torch.exp(cumulative[..., -1:] - cumulative)                     # (B, nc, K, G, N', T)
    own = torch.einsum("bzskn,bzkgns,bzskgp->bzkgpn", b, to_end, xdt.to(b.dtype))  # (B, nc, K, G, P, N)
    return _carried(own, cumulative[..., -1], initial_state)


def _carried(own: torch.Tensor, chunk_decay: torch.Tensor, initial_state: torch.Tensor | None
             ) -> torch.Tensor:
    """The states at every chunk boundary (B, nc + 1, K, G, P, N) from each chunk's own
    contribution to the state at its end, own (B, nc, K, G, P, N), the log decay across each
    chunk, chunk_decay (B, nc, K, G, N'), and the state before the first chunk (B, K, G, P, N)
    or None (zeros)."""
    if initial_state is None:
        initial_state = own.new_zeros(own[:, :1].shape)
    else:
        initial_state = initial_state.unsqueeze(1).to(own.dtype)
    own = torch.cat([initial_state, own], dim=1)                              # (B, nc+1, K, G, P, N)
    chunk_decay = F.pad(chunk_decay, (0, 0, 0, 0, 0, 0, 1, 0))                # (B, nc+1, K, G, N')
    between = torch.exp(segment_sums(chunk_decay.permute(0, 2, 3, 4, 1)))    # (B, K, G, N', nc+1, nc+1)
    return torch.einsum("bkgnzy,bykgpn->bzkgpn", between, own)


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                c: torch.Tensor, chunk: int, initial_state: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan by chunks.

    x (B, L, K, G, P), dt (B, L, K, G) > 0, a < 0 of shape (K, G) (a decay per head) or (K, G, N)
    (per head and state dimension), b and c (B, L, K, N), with K independent channels of G heads;
    initial_state (B, K, G, P, N) or None (zeros). Returns y (B, L, K, G, P) without the D term and
    the state after the last step (B, K, G, P, N). With complex a (K, G, N) (negative real parts),
    b, c and state, y is the real part of the readout and the state stays complex.
    """
    batch, length = x.shape[:2]
    x, dt, b, c = _chunks(chunk, x, dt, b, c)
    log_a = _log_decays(dt, a)                                    # (B, nc, K, G, N', T)
    cumulative = torch.cumsum(log_a, dim=-1)
    xdt = x * dt.unsqueeze(-1)                                                # (B, nc, T, K, G, P)
    # inside each chunk: causal, decayed "attention" of C_t to B_s
    if log_a.is_complex():   # rotating modes: real magnitudes, phases carried by C_t and B_s
        y = _rotating_in_chunk(log_a, cumulative, b, c, xdt)
    else:
        decay = torch.exp(segment_sums(log_a))                                # (B, nc, K, G, N', T, T)
        if decay.shape[4] == 1:  # one decay per head: C_t . B_s once for all the heads of a channel
            scores = torch.einsum("bztkn,bzskn->bzkts", c, b)                 # (B, nc, K, T, T)
            y = torch.einsum("bzkts,bzkgts,bzskgp->bztkgp", scores, decay.squeeze(4), xdt)
        else:                    # a decay per state dimension: C_t and B_s meet through it
            pairs = torch.einsum("bztkn,bzskn->bzknts", c, b)                 # (B, nc, K, N, T, T)
            y = torch.einsum("bzknts,bzkgnts,bzskgp->bztkgp", pairs, decay, xdt)
    # the state entering each chunk, decayed to each step, read by C_t
    states = _boundary_states(xdt, cumulative, b, initial_state)
    y = y + _real(torch.einsum("bztkn,bzkgpn,bzkgnt->bztkgp", c, states[:, :-1],
                               torch.exp(cumulative)))
    return y.reshape(batch, -1, *y.shape[3:])[:, :length], states[:, -1]


def _rotating_in_chunk(log_a: torch.Tensor, cumulative: torch.Tensor, b: torch.Tensor,
                       c: torch.Tensor, xdt: torch.Tensor) -> torch.Tensor:
    """The in-chunk outputs (real) of complex modes, Re(sum over s <= t and n of C_t,n B_s,n
    exp(a_s+1,n + ... + a_t,n)) dt_s x_s, without a complex exponential per pair of steps: the
    decay from s to t is exp(Re(...)) e^{i theta_t} e^{-i theta_s}, with theta the cumulative
    rotation within the chunk, so the (T x T) exponentials are real and the phases ride on C_t
    and B_s (T of them per state dimension). log_a and cumulative (B, nc, K, G, N, T) complex,
    b and c (B, nc, T, K, N) complex, xdt (B, nc, T, K, G, P) real."""
    magnitude = torch.exp(segment_sums(log_a.real))                          # (B, nc, K, G, N, T, T)
    cos, sin = torch.cos(cumulative.imag), torch.sin(cumulative.imag)         # (B, nc, K, G, N, T)
    c, b = (t.permute(0, 1, 3, 4, 2).unsqueeze(3) for t in (c, b))            # (B, nc, K, 1, N, T)
    c_re, c_im = c.real * cos - c.imag * sin, c.real * sin + c.imag * cos     # C_t e^{i theta_t}
    b_re, b_im = b.real * cos + b.imag * sin, b.imag * cos - b.real * sin     # B_s e^{-i theta_s}
    pairs = c_re.unsqueeze(-1) * b_re.unsqueeze(-2) - c_im.unsqueeze(-1) * b_im.unsqueeze(-2)
    scores = (pairs * magnitude).sum(4)                                       # (B, nc, K, G, T, T)
    return torch.einsum("bzkgts,bzskgp->bztkgp", scores, xdt)


def _halves(z: torch.Tensor) -> torch.Tensor:
    """Complex (..., M) -> real (..., 2M): the real parts, then the imaginary parts (the layout of
    the cache's state and of B and C's projections)."""
    return torch.cat([z.real, z.imag], -1)


def _from_halves(t: torch.Tensor) -> torch.Tensor:
    """(..., N) real -> (..., N/2) complex: the first half real parts, the second imaginary."""
    re, im = t.chunk(2, dim=-1)
    return torch.complex(re, im)


def _phases(start: torch.Tensor, since: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """theta = omega (dt_1 + ... + dt_t), (..., M), to the precision of `since`'s dtype for one
    product in that dtype per entry. start (..., 1): the float64 sum of dt up to a reference step
    shortly before (the first of a group of steps, or of a block); since (..., 1): the sum after
    it, in the dtype of the computation. The phase at the reference is formed and reduced modulo
    2 pi in float64; omega times the steps since is added to it."""
    base = torch.remainder(start * omega.double(), 2 * math.pi).to(since.dtype)
    return torch.addcmul(base, since, omega)


def _rotations(dt: torch.Tensor, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every mode's rotation after every step, each (B, L, K, G, M): theta_t =
    omega (dt_1 + ... + dt_t), with sums of dt in float64 and one float64 reference phase per
    PHASE_GROUP steps (`_phases`), so that long sequences keep their phases to float32
    precision."""
    length = dt.shape[1]
    steps = torch.cumsum(dt.double(), dim=1)                                  # (B, L, K, G)
    steps = F.pad(steps, (0, 0, 0, 0, 0, -length % PHASE_GROUP)).unflatten(1, (-1, PHASE_GROUP))
    steps = steps.unsqueeze(-1)                                               # (B, n, R, K, G, 1)
    start = steps[:, :, :1]
    phase = _phases(start, (steps - start).to(dt.dtype), omega).flatten(1, 2)[:, :length]
    return torch.cos(phase), torch.sin(phase)                                 # (B, L, K, G, M)


def _turned_parts(re: torch.Tensor, im: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The real and imaginary parts of (re + i im) e^{-i theta}, each in the layout of cos and
    sin of theta (..., M); re and im broadcast to them (B and C are shared by the heads of a
    channel). Real arithmetic, four products."""
    # in place on the fresh products: no third allocation (autograd keeps the factors, not them)
    return (cos * re).addcmul_(sin, im), (cos * im).addcmul_(sin, re, value=-1)


def _turned(re: torch.Tensor, im: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`_turned_parts` as one real tensor (..., 2M), the real parts, then the imaginary parts."""
    return torch.cat(_turned_parts(re, im, cos, sin), dim=-1)


def _rotated(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, omega: torch.Tensor,
             b: torch.Tensor):
    """A rotary problem as a scalar-decay one (see `ssd_rotary`): x (B, L, K*G, 1, P), dt
    (B, L, K*G, 1), a (K*G, 1), real B_s e^{-i theta_s} (B, L, K*G, N), and the cos and sin of
    the phases (B, L, K, G, N/2), to turn C with (`_turned_c`)."""
    batch, length, k, g, p = x.shape
    cos, sin = _rotations(dt, omega)
    return (x.reshape(batch, length, k * g, 1, p), dt.reshape(batch, length, k * g, 1),
            a.reshape(k * g, 1), _turned(*_parts(b), cos, sin).flatten(2, 3), (cos, sin))


def _parts(z: torch.Tensor, conjugate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The real and imaginary parts of B or C (B, L, K, M), or of their conjugates, each
    (B, L, K, 1, M) to broadcast over a channel's heads."""
    return z.real.unsqueeze(3), (-z.imag if conjugate else z.imag).unsqueeze(3)


def _turned_c(c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """C_t (B, L, K, M) complex for the rotary scan: the conjugate of C_t e^{i theta_t}, which is
    conj(C_t) e^{-i theta_t}, as reals (B, L, K*G, N), so that the real scan's C . h reads
    Re(C_t e^{i theta_t} h) from h kept as its real and imaginary halves."""
    return _turned(*_parts(c, conjugate=True), cos, sin).flatten(2, 3)


def ssd_rotary(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, omega: torch.Tensor,
               b: torch.Tensor, c: torch.Tensor, chunk: int,
               initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan with complex decays dt_t (a + i omega_m) whose real part a < 0 is one per
    head: x (B, L, K, G, P), dt (B, L, K, G), a (K, G), omega (K, G, M), b and c (B, L, K, M)
    complex, initial_state (B, K, G, P, M) complex or None. The same function as `ssd_chunked` with
    the complex decays (K, G, M), computed as a real scan with one decay per head: in the frame
    that turns with the phases theta_t = omega (dt_1 + ... + dt_t), h'_t = e^{-i theta_t} h_t
    decays by exp(dt_t a) only, takes B_t e^{-i theta_t}, and y_t = Re(h'_t C_t e^{i theta_t}). B
    and C then differ by head (their phases follow each head's steps), so each head is a channel
    of the real scan. Returns y (B, L, K, G, P) and the final state in the fixed frame."""
    batch, length, k, g, p = x.shape
    xs, dts, a, br, (cos, sin) = _rotated(x, dt, a, omega, b)
    if initial_state is not None:  # theta_0 = 0: the two frames agree before the first step
        initial_state = _halves(initial_state).reshape(batch, k * g, 1, p, -1)
    y, state = ssd_chunked(xs, dts, a, br, _turned_c(c, cos, sin), chunk, initial_state)
    return y.reshape(batch, length, k, g, p), _unrotated(state, cos[:, -1], sin[:, -1])


def _unrotated(state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary scan's final state (B, K*G, 1, P, N) (real and imaginary halves, in the turning
    frame) as the complex state (B, K, G, P, N/2) of the fixed frame; cos and sin of the last
    phases (B, K, G, N/2)."""
    batch, k, g, _ = cos.shape
    state = _from_halves(state.reshape(batch, k, g, state.shape[-2], -1))
    return state * torch.complex(cos, sin).unsqueeze(-2)


def ssd_rotary_block_ends(x, dt, a, omega, b, c, block: int) -> torch.Tensor:
    """`ssd_block_ends` for the rotary kind (arguments as `ssd_rotary`): (B, L // block, K, G, P).

    B is turned in a (block, channel, head, step) layout, so that each block's contribution to
    its end state is one batched product of contiguous matrices, and a few blocks at a time
    (about BLOCK_GROUP numbers of turned B), so that the turned B stays in cache between its
    elementwise steps and its product; C is turned at the block ends only. Each block's first
    step is its float64 reference phase (`_phases`)."""
    batch, length, k, g, p = x.shape
    nb, modes = length // block, omega.shape[-1]
    cut = nb * block
    dt_b = dt[:, :cut].unflatten(1, (nb, block)).permute(0, 1, 3, 4, 2).contiguous()  # (B, nb, K, G, T)
    within = torch.cumsum(dt_b, dim=-1)
    before = F.pad(torch.cumsum(dt_b.sum(-1, dtype=torch.float64), dim=1)[:, :-1],
                   (0, 0, 0, 0, 1, 0))                                        # (B, nb, K, G)
    start = (before + dt_b[..., 0]).unsqueeze(-1).unsqueeze(-1)               # (B, nb, K, G, 1, 1)
    since = (within - within[..., :1]).unsqueeze(-1)                          # (B, nb, K, G, T, 1)
    omega = omega.unsqueeze(-2)                                               # (K, G, 1, M)
    re, im = (t[:, :cut].unflatten(1, (nb, block)).transpose(2, 3).unsqueeze(3)
              for t in (b.real, b.imag))                                      # (B, nb, K, 1, T, M)
    cumulative = torch.cumsum(dt_b * a.unsqueeze(-1), dim=-1)                 # (B, nb, K, G, T)
    weights = torch.exp(cumulative[..., -1:] - cumulative) * dt_b             # (B, nb, K, G, T)
    xs = x[:, :cut].unflatten(1, (nb, block)).permute(0, 1, 3, 4, 2, 5)      # (B, nb, K, G, T, P)
    per = max(1, BLOCK_GROUP // (batch * k * g * block * modes))             # blocks at a time
    # When training, each group's phases, cosines, sines and turned B are formed again in the
    # backward pass instead of kept: they are T x M numbers per block and head, several times
    # what the block ends need.
    recompute = torch.is_grad_enabled()
    own = []
    # split, not sliced group by group: the backward of a slice fills a gradient of the whole
    # tensor, once per group (quadratic in L); that of a split is one concatenation
    for start_z, since_z, weights_z, xs_z, re_z, im_z in zip(
            *(t.split(per, dim=1) for t in (start, since, weights, xs, re, im)), strict=True):
        inputs = (start_z, since_z, omega, weights_z, xs_z, re_z, im_z)
        own.append(checkpoint(_group_states, *inputs, use_reentrant=False) if recompute
                   else _group_states(*inputs))                              # (B, n, K, G, P, N)
    states = _carried(torch.cat(own, 1), cumulative[..., -1:], None)[:, 1:]  # (B, nb, K, G, P, N)
    phase = _phases(start, since[..., -1:, :], omega).squeeze(-2)             # (B, nb, K, G, M)
    c_turned = _turned(*_parts(c[:, block - 1:cut:block], conjugate=True), torch.cos(phase),
                       torch.sin(phase))                                      # (B, nb, K, G, N)
    return torch.einsum("bzkgn,bzkgpn->bzkgp", c_turned, states)


def _group_states(start, since, omega, weights, xs, re, im) -> torch.Tensor:
    """The contribution of each block of a group to the state at its end (B, n, K, G, P, N), in
    the turning frame: sum over s of weights_s x_s (B_s e^{-i theta_s}) as real and imaginary
    halves. start (B, n, K, G, 1, 1) and since (B, n, K, G, T, 1) give the phases (`_phases`),
    omega (K, G, 1, M), weights (B, n, K, G, T) (decay to the block end times dt), xs
    (B, n, K, G, T, P), re and im (B, n, K, 1, T, M) the parts of B."""
    phase = _phases(start, since, omega)                                      # (B, n, K, G, T, M)
    cos, sin = torch.cos(phase), torch.sin(phase)
    xw = (weights.unsqueeze(-1) * xs).transpose(-1, -2)                       # (B, n, K, G, P, T)
    # the real and imaginary parts of B_s e^{-i theta_s} go straight into the products
    return torch.cat([xw @ t for t in _turned_parts(re, im, cos, sin)], -1)


def _real(y: torch.Tensor) -> torch.Tensor:
    """The readout of a complex state is its real part; real readouts pass unchanged."""
    return y.real if y.is_complex() else y


def ssd_block_ends(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   c: torch.Tensor, block: int) -> torch.Tensor:
    """Outputs (without D) at the last step of every complete block of `block` steps,
    (B, L // block, K, G, P): with chunks of one block, each is C_t read from a boundary state,
    so the in-chunk products are never formed."""
    nb = x.shape[1] // block
    x, dt, b, c = _chunks(block, *(t[:, :nb * block] for t in (x, dt, b, c)))
    cumulative = torch.cumsum(_log_decays(dt, a), dim=-1)        # (B, nb, K, G, N', T)
    states = _boundary_states(x * dt.unsqueeze(-1), cumulative, b, None)[:, 1:]
    return _real(torch.einsum("bzkn,bzkgpn->bzkgp", c[:, :, -1], states))


def ssd_reference(x, dt, a, b, c, initial_state=None):
    """The same recurrence step by step (for tests and as the definition); a (K, G) or (K, G, N),
    real, or complex with complex b, c (the output is then the real part of the readout)."""
    batch, length, k, g, p = x.shape
    n = b.shape[-1]
    a = a.view(k, g, 1, -1)  # a decay per head, or per head and state dimension: (K, G, 1, N')
    h = (torch.zeros(batch, k, g, p, n, dtype=b.dtype, device=b.device) if initial_state is None
         else initial_state.clone())
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, t, ..., None, None] * a) * h + torch.einsum(
            "bkgp,bkn->bkgpn", (x[:, t] * dt[:, t, ..., None]).to(b.dtype), b[:, t])
        ys.append(torch.einsum("bkgpn,bkn->bkgp", h, c[:, t]))
    return _real(torch.stack(ys, 1)), h


def state_decays(dt: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The decay of a state from before the first step to after each step t, exp(a (dt_1 + ... +
    dt_t)), (B, L, K, G, N') in `dtype`: dt (B, L, K, G), a as `ssd_chunked` takes it (real
    (K, G) or (K, G, N), or complex (K, G, N) for rotating modes). The log decays are summed in
    float64 (complex128), so that magnitudes and phases stay precise over long sequences."""
    wide = torch.complex128 if a.is_complex() else torch.float64
    log_decays = dt.unsqueeze(-1).to(wide) * _per_state(a).to(wide)       # (B, L, K, G, N')
    return torch.exp(torch.cumsum(log_decays, dim=1)).to(dtype)


def state_outputs(c: torch.Tensor, decays: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """What a state before the first step, state (B, K, G, P, N), adds to the scan's outputs:
    Re(C_t . decays_t state), (B, L, K, G, P), for c (B, L, K, N) and decays (B, L, K, G, N') from
    `state_decays`. The scan is linear in its initial state: `ssd_chunked` with it equals the
    scan from zeros plus this."""
    if decays.shape[-1] == 1:  # one decay per head: C_t . state once for all its heads
        read = torch.einsum("btkn,bkgpn->btkgp", c, state)                   # (B, L, K, G, P)
        return _real(read * decays)
    return _real(torch.einsum("btkn,btkgn,bkgpn->btkgp", c, decays, state))


def _fused_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: F401
    except ImportError:
        return False
    return True


def _precise(u: torch.Tensor) -> torch.Tensor:
    """float64 inputs stay float64; everything else is computed in float32."""
    return u if u.dtype == torch.float64 else u.float()


class SelectiveParameters(nn.Module):
    """The learned parts of a selective SSM: the input convolution, the projections to dt, B and C
    and the decays. Named `kernel` in `SelectiveSSM` so that generic initializations and optimizer
    groups treat it like the other SSM kernels."""

    max_length = None  # defined at any length (a state-space system)

    def __init__(self, channels: int, width: int, state_size: int, dt_min: float, dt_max: float,
                 heads: int | None = None, decay: str = "head", bc_norm: bool = False,
                 still_modes: int = 0):
        super().__init__()
        self.channels, self.width, self.state_size = channels, width, state_size
        if heads is None:
            heads = max(h for h in range(1, MAX_HEADS + 1)
                        if width % h == 0 and (width // h >= MIN_HEAD_DIM or h == 1))
        if heads < 1 or width % heads:
            raise ValueError(f"ssd_heads={heads} must divide the SSM width {width}")
        if decay not in SSD_DECAYS:
            raise ValueError(f"ssd_decay={decay!r}; accepted: {', '.join(SSD_DECAYS)}")
        if decay in PAIRED_SSD_DECAYS and state_size % 2:
            raise ValueError(f"ssd_decay={decay!r} needs an even state size, not {state_size}")
        if still_modes and (decay not in PAIRED_SSD_DECAYS or not 0 < still_modes <= state_size // 2):
            raise ValueError(f"ssd_still_modes={still_modes} needs a rotating kind (complex, rotary) "
                             f"and at most state_size / 2 = {state_size // 2} modes")
        self.heads, self.decay = heads, decay
        # The SSM input is RMS-normalized first: B, C and x enter the state as a product, so with the
        # small inputs of BST's 0.02-std down-projection the selective path would start about 1e-3
        # below the skip term and barely learn (measured: MQAR loss stuck at ln 64).
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.conv = nn.Conv1d(width, width, CONV_WIDTH, groups=width)
        self.to_dt = nn.Linear(width, channels * self.heads)
        self.to_bc = nn.Linear(width, 2 * channels * state_size, bias=False)
        # Optionally B_t and C_t are RMS-normalized over N with learned gains (2, K, N): entries of
        # unit scale, so that what the state carries starts near the skip term's scale instead of
        # about 1% of it (B and C enter the output as a product).
        self.bc_gain = nn.Parameter(torch.ones(2, channels, state_size)) if bc_norm else None
        # dt starts log-uniform in [dt_min, dt_max] (softplus(bias) = dt)
        dt = torch.exp(torch.rand(channels * self.heads) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        with torch.no_grad():
            self.to_dt.bias.copy_(dt + torch.log(-torch.expm1(-dt)))              # inverse softplus
            self.to_dt.weight.mul_(0.1)
        self.a_imag = None   # the rotation of each complex mode (decay="complex" or "rotary")
        if decay == "head":  # one decay per head, A in [1, 16] (Mamba-2): (K, G)
            a = torch.empty(channels, heads).uniform_(1, 16)
        elif decay == "state":  # one per head and state dimension, A_n = n + 1 (S4D-Real): (K, G, N)
            a = torch.arange(1, state_size + 1, dtype=torch.float32).repeat(channels, heads, 1)
        else:  # N/2 complex modes per head, A_m = -1/2 + i pi m (S4D-Lin); the real parts are
            # (K, G, N/2), or (K, G) for "rotary" (one per head): the same numbers at initialization
            modes = state_size // 2
            a = torch.full((channels, heads) + ((modes,) if decay == "complex" else ()), 0.5)
            frequencies = math.pi * torch.arange(modes, dtype=torch.float32)
            frequencies[:still_modes] = 0  # still modes: decay without turning
            self.a_imag = nn.Parameter(frequencies.repeat(channels, heads, 1))
        self.log_a = nn.Parameter(torch.log(a))
        for p in (self.to_dt.bias, self.log_a, self.bc_gain, self.a_imag):
            if p is not None:
                p._no_weight_decay = True  # type: ignore[attr-defined]


class SelectiveSSM(nn.Module):
    """Input-dependent SSM with the interface of `ssm.SSM`: u (B, L, P) -> y (B, L, C, P) in
    float32, block-end outputs for MF, and exact block-wise inference with a constant-size state
    (the last CONV_WIDTH - 1 inputs and the (C, G, P/G, N) SSM state)."""

    def __init__(self, channels: int, width: int, state_size: int, dt_min: float, dt_max: float,
                 chunk_size: int = 64, heads: int | None = None, decay: str = "head",
                 bc_norm: bool = False, still_modes: int = 0):
        super().__init__()
        self.kernel = SelectiveParameters(channels, width, state_size, dt_min, dt_max, heads, decay,
                                          bc_norm, still_modes)
        self.chunk_size = chunk_size
        self.D = nn.Parameter(torch.randn(channels, width))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.use_fused = True  # the mamba-ssm kernel on CUDA when installed

    @property
    def channels(self) -> int:
        return self.kernel.channels

    def _normalized(self, u: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        return F.rms_norm(u, (u.shape[-1],), k.norm.weight.to(u.dtype), k.norm.eps)

    def _inputs(self, u: torch.Tensor):
        """x (B, L, K, G, P/G), dt (B, L, K, G), b and c (B, L, K, N) from u (B, L, P) (zeros
        before it)."""
        return self._convolved(self._normalized(u), None)

    def _convolved(self, normalized: torch.Tensor, before: torch.Tensor | None):
        """`_inputs` from the normalized inputs (B, L, P), the convolution reading `before`
        (B, CONV_WIDTH - 1, P), normalized inputs too, ahead of them (None: zeros)."""
        k = self.kernel
        batch, length, width = normalized.shape
        dtype = normalized.dtype  # float32 (float64 for float64 inputs)
        if before is None:
            before = normalized.new_zeros(batch, CONV_WIDTH - 1, width)
        padded = torch.cat([before, normalized], dim=1).transpose(1, 2)          # (B, P, L + 3)
        x = F.silu(F.conv1d(padded, k.conv.weight.to(dtype), k.conv.bias.to(dtype),
                            groups=width)).transpose(1, 2)                        # (B, L, P)
        dt = F.softplus(F.linear(x, k.to_dt.weight.to(dtype), k.to_dt.bias.to(dtype)))
        dt = dt.view(batch, length, k.channels, k.heads)
        b, c = self._bc(x)
        xs = x.view(batch, length, 1, k.heads, width // k.heads).expand(-1, -1, k.channels, -1, -1)
        return x, xs, dt, b, c

    def _bc(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B_t and C_t, each (..., K, N), from x (..., P)."""
        k = self.kernel
        bc = F.linear(x, k.to_bc.weight.to(x.dtype)).unflatten(-1, (2, k.channels, k.state_size))
        if k.bc_gain is not None:
            bc = F.rms_norm(bc, (k.state_size,), eps=1e-6) * k.bc_gain.to(x.dtype)
        if k.a_imag is not None:  # complex modes: (..., K, N/2) with the halves as real, imaginary
            bc = _from_halves(bc)
        return bc.unbind(-3)

    def _packed(self, state: torch.Tensor) -> torch.Tensor:
        """A complex state (..., N/2) as the real (..., N) the cache keeps; real states unchanged."""
        return _halves(state) if state.is_complex() else state

    def _unpacked(self, state: torch.Tensor) -> torch.Tensor:
        return _from_halves(state) if self.kernel.a_imag is not None else state

    def _decay(self, like: torch.Tensor) -> torch.Tensor:
        """A: (K, G) or (K, G, N) real < 0, or (K, G, N/2) complex with real part < 0, in the
        precision of `like`."""
        k = self.kernel
        real = -torch.exp(k.log_a.to(like.dtype))
        if k.a_imag is None:
            return real
        imag = k.a_imag.to(like.dtype)
        return torch.complex(real.unsqueeze(-1).expand_as(imag) if real.dim() == 2 else real, imag)

    def _rotary(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(a (K, G), omega (K, G, N/2)) for decay="rotary", else None."""
        k = self.kernel
        if k.decay != "rotary":
            return None
        return -torch.exp(k.log_a.to(like.dtype)), k.a_imag.to(like.dtype)

    def _chunked(self, xs, dt, b, c, initial_state=None):
        rotary = self._rotary(xs)
        if rotary is not None:
            return ssd_rotary(xs, dt, *rotary, b, c, self.chunk_size, initial_state)
        return ssd_chunked(xs, dt, self._decay(xs), b, c, self.chunk_size, initial_state)

    def _scan(self, xs, dt, b, c, initial_state=None):
        if self.use_fused and initial_state is None and _fused_available(xs.device):
            a, rotary = self._decay(xs), self._rotary(xs)
            if a.dim() == 2:  # mamba-ssm's scan: one decay per head
                return self._fused(xs, dt, a, b, c)
            if rotary is not None:  # the same scan with B and C rotated per head (see ssd_rotary)
                rxs, rdt, ra, rb, (cos, sin) = _rotated(xs, dt, *rotary, b)
                y, state = self._fused(rxs, rdt, ra, rb, _turned_c(c, cos, sin))
                return y.view(xs.shape), _unrotated(state, cos[:, -1], sin[:, -1])
        return self._chunked(xs, dt, b, c, initial_state)

    def _fused(self, xs, dt, a, b, c):
        """mamba-ssm's Triton chunk scan (CUDA only): channels folded into its heads, each
        channel's B and C a group of its own."""
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        batch, length, k, g, p = xs.shape
        y, final = mamba_chunk_scan_combined(
            xs.reshape(batch, length, k * g, p).contiguous(), dt.reshape(batch, length, k * g),
            a.reshape(k * g), b.contiguous(), c.contiguous(), chunk_size=self.chunk_size,
            return_final_states=True)
        return y.view(batch, length, k, g, p).float(), final.view(batch, k, g, p, -1).float()

    def _output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y (B, L, K, G, P/G) + D x -> (B, L, K, P)."""
        y = y.flatten(-2)
        return y + self.D.to(y.dtype) * x.unsqueeze(2)

    @eager
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=u.device.type, enabled=False):
            if context_parallel_active():
                return self._part_of_sequence(_precise(u))
            x, xs, dt, b, c = self._inputs(_precise(u))
            y, _ = self._scan(xs, dt, b, c)
            return self._output(y, x)

    def _part_of_sequence(self, u: torch.Tensor) -> torch.Tensor:
        """`forward` on this rank's part of a sequence split over processes
        (blockstate.context_parallel): the convolution reads the previous rank's last inputs,
        and the state the earlier ranks leave is added to the scan from zeros (the scan is linear
        in its initial state)."""
        normalized = self._normalized(u)
        before = previous_inputs(normalized[:, 1 - CONV_WIDTH:])               # (B, 3, P)
        x, xs, dt, b, c = self._convolved(normalized, before)
        y, own = self._scan(xs, dt, b, c)
        decays = state_decays(dt, self._decay(xs), own.dtype)                   # (B, L, K, G, N')
        incoming = incoming_state(own, decays[:, -1])                           # (B, K, G, P, N)
        return self._output(y + state_outputs(c, decays, incoming), x)

    @eager
    def block_end_outputs(self, u: torch.Tensor, block_size: int) -> torch.Tensor:
        """Outputs at the last position of every complete block (B, L // W, C, P), equal to
        `forward(u)[:, W-1::W]`, read from the states at block boundaries (what MF needs)."""
        if context_parallel_active():  # the halo and the state handed over live in `forward`
            return self.forward(u)[:, block_size - 1::block_size]
        with torch.autocast(device_type=u.device.type, enabled=False):
            x, xs, dt, b, c = self._inputs(_precise(u))
            rotary = self._rotary(xs)
            y = (ssd_block_ends(xs, dt, self._decay(xs), b, c, block_size) if rotary is None
                 else ssd_rotary_block_ends(xs, dt, *rotary, b, c, block_size))  # (B, nb, K, G, P)
            return self._output(y, x[:, block_size - 1::block_size][:, :y.shape[1]])

    # ---- inference (blockstate.cache): one position at a time
    @torch.no_grad()
    def allocate_cache(self, batch: int, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> SelectiveSSMCache:
        k = self.kernel
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return SelectiveSSMCache(
            torch.zeros(batch, k.channels, k.heads, k.width // k.heads, k.state_size, device=device,
                        dtype=dtype),
            torch.zeros(batch, CONV_WIDTH - 1, k.width, device=device, dtype=dtype))

    @torch.no_grad()
    def prefill_cache(self, u: torch.Tensor, cache: SelectiveSSMCache) -> None:
        """Fill an empty cache with the inputs u (B, T, P) of the first T positions."""
        u = u.to(cache.state.dtype)
        _, xs, dt, b, c = self._inputs(u)
        _, state = self._chunked(xs, dt, b, c)
        cache.state = self._packed(state)
        cache.tail = torch.cat([cache.tail, self._normalized(u)], 1)[:, -(CONV_WIDTH - 1):]

    @torch.no_grad()
    def step(self, u: torch.Tensor, cache: SelectiveSSMCache, output: bool = True
             ) -> torch.Tensor | None:
        """Advance by one position of inputs u (B, P): h = exp(dt a) h + dt x B^T, y = h C + D x;
        returns y (B, C, P), or None when `output` is false."""
        k = self.kernel
        batch, dtype = u.shape[0], cache.state.dtype
        window = torch.cat([cache.tail, self._normalized(u.to(dtype)).unsqueeze(1)], 1)  # (B, 4, P)
        cache.tail = window[:, 1:]
        # the causal convolution's last output: the window against the taps, oldest first
        taps = k.conv.weight[:, 0].t().to(dtype)                                     # (4, P)
        x = F.silu((window * taps).sum(1) + k.conv.bias.to(dtype))                  # (B, P)
        dt = F.softplus(F.linear(x, k.to_dt.weight.to(dtype), k.to_dt.bias.to(dtype))).view(
            batch, k.channels, k.heads)                                              # (B, K, G)
        b, c = (t.view(batch, k.channels, 1, 1, -1) for t in self._bc(x))          # (B, K, 1, 1, N)
        xs = x.view(batch, 1, k.heads, -1)                                          # (B, 1, G, P/G)
        decay = torch.exp(dt.unsqueeze(-1) * _per_state(self._decay(dt))).unsqueeze(-2)  # (B, K, G, 1, N')
        state = torch.addcmul(decay * self._unpacked(cache.state),
                              (xs * dt.unsqueeze(-1)).unsqueeze(-1), b)
        cache.state = self._packed(state)
        if not output:
            return None
        y = _real((state * c).sum(-1)).flatten(-2)                                   # (B, K, P)
        return torch.addcmul(y, self.D.to(dtype), x.unsqueeze(1))
