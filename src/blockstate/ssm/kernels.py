"""Convolution kernel generators: parameters -> a causal kernel of shape (C, H, L) for any L.

C is the number of filters per SSM channel (1 for SH, H for MH, S for MF) and H the SSM width.
Kernels are computed in float32 (float64 when the parameters are float64) with autocast disabled.

- `S4DKernel`: diagonal state space (Gu et al. 2022, "On the Parameterization and Initialization of
  Diagonal State Space Models"), zero-order-hold discretization, S4D-Lin or S4D-Inv initialization.
- `S4Kernel`: the structured DPLR form of S4 (Gu et al. 2022, "Efficiently Modeling Long Sequences
  with Structured State Spaces") with HiPPO-LegS initialization, bilinear discretization.
- `ImplicitKernel`: the paper's unstructured filter, exp(-alpha t) * MLP(PosEmb(t)).
- `ExplicitKernel`: a directly learned kernel with the squash and smooth regularization of
  Fu et al. 2023 ("Simple Hardware-Efficient Long Convolutions for Sequence Modeling").

SSM parameters carry `_no_weight_decay = True` so optimizers can exclude them from decay.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..components import ConfigError, choice, positive, register
from .chunked import ChunkOperators, krylov
from .layer import KernelOptions, check_step_range


@contextmanager
def _full_precision(device: torch.device):
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _mark_no_weight_decay(*params: nn.Parameter) -> None:
    for p in params:
        p._no_weight_decay = True  # type: ignore[attr-defined]


def _real_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _complex(p: torch.Tensor) -> torch.Tensor:
    """A parameter stored as (..., 2) real pairs, as a complex tensor in the computation dtype."""
    return torch.view_as_complex(p.to(_real_dtype(p)).contiguous())


def _log_dt_init(channels: int, width: int, dt_min: float, dt_max: float) -> torch.Tensor:
    u = torch.rand(channels, width)
    return u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # (C, H)


class S4DKernel(nn.Module):
    """Diagonal SSM x' = A x + B u, y = 2 Re(C x) with N/2 complex states per channel.

    Discretized by zero-order hold: dA = exp(dt A), dB = (dA - 1) / A * B, with B = 1 folded into
    C as in S4D. Kernel K[l] = 2 Re(sum_n C_n dB_n dA_n^l).
    """

    initializes_itself = True  # the model's generic initialization leaves it alone

    max_length = None  # defined at any length (a state-space system)

    def __init__(self, channels: int, width: int, state_size: int = 16, init: str = "inv",
                 dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        if state_size % 2:
            raise ValueError(f"state_size={state_size} must be even (conjugate pairs)")
        n = state_size // 2
        self.channels, self.width, self.state_size = channels, width, state_size
        arange = torch.arange(n, dtype=torch.float32)
        real = torch.full((n,), 0.5)
        if init == "lin":
            imag = math.pi * arange
        elif init == "inv":
            imag = state_size / math.pi * (state_size / (2 * arange + 1) - 1)
        elif init == "real":  # S4D-Real: A_n = -(n + 1), decays without rotation (as Mamba's)
            real, imag = arange + 1, None
        else:
            raise ValueError(f"init={init!r} is not valid; allowed values: lin, inv, real")
        self.log_dt = nn.Parameter(_log_dt_init(channels, width, dt_min, dt_max))
        self.log_neg_real = nn.Parameter(torch.log(real).expand(channels, width, n).clone())
        if imag is None:  # real stays real: no imaginary part is learned
            self.register_buffer("imag", torch.zeros(channels, width, n), persistent=False)
        else:
            self.imag = nn.Parameter(imag.expand(channels, width, n).clone())
        self.C = nn.Parameter(torch.randn(channels, width, n, 2) * math.sqrt(0.5))
        _mark_no_weight_decay(self.log_dt, self.log_neg_real, self.imag)

    def continuous(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dt (C, H), A (C, H, N/2) complex, C (C, H, N/2) complex); B is 1."""
        dtype = _real_dtype(self.log_dt)
        a = torch.complex(-torch.exp(self.log_neg_real.to(dtype)), self.imag.to(dtype))
        return torch.exp(self.log_dt.to(dtype)), a, _complex(self.C)

    def zoh(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zero-order hold: (dt A, dB = (exp(dt A) - 1) / A, C), each (C, H, N/2) complex; the
        discrete system is x_t = exp(dt A) x_{t-1} + dB u_t, y_t = 2 Re(C x_t)."""
        dt, a, c = self.continuous()
        dta = dt.unsqueeze(-1) * a
        return dta, (torch.exp(dta) - 1) / a, c

    def discrete(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dA, dB, C), each (C, H, N/2) complex: x_t = dA x_{t-1} + dB u_t, y_t = 2 Re(C x_t)."""
        dta, db, c = self.zoh()
        return torch.exp(dta), db, c

    def chunk_operators(self, chunk: int) -> ChunkOperators:
        """The matrices of a chunk of `chunk` steps (see `ssm.chunked`); the state is diagonal."""
        dta, db, c = self.zoh()
        steps = torch.arange(chunk + 1, device=dta.device, dtype=dta.real.dtype)
        powers = torch.exp(dta.unsqueeze(-1) * steps)                               # (C, H, n, T+1)
        cp = 2 * c.unsqueeze(-1) * powers                                           # s C dA^t
        return ChunkOperators(
            taps=(cp[..., :-1] * db.unsqueeze(-1)).sum(-2).real,
            inp=db.unsqueeze(-1) * powers[..., :-1].flip(-1),
            out=cp[..., 1:].transpose(-1, -2),
            decay=powers[..., -1], readout=2 * c)

    def forward(self, length: int) -> torch.Tensor:
        with _full_precision(self.log_dt.device):
            dta, db, c = self.zoh()                                              # (C, H, N/2)
            pos = torch.arange(length, device=dta.device, dtype=dta.real.dtype)
            vandermonde = torch.exp(dta.unsqueeze(-1) * pos)                     # (C, H, N/2, L)
            return 2 * torch.einsum("chn,chnl->chl", c * db, vandermonde).real   # (C, H, L)


def hippo_legs_nplr(state_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HiPPO-LegS in normal-plus-low-rank form, diagonalized: A = V (Lambda - p p*) V*.

    Returns (Lambda, p, b) for the N/2 eigenvalues with positive imaginary part (the others are
    their conjugates), in float64/complex128. A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k);
    A + P P^T = -I/2 + (skew-symmetric) with P_n = sqrt(n + 1/2), diagonalized by a Hermitian
    eigendecomposition, which is numerically stable (unlike diagonalizing A itself).
    """
    n = torch.arange(state_size, dtype=torch.float64, device="cpu")  # also under a meta device
    r = torch.sqrt(2 * n + 1)
    a = -torch.tril(r[:, None] * r[None, :], diagonal=-1) - torch.diag(n + 1)
    p = torch.sqrt(n + 0.5)
    b = r.clone()
    s = a + p[:, None] * p[None, :]
    skew = s + 0.5 * torch.eye(state_size, dtype=torch.float64, device="cpu")
    w, v = torch.linalg.eigh(-1j * skew.to(torch.complex128))  # skew = V diag(i w) V*
    keep = w > 0
    lam = torch.complex(torch.full_like(w[keep], -0.5), w[keep])
    vh = v[:, keep].conj().T
    return lam, vh @ p.to(torch.complex128), vh @ b.to(torch.complex128)


class S4Kernel(nn.Module):
    """Structured S4 kernel: A = Lambda - P P* (diagonal plus low rank), bilinear discretization.

    Numerical method: the truncated generating function sum_{l<L} K[l] z^l = C~ (I - dA z)^{-1} dB,
    with C~ = C (I - dA^L), is evaluated at the L-th roots of unity and inverted by an inverse real
    FFT. The resolvent is dt [(1 - z) I - dt/2 (1 + z) A]^{-1} B, inverted in closed form by the
    Woodbury identity over Cauchy sums (no singularity at z = -1 since Re Lambda < 0). dA^L is
    computed by repeated squaring of the dense N x N matrix in complex128, which is cheap and exact
    enough for moderate N (the paper uses N = 16). States are kept as N/2 conjugate pairs so that
    the system, and hence the kernel, is real.
    """

    initializes_itself = True  # the model's generic initialization leaves it alone

    max_length = None  # defined at any length (a state-space system)

    def __init__(self, channels: int, width: int, state_size: int = 16,
                 dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        if state_size % 2:
            raise ValueError(f"state_size={state_size} must be even (conjugate pairs)")
        self.channels, self.width, self.state_size = channels, width, state_size
        lam, p, b = hippo_legs_nplr(state_size)
        shape = (channels, width, state_size // 2)

        def expand(z: torch.Tensor) -> torch.Tensor:
            return torch.view_as_real(z.to(torch.complex64)).expand(*shape, 2).clone()

        self.log_dt = nn.Parameter(_log_dt_init(channels, width, dt_min, dt_max))
        self.log_neg_real = nn.Parameter(torch.log(-lam.real).float().expand(shape).clone())
        self.imag = nn.Parameter(lam.imag.float().expand(shape).clone())
        self.P = nn.Parameter(expand(p))
        self.B = nn.Parameter(expand(b))
        self.C = nn.Parameter(torch.randn(*shape, 2) * math.sqrt(0.5))
        _mark_no_weight_decay(self.log_dt, self.log_neg_real, self.imag, self.P, self.B)

    def continuous(self) -> tuple[torch.Tensor, ...]:
        """Full (conjugate-augmented) system: dt (C, H), Lambda, P, B, C each (C, H, N) complex."""
        dtype = _real_dtype(self.log_dt)
        lam = torch.complex(-torch.exp(self.log_neg_real.to(dtype)), self.imag.to(dtype))

        def full(z: torch.Tensor) -> torch.Tensor:
            return torch.cat([z, z.conj()], dim=-1)

        return (torch.exp(self.log_dt.to(dtype)), full(lam), full(_complex(self.P)),
                full(_complex(self.B)), full(_complex(self.C)))

    def dense_a(self) -> torch.Tensor:
        """The continuous state matrix A = diag(Lambda) - P P*, (C, H, N, N) complex."""
        _, lam, p, _, _ = self.continuous()
        return torch.diag_embed(lam) - p.unsqueeze(-1) * p.conj().unsqueeze(-2)

    def discrete(self, dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bilinear discretization: (dA (C, H, N, N), dB (C, H, N), C (C, H, N)), complex.

        x_t = dA x_{t-1} + dB u_t and y_t = Re(C x_t) (the conjugate half makes C x_t real).
        `dtype` (e.g. torch.complex128) sets the precision of the N x N solves.
        """
        dt, _, _, b, c = self.continuous()
        a = self.dense_a()
        if dtype is not None:
            dt, a, b = dt.to(dtype.to_real()), a.to(dtype), b.to(dtype)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        half = (dt / 2)[..., None, None]
        minus, plus = eye - half * a, eye + half * a
        da = torch.linalg.solve(minus, plus)
        db = torch.linalg.solve(minus, (dt.unsqueeze(-1) * b).unsqueeze(-1)).squeeze(-1)
        return da, db, c

    def discrete_real(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bilinear discretization of `discrete` in the real coordinates r = [Re x1; Im x1] of
        the conjugate-pair states x = [x1; conj(x1)]: (dA (C, H, N, N), dB (C, H, N), C (C, H, N)),
        all real, with r_t = dA r_{t-1} + dB u_t and y_t = C r_t.

        No linear solve: with h = dt/2, I - hA = M0 + 2h w w^T, where M0 multiplies x1 by the
        complex diagonal 1 - h Lambda (a 2 x 2 rotation-scaling per state in real coordinates) and
        w = [Re p; Im p], so the Woodbury identity inverts it in closed form; then
        dA = (I - hA)^-1 (I + hA) = 2 (I - hA)^-1 - I and dB = (I - hA)^-1 dt B.
        """
        dtype = _real_dtype(self.log_dt)
        dt = torch.exp(self.log_dt.to(dtype)).unsqueeze(-1)                      # (C, H, 1)
        lam = torch.complex(-torch.exp(self.log_neg_real.to(dtype)), self.imag.to(dtype))
        p, b, c = _complex(self.P), _complex(self.B), _complex(self.C)         # (C, H, N/2)
        g = 1 / (1 - dt / 2 * lam)                                              # M0^-1 on x1
        gp = g * p

        def real(z: torch.Tensor) -> torch.Tensor:                              # x1 -> [Re; Im]
            return torch.cat([z.real, z.imag], dim=-1)

        # w^T M0^-1 w = sum |p|^2 Re g; the rank-one correction is kappa (M0^-1 w)(w^T M0^-1).
        kappa = dt / (1 + dt * (p.abs().square() * g.real).sum(-1, keepdim=True))  # (C, H, 1)
        left, right = real(gp), real(g.conj() * p)                              # (C, H, N)
        half = g.shape[-1]
        m0_inv = (torch.diag_embed(torch.cat([g.real, g.real], dim=-1))
                  + torch.diag_embed(-g.imag, offset=half) + torch.diag_embed(g.imag, offset=-half))
        inv = m0_inv - kappa.unsqueeze(-1) * left.unsqueeze(-1) * right.unsqueeze(-2)
        eye = torch.eye(2 * half, dtype=dtype, device=inv.device)
        # dB = dt (M0^-1 B - kappa (M0^-1 w)(w^T M0^-1 B)), with w^T M0^-1 B = Re sum g conj(p) b.
        db = dt * (real(g * b) - kappa * left * (g * p.conj() * b).real.sum(-1, keepdim=True))
        return 2 * inv - eye, db, 2 * real(c.conj())

    def chunk_operators(self, chunk: int) -> ChunkOperators:
        """The matrices of a chunk of `chunk` steps (see `ssm.chunked`). The N complex states come
        in conjugate pairs, so in the real coordinates of `discrete_real` the system is real: N
        real states instead of N complex ones, and every product is a real matrix product."""
        da, db, c = self.discrete_real()                                           # dense dA
        pb, cp, decay = krylov(da, db, c, chunk)            # dA^t dB (C, H, N, T), C dA^t (C, H, T, N)
        return ChunkOperators(
            taps=torch.einsum("chtn,chn->cht", cp, db), inp=pb.flip(-1),
            out=torch.cat([cp[:, :, 1:], c.unsqueeze(-2) @ decay], dim=-2), decay=decay, readout=c)

    def forward(self, length: int) -> torch.Tensor:
        with _full_precision(self.log_dt.device):
            dt, lam, p, b, c = self.continuous()
            # C~ = C (I - dA^L), from the dense discrete matrix in complex128.
            da, _, _ = self.discrete(torch.complex128)                          # (C, H, N, N)
            c64 = c.to(torch.complex128)
            c_tilde = (c64 - (c64.unsqueeze(-2) @ torch.linalg.matrix_power(da, length))
                       .squeeze(-2)).to(c.dtype)                                 # (C, H, N)
            # Resolvent at the roots of unity z_k = exp(-2 pi i k / L), k = 0..L//2.
            k = torch.arange(length // 2 + 1, device=lam.device, dtype=dt.dtype)
            z = torch.polar(torch.ones_like(k), -2 * math.pi * k / length)       # (F,)
            dt_ = dt[..., None, None]                                           # (C, H, 1, 1)
            denom = (1 - z) - dt_ / 2 * (1 + z) * lam.unsqueeze(-1)              # (C, H, N, F)
            inv = denom.reciprocal()
            r = dt_.squeeze(-1) / 2 * (1 + z)                                   # (C, H, F)
            k00 = torch.einsum("chn,chnf,chn->chf", c_tilde, inv, b)
            k01 = torch.einsum("chn,chnf,chn->chf", c_tilde, inv, p) * r
            k10 = torch.einsum("chn,chnf,chn->chf", p.conj(), inv, b)
            k11 = torch.einsum("chn,chnf,chn->chf", p.conj(), inv, p) * r
            spectrum = dt_.squeeze(-1) * (k00 - k01 * k10 / (1 + k11))           # (C, H, F)
            return torch.fft.irfft(spectrum, n=length)                          # (C, H, L)


def positional_features(positions: torch.Tensor, frequencies: int) -> torch.Tensor:
    """[t, sin(2 pi f t), cos(2 pi f t) for f = 1..F] for t = positions, shape (L, 1 + 2F)."""
    t = positions.unsqueeze(-1)                                                 # (L, 1)
    f = torch.arange(1, frequencies + 1, device=t.device, dtype=t.dtype)
    angles = 2 * math.pi * t * f                                                # (L, F)
    return torch.cat([t, torch.sin(angles), torch.cos(angles)], dim=-1)


class ImplicitKernel(nn.Module):
    """Unstructured implicit filter K(t) = exp(-alpha t) MLP(PosEmb(t)) (paper section 3.2).

    t = l / train_length for tap l, so t spans [0, 1) at the training length and the kernel's taps
    do not move when a longer kernel is requested: beyond the training length the MLP extrapolates
    (its sine features repeat), which is why unstructured kernels degrade on longer sequences.
    """

    initializes_itself = True  # the model's generic initialization leaves it alone

    @property
    def max_length(self) -> int:
        """The longest sequence the filter was trained for; beyond it, it extrapolates."""
        return self.train_length

    def __init__(self, channels: int, width: int, train_length: int, hidden: int = 64,
                 frequencies: int = 8, decay: float = 2.0):
        super().__init__()
        self.channels, self.width, self.train_length = channels, width, train_length
        self.frequencies, self.decay = frequencies, decay
        self.layers = nn.ModuleList([
            nn.Linear(1 + 2 * frequencies, hidden),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, channels * width),
        ])
        # Keep the initial filters' energy O(1) whatever the training length.
        with torch.no_grad():
            self.layers[-1].weight.mul_(1 / math.sqrt(train_length))
            self.layers[-1].bias.mul_(1 / math.sqrt(train_length))

    def forward(self, length: int) -> torch.Tensor:
        weight = self.layers[0].weight
        with _full_precision(weight.device):
            dtype = _real_dtype(weight)
            t = torch.arange(length, device=weight.device, dtype=dtype) / self.train_length
            h = positional_features(t, self.frequencies)                         # (L, 1 + 2F)
            for i, layer in enumerate(self.layers):
                h = F.linear(h, layer.weight.to(dtype), layer.bias.to(dtype))
                if i < len(self.layers) - 1:
                    h = torch.sin(h)
            k = h.T.reshape(self.channels, self.width, length)                   # (C, H, L)
            return k * torch.exp(-self.decay * t)


class ExplicitKernel(nn.Module):
    """A learned kernel of `train_length` taps, regularized by squash (soft-threshold by lambda)
    and smooth (average pooling of width p), as in Fu et al. 2023. Taps beyond the training
    length are zero."""

    initializes_itself = True  # the model's generic initialization leaves it alone

    @property
    def max_length(self) -> int:
        """The longest sequence the filter was trained for; beyond it, it extrapolates."""
        return self.train_length

    def __init__(self, channels: int, width: int, train_length: int, squash: float = 1e-3,
                 smooth: int = 3, decay: float = 2.0):
        super().__init__()
        self.channels, self.width, self.train_length = channels, width, train_length
        self.squash, self.smooth = squash, smooth
        t = torch.arange(train_length) / train_length
        init = torch.randn(channels, width, train_length) * torch.exp(-decay * t)
        self.weight = nn.Parameter(init / math.sqrt(train_length))

    def forward(self, length: int) -> torch.Tensor:
        with _full_precision(self.weight.device):
            k = self.weight.to(_real_dtype(self.weight))
            k = torch.sign(k) * F.relu(k.abs() - self.squash)
            if self.smooth > 1:
                flat = k.reshape(-1, 1, self.train_length)                         # (C*H, 1, L)
                flat = F.avg_pool1d(flat, self.smooth, stride=1, padding=self.smooth // 2,
                                    count_include_pad=False)[..., : self.train_length]
                k = flat.reshape(self.channels, self.width, -1)
            if length > self.train_length:
                return F.pad(k, (0, length - self.train_length))
            return k[..., :length]


# ---------------------------------------------------------------------- configs (`ModelConfig.ssm`)
S4D_INITS = ("lin", "inv", "real")


@dataclass
class _StateSpaceOptions(KernelOptions):
    """Kernels of a state-space system: N states (in complex-conjugate pairs) and a step size
    initialized log-uniformly in [dt_min, dt_max]."""

    state_size: int = 16            # N
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    structured: ClassVar[bool] = True

    def check(self) -> None:
        super().check()
        positive(f"{self.path}.state_size", self.state_size)
        if self.state_size % 2:
            raise ConfigError(f"{self.path}.state_size={self.state_size} must be even for kind "
                              f"{self.kind!r} (states come in complex-conjugate pairs)")
        check_step_range(self.path, self.dt_min, self.dt_max)


@register("ssm", "s4")
@dataclass
class S4Options(_StateSpaceOptions):
    """S4's DPLR kernel with HiPPO-LegS initialization (the paper's BST:*:S4)."""

    def build_kernel(self, model, channels: int, width: int) -> nn.Module:
        return S4Kernel(channels, width, self.state_size, self.dt_min, self.dt_max)


@register("ssm", "s4d")
@dataclass
class S4DOptions(_StateSpaceOptions):
    """S4D's diagonal kernel; `init`: S4D-Inv, S4D-Lin or S4D-Real (no rotation) for A."""

    init: str = "inv"

    def check(self) -> None:
        super().check()
        choice(f"{self.path}.init", self.init, S4D_INITS)

    def build_kernel(self, model, channels: int, width: int) -> nn.Module:
        return S4DKernel(channels, width, self.state_size, self.init, self.dt_min, self.dt_max)


@dataclass
class _FilterOptions(KernelOptions):
    """Kernels defined as filters up to the training length (`max_seq_len`); their streamed
    generation keeps the input history. `decay_rate`: alpha of the exp(-alpha t) envelope,
    t in [0, 1)."""

    decay_rate: float = 2.0

    constant_state: ClassVar[bool] = False

    def check(self) -> None:
        super().check()
        if self.decay_rate < 0:
            raise ConfigError(f"{self.path}.decay_rate={self.decay_rate} must be >= 0")


@register("ssm", "unstruct")
@dataclass
class UnstructOptions(_FilterOptions):
    """The paper's unstructured kernel: exp(-alpha t) MLP(PosEmb(t)), an implicit filter MLP of
    `hidden` units over sin/cos features of t at `frequencies` frequencies."""

    hidden: int = 64
    frequencies: int = 8

    def check(self) -> None:
        super().check()
        positive(f"{self.path}.hidden", self.hidden)
        positive(f"{self.path}.frequencies", self.frequencies)

    def build_kernel(self, model, channels: int, width: int) -> nn.Module:
        return ImplicitKernel(channels, width, model.max_seq_len, self.hidden, self.frequencies,
                              self.decay_rate)


@register("ssm", "explicit")
@dataclass
class ExplicitOptions(_FilterOptions):
    """A directly learned kernel with Fu et al. 2023's regularization: soft-threshold `squash`
    (lambda) and average-pool width `smooth`."""

    squash: float = 1e-3
    smooth: int = 3

    def check(self) -> None:
        super().check()
        positive(f"{self.path}.smooth", self.smooth)
        if self.squash < 0:
            raise ConfigError(f"{self.path}.squash={self.squash} must be >= 0")

    def build_kernel(self, model, channels: int, width: int) -> nn.Module:
        return ExplicitKernel(channels, width, model.max_seq_len, self.squash, self.smooth,
                              self.decay_rate)
