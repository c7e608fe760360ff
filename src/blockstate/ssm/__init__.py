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

    # ---- block-wise inference (generation): the past enters a block only through its carry
    @torch.no_grad()
    def block_state(self, batch: int, block_size: int, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> dict:
        """The state before the first block, with the kernel of one block computed once.
        Structured kernels keep a (B, C, H, N) recurrent state; unstructured kernels have none
        and keep the whole input history instead."""
        cache = {"block_size": block_size, "kernel": self.kernel(block_size), "carry": None}
        if isinstance(self.kernel, S4DKernel | S4Kernel):
            op = BlockOperator(self.kernel, block_size)
            n = op.decay.shape[-1]
            cache.update(op=op, state=torch.zeros(batch, self.kernel.channels, self.kernel.width, n,
                                                  dtype=op.decay.dtype, device=device))
        else:
            cache["history"] = torch.zeros(batch, self.kernel.width, 0, device=device, dtype=dtype)
        return cache

    def _carry(self, cache: dict) -> torch.Tensor:
        """(B, C, H, W): what the tokens before the current block add to its outputs."""
        w = cache["block_size"]
        if "op" in cache:
            return cache["op"].carry(cache["state"])
        history = cache["history"]                                                 # (B, H, T0)
        t0 = history.shape[-1]
        if t0 == 0:
            return history.new_zeros(history.shape[0], self.kernel.channels, self.kernel.width, w)
        padded = torch.nn.functional.pad(history, (0, w))
        return fft_causal_conv(padded, self.kernel(t0 + w))[..., t0:]              # one FFT per block

    @torch.no_grad()
    def forward_block(self, u: torch.Tensor, cache: dict) -> torch.Tensor:
        """Outputs (B, n, C, H) at the first n positions of the current block from its inputs
        u (B, n, H), equal to those of the parallel forward over the whole sequence."""
        if cache["carry"] is None:  # once per block
            cache["carry"] = self._carry(cache)
        n = u.shape[1]
        u_t = u.transpose(1, 2)                                                    # (B, H, n)
        y = fft_causal_conv(u_t, cache["kernel"][..., :n])                         # (B, C, H, n)
        y = y + self.D.to(y.dtype).unsqueeze(-1) * u_t.unsqueeze(1).to(y.dtype) + cache["carry"][..., :n]
        return y.permute(0, 3, 1, 2)

    @torch.no_grad()
    def end_block(self, cache: dict, u: torch.Tensor) -> None:
        """Fold a complete block of inputs u (B, W, H) into the state."""
        u = u.transpose(1, 2)
        if "op" in cache:
            cache["state"] = cache["op"].advance(cache["state"], u.to(cache["op"].inp.real.dtype))
        else:
            cache["history"] = torch.cat([cache["history"], u.to(cache["history"].dtype)], -1)
        cache["carry"] = None

    @torch.compiler.disable  # complex/FFT code stays eager: inductor does not generate it
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, L, H) -> y (B, L, C, H) in float32 (float64 for float64 inputs)."""
        length = u.shape[1]
        u_t = u.transpose(1, 2)                                                  # (B, H, L)
        y = fft_causal_conv(u_t, self.kernel(length))                            # (B, C, H, L)
        y = y + self.D.to(y.dtype).unsqueeze(-1) * u_t.unsqueeze(1).to(y.dtype)
        return y.permute(0, 3, 1, 2)                                             # (B, L, C, H)


class BlockOperator:
    """Exact block-to-block recurrence of a structured SSM (S4 or S4D) for blocks of W steps.

    With the state s after the tokens before a block, y_t of the block's in-block step t gets
    Re(out[t] s) from the past ("carry"), and after the whole block the state becomes
    decay s + sum_j inp[:, j] u_j. Built once from the discretized system (inference only).
    """

    def __init__(self, kernel: nn.Module, block_size: int):
        with torch.no_grad():
            da, db, c = kernel.discrete()
            scale = 2.0 if isinstance(kernel, S4DKernel) else 1.0   # S4D keeps half the states
            if da.dim() == 3:                                          # diagonal: powers elementwise
                steps = torch.arange(block_size + 1, device=da.device, dtype=da.real.dtype)
                powers = torch.exp(torch.log(da).unsqueeze(-1) * steps)  # (C, H, N, W+1)
                self.out = scale * (c.unsqueeze(-1) * powers[..., 1:]).transpose(-1, -2)
                self.inp = db.unsqueeze(-1) * powers[..., :-1].flip(-1)    # (C, H, N, W)
                self.decay = torch.diag_embed(powers[..., -1])             # (C, H, N, N)
            else:
                eye = torch.eye(da.shape[-1], dtype=da.dtype, device=da.device)
                powers = [eye.expand_as(da)]
                for _ in range(block_size):
                    powers.append(powers[-1] @ da)
                stack = torch.stack(powers, dim=2)                        # (C, H, W+1, N, N)
                self.out = scale * torch.einsum("chn,chtnm->chtm", c, stack[:, :, 1:])
                self.inp = torch.einsum("chtnm,chm->chnt", stack[:, :, :-1].flip(2), db)
                self.decay = stack[:, :, -1]
        self.block_size = block_size

    def carry(self, state: torch.Tensor) -> torch.Tensor:
        """state (B, C, H, N) -> contribution (B, C, H, W) to the next block's outputs."""
        return torch.einsum("chtn,bchn->bcht", self.out, state).real

    def advance(self, state: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """state after one more block of inputs u (B, H, W)."""
        return (torch.einsum("chnm,bchm->bchn", self.decay, state)
                + torch.einsum("chnw,bhw->bchn", self.inp, u.to(self.inp.dtype)))


__all__ = [
    "SSM", "build_kernel", "fft_causal_conv", "next_fast_len", "S4DKernel", "S4Kernel",
    "ImplicitKernel", "ExplicitKernel", "hippo_legs_nplr", "BlockOperator",
]
