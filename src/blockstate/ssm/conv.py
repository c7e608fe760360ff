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


def fft_causal_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution of `u` (B, H, L) with `kernel` (C, H, Lk) -> (B, C, H, L).

    The kernel is truncated (or implicitly zero-extended) to L taps. Computed in float32 (float64
    stays float64) with autocast disabled; the result has the computation dtype.
    """
    if u.dim() != 3 or kernel.dim() != 3:
        raise ValueError(
            f"expected u of shape (B, H, L) and kernel of shape (C, H, Lk); got {tuple(u.shape)} "
            f"and {tuple(kernel.shape)}")
    if u.shape[1] != kernel.shape[1]:
        raise ValueError(
            f"channel mismatch: u has H={u.shape[1]} channels, kernel has H={kernel.shape[1]}")
    length = u.shape[-1]
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    n = next_fast_len(2 * length)
    with torch.autocast(device_type=u.device.type, enabled=False):
        kernel = kernel[..., :length].to(dtype)
        u_f = torch.fft.rfft(u.to(dtype), n=n)                    # (B, H, F)
        k_f = torch.fft.rfft(kernel, n=n)                         # (C, H, F)
        y = torch.fft.irfft(u_f.unsqueeze(1) * k_f, n=n)          # (B, C, H, n)
    return y[..., :length]
