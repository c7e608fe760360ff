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
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import SelectiveSSMCache
from ..components import ConfigError, kinds, positive, register
from ..config import DecayOptions, SSMOptions
from ..context_parallel import active as context_parallel_active
from ..context_parallel import incoming_state, previous_inputs
from .eager import eager
from .layer import check_step_range
from .ssd import (
    from_halves,
    halves,
    per_state,
    real_part,
    rotated,
    ssd_block_ends,
    ssd_chunked,
    ssd_rotary,
    ssd_rotary_block_ends,
    state_decays,
    state_outputs,
    turned_c,
    unrotated,
)

SSD_DECAYS = ("head", "state", "complex", "rotary")  # the decay kinds the scan computes
PAIRED_SSD_DECAYS = ("complex", "rotary")  # those that pair state dimensions into complex modes
CONV_WIDTH = 4        # taps of the causal depthwise convolution before the SSM (Mamba's d_conv)
# Heads per channel: each has its own step size and decay, so a channel holds several memory
# horizons at once (one head of random decay rarely reaches beyond a few blocks at
# initialization). Heads of at least 4 dimensions, at most 8 per channel (the in-chunk decay
# matrices grow with channels x heads).
MIN_HEAD_DIM, MAX_HEADS = 4, 8


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

    initializes_itself = True  # the model's generic initialization leaves it alone

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
        # Per head (K, G): a step dt below it is taken as 0, so that position neither decays the
        # state nor writes to it. None (the default): no position skipped.
        # Set by `blockstate.ssm.skip.skip_filler`; not in the state dict (a checkpoint carries it
        # in its train state: `blockstate.ssm.skip.skip_thresholds`).
        self.register_buffer("skip_below", None, persistent=False)

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
        dt = self._skipped(dt.view(batch, length, k.channels, k.heads))
        b, c = self._bc(x)
        xs = x.view(batch, length, 1, k.heads, width // k.heads).expand(-1, -1, k.channels, -1, -1)
        return x, xs, dt, b, c

    def _skipped(self, dt: torch.Tensor) -> torch.Tensor:
        """dt (..., K, G) with the steps below `skip_below` set to 0."""
        if self.skip_below is None:
            return dt
        return dt.masked_fill(dt < self.skip_below.to(dt.dtype), 0.0)

    def _bc(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B_t and C_t, each (..., K, N), from x (..., P)."""
        k = self.kernel
        bc = F.linear(x, k.to_bc.weight.to(x.dtype)).unflatten(-1, (2, k.channels, k.state_size))
        if k.bc_gain is not None:
            bc = F.rms_norm(bc, (k.state_size,), eps=1e-6) * k.bc_gain.to(x.dtype)
        if k.a_imag is not None:  # complex modes: (..., K, N/2) with the halves as real, imaginary
            bc = from_halves(bc)
        return bc.unbind(-3)

    def _packed(self, state: torch.Tensor) -> torch.Tensor:
        """A complex state (..., N/2) as the real (..., N) the cache keeps; real states unchanged."""
        return halves(state) if state.is_complex() else state

    def _unpacked(self, state: torch.Tensor) -> torch.Tensor:
        return from_halves(state) if self.kernel.a_imag is not None else state

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
                rxs, rdt, ra, rb, (cos, sin) = rotated(xs, dt, *rotary, b)
                y, state = self._fused(rxs, rdt, ra, rb, turned_c(c, cos, sin))
                return y.view(xs.shape), unrotated(state, cos[:, -1], sin[:, -1])
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
        dt = self._skipped(F.softplus(F.linear(x, k.to_dt.weight.to(dtype), k.to_dt.bias.to(
            dtype))).view(batch, k.channels, k.heads))                               # (B, K, G)
        b, c = (t.view(batch, k.channels, 1, 1, -1) for t in self._bc(x))          # (B, K, 1, 1, N)
        xs = x.view(batch, 1, k.heads, -1)                                          # (B, 1, G, P/G)
        decay = torch.exp(dt.unsqueeze(-1) * per_state(self._decay(dt))).unsqueeze(-2)  # (B, K, G, 1, N')
        state = torch.addcmul(decay * self._unpacked(cache.state),
                              (xs * dt.unsqueeze(-1)).unsqueeze(-1), b)
        cache.state = self._packed(state)
        if not output:
            return None
        y = real_part((state * c).sum(-1)).flatten(-2)                                   # (B, K, P)
        return torch.addcmul(y, self.D.to(dtype), x.unsqueeze(1))


# ---------------------------------------------------------------------- configs (`ModelConfig.ssm`)
@register("decay", "head")
@dataclass
class HeadDecay(DecayOptions):
    """One scalar decay per head (Mamba-2)."""


@register("decay", "state")
@dataclass
class StateDecay(DecayOptions):
    """One decay per head and state dimension (Mamba's S6: N time scales per head, A_n = n + 1
    at initialization)."""


@dataclass
class _RotatingDecay(DecayOptions):
    """The N real state dimensions of a head as N/2 complex modes that decay and rotate by
    dt_t A_m (A_m = -1/2 + i pi m at initialization, S4D-Lin), so that a mode's phase counts the
    steps the input chose to take. The first `still_modes` modes of each head start at frequency
    zero instead (still learned): a key held in a turning mode is read back with a phase that
    depends on how far back it was written; still modes hold it unturned."""

    still_modes: int = 0

    paired: ClassVar[bool] = True

    def check(self) -> None:
        super().check()
        if self.still_modes < 0:
            raise ConfigError(f"{self.path}.still_modes={self.still_modes} must be >= 0")


@register("decay", "complex")
@dataclass
class ComplexDecay(_RotatingDecay):
    """Complex modes, each with its own (complex) decay."""


@register("decay", "rotary")
@dataclass
class RotaryDecay(_RotatingDecay):
    """Complex modes sharing one real decay per head (a Mamba-2 decay) with a frequency per
    mode: equal to "complex" at initialization and about as fast as "head" (B_t and C_t are
    rotated by the phases, then the scalar-decay scan runs)."""


def _default_decay() -> DecayOptions:
    return HeadDecay()


@register("ssm", "ssd")
@dataclass
class SelectiveOptions(SSMOptions):
    """The selective (input-dependent) SSM of this module: `heads` per SSM channel, each with its
    own step size and decay (None: as many as give heads of at least 4 dimensions, at most 8),
    its `decay` kind, and `bc_norm` to RMS-normalize B_t and C_t (learned gains). Always
    computed chunk by chunk (it has no fixed kernel to FFT)."""

    state_size: int = 16            # N
    dt_min: float = 1e-3            # range of the initial step size (log-uniform)
    dt_max: float = 1e-1
    heads: int | None = None
    decay: DecayOptions = field(default_factory=_default_decay)
    bc_norm: bool = False

    def check(self) -> None:
        super().check()
        if not isinstance(self.decay, DecayOptions):
            raise ConfigError(f"ssm.decay={self.decay!r} is not valid; give a decay kind "
                              f"({', '.join(kinds('decay'))})")
        positive("ssm.state_size", self.state_size)
        check_step_range(self.path, self.dt_min, self.dt_max)
        if self.heads is not None:
            positive("ssm.heads", self.heads)
        if self.decay.paired and self.state_size % 2:
            raise ConfigError(f"ssm.decay kind {self.decay.kind!r} pairs state dimensions into "
                              f"complex modes and needs an even ssm.state_size, not {self.state_size}")
        still = self.decay.still_modes_or_zero
        if not 0 <= still <= self.state_size // 2:
            raise ConfigError(f"ssm.decay.still_modes={still}; accepted: 0 to the "
                              f"{self.state_size // 2} modes of a head (ssm.state_size / 2)")

    def validate(self, model) -> None:
        if self.heads is not None and model.ssm_width % self.heads:
            raise ConfigError(f"ssm.heads={self.heads} must divide the SSM width {model.ssm_width} "
                              f"(d_model // ssm.width_divisor)")

    def build_ssm(self, model, channels: int, width: int) -> SelectiveSSM:
        return SelectiveSSM(channels, width, self.state_size, self.dt_min, self.dt_max,
                            self.chunk_size, self.heads, self.decay.kind, self.bc_norm,
                            self.decay.still_modes_or_zero)
