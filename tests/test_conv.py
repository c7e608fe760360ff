import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockstate.ssm import fft_causal_conv, next_fast_len

from reference import direct_causal_conv


def _smooth(m: int) -> bool:
    for p in (2, 3, 5):
        while m % p == 0:
            m //= p
    return m == 1


@pytest.mark.parametrize("n", [1, 2, 3, 7, 11, 17, 97, 100, 1000, 2049, 4097])
def test_next_fast_len_is_the_smallest_5_smooth_size(n):
    m = next_fast_len(n)
    assert m >= n and _smooth(m)
    assert not any(_smooth(k) for k in range(n, m))


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), channels=st.integers(1, 3), width=st.integers(1, 4),
       length=st.integers(1, 70), kernel_len=st.integers(1, 80))
def test_fft_equals_direct(batch, channels, width, length, kernel_len):
    u = torch.randn(batch, width, length, dtype=torch.float64)
    k = torch.randn(channels, width, kernel_len, dtype=torch.float64)
    torch.testing.assert_close(fft_causal_conv(u, k), direct_causal_conv(u, k),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length", [1, 2, 13, 64, 127, 128, 509, 1024])
def test_fft_float32_and_prime_lengths(length):
    u = torch.randn(2, 3, length)
    k = torch.randn(1, 3, length) / length ** 0.5
    ref = direct_causal_conv(u.double(), k.double()) if length <= 128 else None
    y = fft_causal_conv(u, k)
    assert y.dtype == torch.float32 and y.shape == (2, 1, 3, length)
    if ref is not None:
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length", [5, 31, 64, 97, 256])
def test_no_wrap_around(length):
    # An impulse at the last position must not leak to earlier outputs, whatever the kernel.
    u = torch.zeros(1, 1, length, dtype=torch.float64)
    u[..., -1] = 1.0
    k = torch.ones(1, 1, length, dtype=torch.float64)
    y = fft_causal_conv(u, k)
    assert y[..., :-1].abs().max() < 1e-12
    assert y[..., -1].item() == pytest.approx(1.0)


def test_fft_conv_under_autocast_is_float32():
    u = torch.randn(1, 2, 33)
    k = torch.randn(1, 2, 33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fft_causal_conv(u.bfloat16(), k)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, fft_causal_conv(u.bfloat16().float(), k))


def test_bad_shapes():
    with pytest.raises(ValueError, match="channel mismatch"):
        fft_causal_conv(torch.randn(1, 2, 5), torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="expected u of shape"):
        fft_causal_conv(torch.randn(2, 5), torch.randn(1, 2, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fft_conv_cuda_matches_cpu():
    u = torch.randn(2, 4, 301)
    k = torch.randn(3, 4, 301) / 17
    torch.testing.assert_close(fft_causal_conv(u.cuda(), k.cuda()).cpu(), fft_causal_conv(u, k),
                               rtol=1e-4, atol=1e-4)
