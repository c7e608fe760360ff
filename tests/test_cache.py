"""Layer-level inference caches: SSM one-position steps against the convolution, and the key/value
cache's bookkeeping."""

import pytest
import torch

from blockstate.cache import KVCache, nbytes, select_rows
from blockstate.ssm import SSM, ExplicitKernel, ImplicitKernel, S4DKernel, S4Kernel


def _kernel(kind, channels, width):
    if kind == "s4d":
        return S4DKernel(channels, width, 8)
    if kind == "s4":
        return S4Kernel(channels, width, 8)
    if kind == "unstruct":
        return ImplicitKernel(channels, width, 64, hidden=16, frequencies=4)
    return ExplicitKernel(channels, width, 64)


@pytest.mark.parametrize("kind", ["s4d", "s4", "unstruct", "explicit"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_ssm_steps_equal_the_convolution(kind, dtype, atol):
    """Prefill (state from the chunked path, or the input history), then one position at a time:
    S4D's diagonal and S4's real-block recurrence, unstructured kernels' streamed convolution, each
    equal to the FFT convolution over the whole sequence (past 64 positions the unstructured kernels
    extrapolate, which the step follows exactly as well)."""
    torch.manual_seed(0)
    ssm = SSM(_kernel(kind, 3, 8), method="fft", chunk_size=16).to(dtype)
    u = torch.randn(2, 90, 8, dtype=dtype)
    full = ssm(u)                                                          # (B, L, C, H)
    cache = ssm.allocate_cache(2, u.device, dtype)
    ssm.prefill_cache(u[:, :21], cache)
    steps = torch.stack([ssm.step(u[:, t], cache) for t in range(21, 90)], 1)
    assert steps.dtype == full.dtype
    torch.testing.assert_close(steps, full[:, 21:], rtol=0, atol=atol * full.abs().max().item())


def test_outputs_can_be_skipped_without_changing_the_state():
    ssm = SSM(S4Kernel(2, 4, 8))
    u = torch.randn(1, 10, 4)
    a, b = ssm.allocate_cache(1, u.device), ssm.allocate_cache(1, u.device)
    for t in range(10):
        assert ssm.step(u[:, t], a, output=False) is None
        ssm.step(u[:, t], b)
    assert torch.equal(a.state, b.state)


def test_kv_cache_appends_grows_trims_and_selects_rows():
    cache = KVCache.empty(2, 3, 4, 5, "cpu", torch.float32)
    k = torch.randn(2, 3, 4, 4)
    keys, values = cache.append(k, -k)
    assert keys.shape == (2, 3, 4, 4) and torch.equal(values, -k)
    keys, _ = cache.append(k, k)                      # past the capacity of 5: grows
    assert cache.length == 8 and torch.equal(keys[:, :, 4:], k)
    cache.keep_last(3)
    assert cache.length == 3 and torch.equal(cache.keys[:, :, :3], k[:, :, 1:])
    picked = select_rows(cache, torch.tensor([1, 1]))
    assert picked.length == 3 and torch.equal(picked.keys[0], cache.keys[1])
    assert nbytes(picked) == nbytes(cache)


def test_cache_size_with_and_without_the_shared_constants():
    """`nbytes(constants=False)` counts what the rows hold; the constants are shared by `select`."""
    from blockstate import build_model

    model = build_model("bst-sh-s4", "tiny").eval()
    cache = model.allocate_inference_cache(1)
    model.prefill(torch.randint(0, 256, (1, 20)), cache)
    state = cache.nbytes(constants=False)
    assert 0 < state < cache.nbytes()
    picked = cache.select([0, 0, 0])
    assert picked.nbytes(constants=False) == 3 * state
    assert picked.nbytes() - picked.nbytes(constants=False) == cache.nbytes() - state
    bst = cache.layers[model.config.resolved_bst_layers[0]]
    assert picked.layers[model.config.resolved_bst_layers[0]].in_proj is bst.in_proj
