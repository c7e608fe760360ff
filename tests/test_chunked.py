"""The chunked (FFT-free) computation of S4/S4D convolutions against the FFT path and a recurrence:
values and gradients, block-end outputs, method selection and the evaluation cache."""

import pytest
import torch

from blockstate.config import ModelConfig
from blockstate.model import BlockStateLM
from blockstate.ssm import (
    SSM,
    ImplicitKernel,
    S4DKernel,
    S4Kernel,
    chunk_operators,
    chunked_causal_conv,
    fft_causal_conv,
)

from reference import run_recurrence, zoh_discretize


def _kernel(kind: str, channels: int = 2, width: int = 3, state: int = 8) -> torch.nn.Module:
    cls = S4DKernel if kind == "s4d" else S4Kernel
    kernel = cls(channels, width, state, dt_min=0.01, dt_max=0.3).double()
    with torch.no_grad():  # move away from the initialization so that every parameter matters
        for p in kernel.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return kernel


@pytest.mark.parametrize("kind", ["s4d", "s4"])
@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 4), (64, 16), (100, 16), (257, 64), (96, 1), (90, 24)])
@pytest.mark.parametrize("channels", [1, 3])
def test_chunked_equals_fft(kind, length, chunk, channels):
    kernel = _kernel(kind, channels)
    u = torch.randn(2, 3, length, dtype=torch.float64)
    y = chunked_causal_conv(u, chunk_operators(kernel, chunk))
    torch.testing.assert_close(y, fft_causal_conv(u, kernel(length)), rtol=1e-9, atol=1e-9)


class _Rescaled(torch.nn.Module):
    """A kernel the library does not know: twice an S4D kernel, through the kernel seam only."""

    def __init__(self, inner: S4DKernel):
        super().__init__()
        self.inner, self.channels, self.width = inner, inner.channels, inner.width

    def forward(self, length: int) -> torch.Tensor:
        return 2 * self.inner(length)

    def chunk_operators(self, chunk: int):
        ops = self.inner.chunk_operators(chunk)
        return type(ops)(2 * ops.taps, ops.inp, 2 * ops.out, ops.decay, 2 * ops.readout)


def test_a_new_kernel_needs_only_chunk_operators_for_the_chunked_path_and_generation():
    kernel = _Rescaled(_kernel("s4d"))
    ssm = SSM(kernel, method="chunked", chunk_size=16).double()
    u = torch.randn(2, 70, 3, dtype=torch.float64)
    reference = SSM(kernel, method="fft").double()
    reference.D = ssm.D
    torch.testing.assert_close(ssm(u), reference(u), rtol=1e-9, atol=1e-9)
    cache = ssm.allocate_cache(2, u.device, torch.float64)  # a recurrent state, not a history
    steps = torch.stack([ssm.step(u[:, t], cache) for t in range(70)], 1)
    torch.testing.assert_close(steps, reference(u), rtol=1e-9, atol=1e-9)
    with pytest.raises(TypeError, match="state-space form"):
        chunk_operators(ImplicitKernel(1, 3, train_length=16), 4)


def test_chunked_s4d_equals_an_independent_recurrence():
    kernel = _kernel("s4d")
    u = torch.randn(2, 3, 90, dtype=torch.float64)
    dt, a, c = kernel.continuous()
    da, db = zoh_discretize(dt, a, torch.ones_like(a))
    y_ref = run_recurrence(da, db, c, u, real_scale=2.0)
    y = chunked_causal_conv(u, chunk_operators(kernel, 16))
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["s4d", "s4"])
def test_chunked_gradients_equal_fft_gradients(kind):
    torch.manual_seed(0)
    kernel = _kernel(kind)
    chunked, fft = SSM(kernel, "chunked", 16).double(), SSM(kernel, "fft").double()
    with torch.no_grad():
        fft.D.copy_(chunked.D)
    u = torch.randn(2, 150, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 150, 2, 3, dtype=torch.float64)
    grads = []
    for ssm in (chunked, fft):
        (ssm(u) * w).sum().backward()
        params = [u] + list(ssm.parameters())
        grads.append([p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    assert len(grads[0]) == len(list(kernel.parameters())) + 2
    for g_chunked, g_fft in zip(*grads, strict=True):
        torch.testing.assert_close(g_chunked, g_fft, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind", ["s4d", "s4"])
def test_chunked_float32_long_sequence(kind):
    torch.manual_seed(0)
    kernel = (S4DKernel if kind == "s4d" else S4Kernel)(1, 8, 16)
    u = torch.randn(1, 8, 4096)
    y = chunked_causal_conv(u, chunk_operators(kernel, 64))
    ref = fft_causal_conv(u.double(), kernel.double()(4096))
    assert (y.double() - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.parametrize("kind,method", [("s4d", "chunked"), ("s4", "chunked"), ("s4", "fft"),
                                         ("unstruct", "auto")])
@pytest.mark.parametrize("block", [16, 24])
def test_block_end_outputs_equal_forward_at_block_ends(kind, method, block):
    kernel = _kernel(kind) if kind != "unstruct" else ImplicitKernel(2, 3, 96).double()
    ssm = SSM(kernel, method, 16).double()
    u = torch.randn(2, 96, 3, dtype=torch.float64)
    ends = ssm.block_end_outputs(u, block)
    assert ends.shape == (2, 96 // block, 2, 3)
    torch.testing.assert_close(ends, ssm(u)[:, block - 1::block], rtol=1e-9, atol=1e-10)


def test_auto_method_and_its_errors():
    cpu = torch.device("cpu")
    assert SSM(S4Kernel(1, 2, 4), "auto", 64).resolve_method(128, cpu) == "chunked"
    assert SSM(S4DKernel(1, 2, 4), "auto", 64).resolve_method(127, cpu) == "fft"
    assert SSM(ImplicitKernel(1, 2, 256), "auto", 64).resolve_method(256, cpu) == "fft"
    assert SSM(S4Kernel(1, 2, 4), "fft").resolve_method(4096, cpu) == "fft"
    with pytest.raises(ValueError, match="needs an S4 or S4D kernel"):
        SSM(ImplicitKernel(1, 2, 16), "chunked")
    with pytest.raises(ValueError, match="ssm.method='chunked' needs a kernel with a state-space"):
        ModelConfig(ssm={"kind": "unstruct", "method": "chunked"})
    with pytest.raises(ValueError, match="ssm.method='winograd' is not valid"):
        ModelConfig(ssm={"kind": "s4", "method": "winograd"})


@pytest.mark.parametrize("method", ["chunked", "fft"])
def test_evaluation_cache_follows_parameter_updates(method):
    torch.manual_seed(0)
    ssm = SSM(S4DKernel(1, 4, 8), method, 16)
    u = torch.randn(1, 64, 4)
    with torch.no_grad():
        first = ssm(u)
        assert ssm._cache is not None
        torch.testing.assert_close(ssm(u), first, rtol=0, atol=0)   # served from the cache
        ssm.kernel.log_dt.add_(0.5)                                    # an optimizer step
        updated = ssm(u)
    assert not torch.allclose(updated, first)
    torch.testing.assert_close(updated, ssm(u).detach(), rtol=0, atol=0)  # same as uncached


@pytest.mark.parametrize("variant", ["sh", "mh", "mf"])
@pytest.mark.parametrize("kernel", ["s4", "s4d"])
def test_models_agree_across_ssm_methods(variant, kernel):
    config = ModelConfig(d_model=32, n_layers=2, n_heads=2, block_size=16, max_seq_len=96,
                         context=variant, ssm={"kind": kernel, "state_size": 8, "chunk_size": 8,
                                               "method": "chunked"})
    config = config.with_overrides(**{"context.states": 4} if variant == "mf" else {})
    torch.manual_seed(0)
    chunked = BlockStateLM(config).double()
    fft = BlockStateLM(config.with_overrides(**{"ssm.method": "fft"})).double()
    fft.load_state_dict(chunked.state_dict())
    tokens = torch.randint(0, 256, (2, 96))
    outs = []
    for model in (chunked, fft):
        logits = model(tokens)
        logits.logsumexp(-1).sum().backward()
        outs.append((logits.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-9, atol=1e-9)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
