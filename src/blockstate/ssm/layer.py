"""The SSM sublayer: a kernel generator, the causal convolution (FFT or chunked) and the D skip
term, with its recurrent inference cache."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import ConvSSMCache, RecurrentSSMCache
from ..components import ConfigError, choice
from ..config import SSM_METHODS, ModelConfig, SSMOptions
from ..context_parallel import active as context_parallel_active
from ..context_parallel import carried_outputs
from .chunked import ChunkOperators, chunk_end_states, chunk_operators, chunked_causal_conv, end_outputs
from .conv import fft_causal_conv, kernel_spectrum, next_fast_len
from .eager import eager


def build_ssm(config: ModelConfig, channels: int, width: int) -> nn.Module:
    """The SSM sublayer that `config.ssm` describes, for `channels` filters over `width`."""
    return config.ssm.build_ssm(config, channels, width)


def check_step_range(path: str, dt_min: float, dt_max: float) -> None:
    """The range of an SSM's initial step size (log-uniform in [dt_min, dt_max])."""
    if not 0.0 < dt_min <= dt_max:
        raise ConfigError(f"{path}.dt_min={dt_min}, {path}.dt_max={dt_max}: need 0 < dt_min <= dt_max")


@dataclass
class KernelOptions(SSMOptions):
    """An SSM whose kernel is a fixed convolution filter (`build_kernel`), computed by FFT or, for
    kernels with a state-space form (`structured`), chunk-wise: "auto" is chunked on CPU for
    those and FFT otherwise (same function, different cost)."""

    method: str = "auto"

    structured: ClassVar[bool] = False  # has chunk_operators: chunked computation and a recurrence

    def check(self) -> None:
        super().check()
        choice(f"{self.path}.method", self.method, SSM_METHODS)
        if self.method == "chunked" and not self.structured:
            raise ConfigError(f"{self.path}.method='chunked' needs a kernel with a state-space form "
                              f"(s4 or s4d), not kind {self.kind!r}; use 'fft' or 'auto'")

    def build_kernel(self, model: ModelConfig, channels: int, width: int) -> nn.Module:
        """The kernel generator for `channels` filters of `width`."""
        raise NotImplementedError

    def build_ssm(self, model: ModelConfig, channels: int, width: int) -> SSM:
        return SSM(self.build_kernel(model, channels, width), self.method, self.chunk_size)


def structured(kernel: nn.Module) -> bool:
    """Whether `kernel` has a state-space form, and hence a chunked and a recurrent form: a
    `chunk_operators(chunk)` method (S4, S4D)."""
    return callable(getattr(kernel, "chunk_operators", None))


def _chunk_for(length: int, chunk: int) -> int:
    return max(1, min(chunk, length))


class SSM(nn.Module):
    """C depthwise causal convolutions over the whole sequence (paper section 3, step 2):

    y[b, t, c, h] = sum_{j <= t} K[c, h, t - j] u[b, j, h] + D[c, h] u[b, t, h].

    `method` picks how: "fft" (any kernel; the kernel of L taps and three transforms of size >= 2L),
    "chunked" (S4/S4D only: chunk matrices and a scan over chunks, see `ssm.chunked`), or "auto":
    chunked for structured kernels on CPU once the sequence spans two chunks (measured 5-7x faster
    than FFT at L = 8192 on this project's CPU, docs/benchmarks/layers.md), FFT otherwise. On CUDA
    "auto" keeps the FFT path, since no GPU measurement has shown the chunked path faster there.
    Without gradients (evaluation), the kernel spectrum or chunk matrices are cached and reused
    while the parameters are unchanged.
    """

    def __init__(self, kernel: nn.Module, method: str = "auto", chunk_size: int = 64):
        super().__init__()
        if method not in SSM_METHODS:
            raise ValueError(f"ssm_method={method!r} is not valid; allowed values: {', '.join(SSM_METHODS)}")
        if method == "chunked" and not structured(kernel):
            raise ValueError(f"ssm_method='chunked' needs an S4 or S4D kernel, not {type(kernel).__name__}")
        self.kernel = kernel
        self.method, self.chunk_size = method, chunk_size
        self.D = nn.Parameter(torch.randn(kernel.channels, kernel.width))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self._cache: tuple | None = None

    def resolve_method(self, length: int, device: torch.device) -> str:
        """The path `forward` takes for a sequence of `length` on `device`."""
        if self.method != "auto":
            return self.method
        if structured(self.kernel) and device.type == "cpu" and length >= 2 * self.chunk_size:
            return "chunked"
        return "fft"

    def _cached(self, key: tuple, build):
        """build() once per key and parameter version when gradients are off (evaluation)."""
        if torch.is_grad_enabled():
            return build()
        versions = tuple((p._version, p.data_ptr()) for p in self.kernel.parameters())
        if self._cache is not None and self._cache[0] == (key, versions):
            return self._cache[1]
        value = build()
        self._cache = ((key, versions), value)
        return value

    def clear_cache(self) -> None:
        """Forget the cached kernel spectrum or chunk matrices (e.g. before timing a forward)."""
        self._cache = None

    def _operators(self, chunk: int) -> ChunkOperators:
        return self._cached(("chunked", chunk), lambda: chunk_operators(self.kernel, chunk))

    def _skip(self, y: torch.Tensor, u_t: torch.Tensor) -> torch.Tensor:
        return y + self.D.to(y.dtype).unsqueeze(-1) * u_t.unsqueeze(1).to(y.dtype)

    @eager  # complex/FFT code stays eager: inductor does not generate it
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, L, H) -> y (B, L, C, H) in float32 (float64 for float64 inputs)."""
        length = u.shape[1]
        u_t = u.transpose(1, 2)                                                  # (B, H, L)
        with torch.autocast(device_type=u.device.type, enabled=False):
            if self.resolve_method(length, u.device) == "chunked":
                ops = self._operators(_chunk_for(length, self.chunk_size))
                y = chunked_causal_conv(u_t.to(ops.taps.dtype), ops)              # (B, C, H, L)
            else:
                n = next_fast_len(2 * length)
                spectrum = self._cached(("fft", length, n),
                                        lambda: kernel_spectrum(self.kernel(length), length, n))
                y = fft_causal_conv(u_t, spectrum=spectrum)
            if context_parallel_active():  # this rank's part of a longer sequence
                y = y + carried_outputs(self._operators, u_t, self.chunk_size)
            y = self._skip(y, u_t)
        return y.permute(0, 3, 1, 2)                                             # (B, L, C, H)

    @eager
    def block_end_outputs(self, u: torch.Tensor, block_size: int) -> torch.Tensor:
        """Outputs at the last position of every block, u (B, L, H) -> (B, L / W, C, H), equal to
        `forward(u)[:, W-1::W]`. The chunked path computes only these positions (states at chunk
        ends), which is what the MF variant needs."""
        length = u.shape[1]
        # No Toeplitz products here, so the chunk can be as long as a block (fewer scan steps).
        chunk = math.gcd(max(self.chunk_size, block_size), block_size)
        if self.resolve_method(length, u.device) != "chunked" or chunk < 8 or context_parallel_active():
            return self.forward(u)[:, block_size - 1::block_size]
        u_t = u.transpose(1, 2)                                                  # (B, H, L)
        with torch.autocast(device_type=u.device.type, enabled=False):
            ops = self._operators(chunk)
            u_t = u_t.to(ops.taps.dtype)
            states = chunk_end_states(u_t, ops)[..., block_size // chunk - 1::block_size // chunk, :]
            y = self._skip(end_outputs(states, ops), u_t[..., block_size - 1::block_size])
        return y.permute(0, 3, 1, 2)                                             # (B, nb, C, H)

    # ---- inference (blockstate.cache): one position at a time
    @torch.no_grad()
    def allocate_cache(self, batch: int, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> RecurrentSSMCache | ConvSSMCache:
        """Structured kernels: a zero state with the one-step operators of the discretized
        system (the chunk operators of a chunk of one step). Unstructured kernels: an empty input
        history and the kernel's taps, grown as the history grows."""
        if structured(self.kernel):
            ops = chunk_operators(self.kernel, 1)
            state = ops.inp.new_zeros(batch, *ops.inp.shape[:3]).to(device)
            inp = ops.inp[..., 0]
            cache = RecurrentSSMCache(state, ops.decay, inp, ops.readout)
            if ops.decay.dim() == 4:  # dense: one product gives the next state and its output
                readout = ops.readout.unsqueeze(-2)                                  # (C, H, 1, N)
                cache.transition = torch.cat([ops.decay, readout @ ops.decay], dim=-2)
                skip = (readout @ inp.unsqueeze(-1))[..., 0] + self.D.to(inp.dtype).unsqueeze(-1)
                cache.drive = torch.cat([inp, skip], dim=-1)                         # (C, H, N + 1)
            return cache
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        history = torch.zeros(batch, self.kernel.width, 0, device=device, dtype=dtype)
        return ConvSSMCache(history, history.new_zeros(self.kernel.channels, self.kernel.width, 0))

    def _grow(self, cache: ConvSSMCache, length: int) -> None:
        capacity = cache.history.shape[-1]
        if length <= capacity:
            return
        capacity = max(length, 2 * capacity, 256)
        history = cache.history.new_zeros(*cache.history.shape[:2], capacity)
        history[..., :cache.length] = cache.history[..., :cache.length]
        cache.history = history
        cache.taps = self.kernel(capacity).to(history.dtype).flip(-1).contiguous()  # (C, H, cap)

    @torch.no_grad()
    def prefill_cache(self, u: torch.Tensor, cache: RecurrentSSMCache | ConvSSMCache) -> None:
        """Fill an empty cache with the inputs u (B, T, H) of the first T positions: the state
        after them (by the chunked path's chunk-end states, the inputs zero-padded in front,
        which leaves a zero state unchanged), or the history."""
        u_t = u.transpose(1, 2)                                                    # (B, H, T)
        if isinstance(cache, ConvSSMCache):
            self._grow(cache, u_t.shape[-1])
            cache.history[..., :u_t.shape[-1]] = u_t.to(cache.history.dtype)
            cache.length = u_t.shape[-1]
            return
        chunk = self.chunk_size
        ops = self._operators(chunk)
        u_t = F.pad(u_t.to(ops.taps.dtype), (-u_t.shape[-1] % chunk, 0))
        cache.state = chunk_end_states(u_t, ops)[..., -1, :].to(cache.state.dtype)

    @torch.no_grad()
    def step(self, u: torch.Tensor, cache: RecurrentSSMCache | ConvSSMCache,
             output: bool = True) -> torch.Tensor | None:
        """Advance by one position of inputs u (B, H); its outputs (B, C, H) (float32), or None
        when `output` is false (MF needs outputs only at block ends)."""
        if isinstance(cache, ConvSSMCache):
            self._grow(cache, cache.length + 1)
            cache.history[..., cache.length] = u.to(cache.history.dtype)
            cache.length += 1
            if not output:
                return None
            n, capacity = cache.length, cache.history.shape[-1]
            # one matrix product per channel, (B, n) x (n, C), on views: an einsum here becomes a
            # batched product of 1 x n by n x 1 matrices with a copy per channel (20x slower)
            taps = cache.taps[..., capacity - n:].permute(1, 2, 0)                 # (H, n, C)
            y = torch.matmul(cache.history[..., :n].transpose(0, 1), taps).permute(1, 2, 0)
        else:
            state = cache.state
            u_in = u.to(cache.inp.real.dtype).view(u.shape[0], 1, -1, 1)          # (B, 1, H, 1)
            if cache.transition is not None:
                # the dense products: per row at batch 1, over the batch by einsum otherwise
                # (at N = 16 each way is 1.5-3x slower in the other case)
                if state.shape[0] == 1:
                    z = (cache.transition @ state.unsqueeze(-1)).squeeze(-1)
                else:
                    z = torch.einsum("chkm,bchm->bchk", cache.transition, state)
                z = torch.addcmul(z, cache.drive, u_in)                            # (B, C, H, N + 1)
                cache.state = z[..., :-1]
                return z[..., -1] if output else None
            state = torch.addcmul(cache.decay * state, cache.inp, u_in)
            cache.state = state
            if not output:
                return None
            y = (cache.readout * state).sum(-1)
            y = y.real if y.is_complex() else y
        return torch.addcmul(y, self.D.to(y.dtype), u.to(y.dtype).unsqueeze(1))
