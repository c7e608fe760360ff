"""State-space sublayers and their kernels.

- `layer`: `SSM`, the convolution sublayer (kernel, FFT or chunked path, D skip, inference cache),
  `KernelOptions` (the config of convolution kernels) and `build_ssm`, which builds the SSM
  that a `ModelConfig`'s `ssm` describes.
- `kernels`: kernel generators: S4 and S4D (state-space form: discretization and chunk
  operators), the unstructured implicit and explicit filters.
- `chunked`: the chunked computation of a structured convolution (no FFT, no full-length kernel).
- `conv`: the FFT causal convolution.
- `selective`: the input-dependent (Mamba-2 style) SSM, `ssm` kind "ssd".
- `skip`: skipping filler in the selective SSM's long-memory heads at inference (`skip_filler`).
"""

from .chunked import ChunkOperators, chunk_operators, chunked_causal_conv
from .conv import fft_causal_conv, kernel_spectrum, next_fast_len
from .kernels import ExplicitKernel, ImplicitKernel, S4DKernel, S4Kernel, hippo_legs_nplr
from .layer import SSM, SSM_METHODS, KernelOptions, build_ssm, structured
from .selective import SelectiveSSM
from .ssd import ssd_chunked

__all__ = [
    "SSM", "SSM_METHODS", "KernelOptions", "build_ssm", "fft_causal_conv", "kernel_spectrum", "next_fast_len",
    "S4DKernel", "S4Kernel", "ImplicitKernel", "ExplicitKernel", "hippo_legs_nplr",
    "ChunkOperators", "chunk_operators", "chunked_causal_conv", "structured", "SelectiveSSM",
    "ssd_chunked",
]
