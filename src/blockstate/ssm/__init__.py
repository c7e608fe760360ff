"""State-space sublayer: a kernel generator, the causal FFT convolution and the D skip term."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .conv import fft_causal_conv, next_fast_len
from .kernels import ExplicitKernel, ImplicitKernel, S4DKernel, S4Kernel, hippo_legs_nplr


def build_kernel(config: ModelConfig, channels: int, width: int) -> nn.Module:
    """The kernel generator named by `config.ssm_kernel`, for `channels` filters of `width`."""
    kind = config.ssm_kernel
    if kind == "s4d":
        return S4DKernel(channels, width, config.ssm_state_size, config.s4d_init,
                         config.dt_min, config.dt_max)
    if kind == "s4":
        return S4Kernel(channels, width, config.ssm_state_size, config.dt_min, config.dt_max)
    if kind == "unstruct":
        return ImplicitKernel(channels, width, config.max_seq_len, config.unstruct_hidden,
                              config.unstruct_frequencies, config.unstruct_decay)
    if kind == "explicit":
        return ExplicitKernel(channels, width, config.max_seq_len, config.explicit_squash,
                              config.explicit_smooth, config.unstruct_decay)
    raise ValueError(f"ssm_kernel={kind!r} is not valid; allowed: s4, s4d, unstruct, explicit")


class SSM(nn.Module):
    """C depthwise causal convolutions over the whole sequence (paper section 3, step 2):

    y[b, t, c, h] = sum_{j <= t} K[c, h, t - j] u[b, j, h] + D[c, h] u[b, t, h].
    """

    def __init__(self, kernel: nn.Module):
        super().__init__()
        self.kernel = kernel
        self.D = nn.Parameter(torch.randn(kernel.channels, kernel.width))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

    @torch.compiler.disable  # complex/FFT code stays eager: inductor does not generate it
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, L, H) -> y (B, L, C, H) in float32 (float64 for float64 inputs)."""
        length = u.shape[1]
        u_t = u.transpose(1, 2)                                                  # (B, H, L)
        y = fft_causal_conv(u_t, self.kernel(length))                            # (B, C, H, L)
        y = y + self.D.to(y.dtype).unsqueeze(-1) * u_t.unsqueeze(1).to(y.dtype)
        return y.permute(0, 3, 1, 2)                                             # (B, L, C, H)


__all__ = [
    "SSM", "build_kernel", "fft_causal_conv", "next_fast_len", "S4DKernel", "S4Kernel",
    "ImplicitKernel", "ExplicitKernel", "hippo_legs_nplr",
]
