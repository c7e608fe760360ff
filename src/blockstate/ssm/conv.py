"""Causal long convolution by FFT (paper section 3, step 2).

y[..., t] = sum_{j <= t} k[t - j] u[..., j]. Both signals are zero-padded to a transform size of at
least 2L, so the FFT's circular convolution equals the linear one on the first L outputs: nothing
wraps around from the end of the sequence to its start.
"""

from __future__ import annotations

import torch


def next_fast_len(n: int) -> int:
    """Smallest integer >= n whose only prime factors are 2, 3 and 5 (fast for pocketfft and cuFFT)."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    best = 1 << (n - 1).bit_length()  # a power of two always qualifies
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def kernel_spectrum(kernel: torch.Tensor, length: int, n: int) -> torch.Tensor:
    """rfft of the first `length` taps of `kernel` (C, H, Lk) at transform size n -> (C, H, n//2+1)."""
    dtype = torch.float64 if kernel.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=kernel.device.type, enabled=False):
        return torch.fft.rfft(kernel[..., :length].to(dtype), n=n)


def fft_causal_conv(u: torch.Tensor, kernel: torch.Tensor | None = None, *,
                    spectrum: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal convolution of `u` (B, H, L) with `kernel` (C, H, Lk) -> (B, C, H, L).

    The kernel is truncated (or implicitly zero-extended) to L taps. Instead of the kernel, its
    `spectrum` from `kernel_spectrum(kernel, L, next_fast_len(2 * L))` may be passed (computed once
    and reused). Computed in float32 (float64 stays float64) with autocast disabled; the result
    has the computation dtype.
    """
    if (kernel is None) == (spectrum is None):
        raise ValueError("pass exactly one of kernel and spectrum")
    filters = kernel if kernel is not None else spectrum
    if u.dim() != 3 or filters.dim() != 3:
        raise ValueError(
            f"expected u of shape (B, H, L) and kernel of shape (C, H, Lk); got {tuple(u.shape)} "
            f"and {tuple(filters.shape)}")
    if u.shape[1] != filters.shape[1]:
        raise ValueError(
            f"channel mismatch: u has H={u.shape[1]} channels, kernel has H={filters.shape[1]}")
    length = u.shape[-1]
    n = next_fast_len(2 * length)
    if spectrum is None:
        spectrum = kernel_spectrum(kernel, length, n)                          # (C, H, F)
    elif spectrum.shape[-1] != n // 2 + 1:
        raise ValueError(f"spectrum has {spectrum.shape[-1]} frequencies; length {length} needs "
                         f"{n // 2 + 1} (transform size {n})")
    dtype = spectrum.real.dtype
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_f = torch.fft.rfft(u.to(dtype), n=n)                                 # (B, H, F)
        y = torch.fft.irfft(u_f.unsqueeze(1) * spectrum, n=n)                  # (B, C, H, n)
    return y[..., :length]
