"""The selective scan's mathematics as pure functions (no parameters, no module state), used by
`ssm/selective.py`'s module and by context parallelism: the chunked state-space-duality scan for
one decay per head or per state dimension and for complex decays (`ssd_chunked`), the rotary
kind in its rotating frame (`ssd_rotary`), the states at block ends (`ssd_block_ends`,
`ssd_rotary_block_ends`), an explicit recurrence they are tested against (`ssd_reference`), and
the decays and readouts of a state handed over from earlier positions (`state_decays`,
`state_outputs`).

Shapes: x (B, L, K, G, P) inputs per channel K, head G and head dimension P; dt (B, L, K, G) step
sizes; a (K, G, N') decays (N' = 1 for one per head, N per state dimension; complex for rotating
modes); b, c (B, L, K, N); states (B, K, G, P, N).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def per_state(a: torch.Tensor) -> torch.Tensor:
    """Decays (K, G) (one per head) or (K, G, N) (one per head and state dimension) -> (K, G, N')
    with N' = 1 or N, so that one code path serves both."""
    return a.unsqueeze(-1) if a.dim() == 2 else a


def _log_decays(dt: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """dt (B, nc, T, K, G), a (K, G) or (K, G, N) -> log decays of every step (B, nc, K, G, N', T)."""
    return (dt.unsqueeze(-1) * per_state(a)).permute(0, 1, 3, 4, 5, 2)


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
    y = y + real_part(torch.einsum("bztkn,bzkgpn,bzkgnt->bztkgp", c, states[:, :-1],
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


def halves(z: torch.Tensor) -> torch.Tensor:
    """Complex (..., M) -> real (..., 2M): the real parts, then the imaginary parts (the layout of
    the cache's state and of B and C's projections)."""
    return torch.cat([z.real, z.imag], -1)


def from_halves(t: torch.Tensor) -> torch.Tensor:
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


def rotated(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, omega: torch.Tensor,
             b: torch.Tensor):
    """A rotary problem as a scalar-decay one (see `ssd_rotary`): x (B, L, K*G, 1, P), dt
    (B, L, K*G, 1), a (K*G, 1), real B_s e^{-i theta_s} (B, L, K*G, N), and the cos and sin of
    the phases (B, L, K, G, N/2), to turn C with (`turned_c`)."""
    batch, length, k, g, p = x.shape
    cos, sin = _rotations(dt, omega)
    return (x.reshape(batch, length, k * g, 1, p), dt.reshape(batch, length, k * g, 1),
            a.reshape(k * g, 1), _turned(*_parts(b), cos, sin).flatten(2, 3), (cos, sin))


def _parts(z: torch.Tensor, conjugate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The real and imaginary parts of B or C (B, L, K, M), or of their conjugates, each
    (B, L, K, 1, M) to broadcast over a channel's heads."""
    return z.real.unsqueeze(3), (-z.imag if conjugate else z.imag).unsqueeze(3)


def turned_c(c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
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
    xs, dts, a, br, (cos, sin) = rotated(x, dt, a, omega, b)
    if initial_state is not None:  # theta_0 = 0: the two frames agree before the first step
        initial_state = halves(initial_state).reshape(batch, k * g, 1, p, -1)
    y, state = ssd_chunked(xs, dts, a, br, turned_c(c, cos, sin), chunk, initial_state)
    return y.reshape(batch, length, k, g, p), unrotated(state, cos[:, -1], sin[:, -1])


def unrotated(state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary scan's final state (B, K*G, 1, P, N) (real and imaginary halves, in the turning
    frame) as the complex state (B, K, G, P, N/2) of the fixed frame; cos and sin of the last
    phases (B, K, G, N/2)."""
    batch, k, g, _ = cos.shape
    state = from_halves(state.reshape(batch, k, g, state.shape[-2], -1))
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


def real_part(y: torch.Tensor) -> torch.Tensor:
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
    return real_part(torch.einsum("bzkn,bzkgpn->bzkgp", c[:, :, -1], states))


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
    return real_part(torch.stack(ys, 1)), h


def state_decays(dt: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The decay of a state from before the first step to after each step t, exp(a (dt_1 + ... +
    dt_t)), (B, L, K, G, N') in `dtype`: dt (B, L, K, G), a as `ssd_chunked` takes it (real
    (K, G) or (K, G, N), or complex (K, G, N) for rotating modes). The log decays are summed in
    float64 (complex128), so that magnitudes and phases stay precise over long sequences."""
    wide = torch.complex128 if a.is_complex() else torch.float64
    log_decays = dt.unsqueeze(-1).to(wide) * per_state(a).to(wide)       # (B, L, K, G, N')
    return torch.exp(torch.cumsum(log_decays, dim=1)).to(dtype)


def state_outputs(c: torch.Tensor, decays: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """What a state before the first step, state (B, K, G, P, N), adds to the scan's outputs:
    Re(C_t . decays_t state), (B, L, K, G, P), for c (B, L, K, N) and decays (B, L, K, G, N') from
    `state_decays`. The scan is linear in its initial state: `ssd_chunked` with it equals the
    scan from zeros plus this."""
    if decays.shape[-1] == 1:  # one decay per head: C_t . state once for all its heads
        read = torch.einsum("btkn,bkgpn->btkgp", c, state)                   # (B, L, K, G, P)
        return real_part(read * decays)
    return real_part(torch.einsum("btkn,btkgn,bkgpn->btkgp", c, decays, state))
