import math

import pytest
import torch

from blockstate.ssm import SSM, ExplicitKernel, ImplicitKernel, S4DKernel, S4Kernel, hippo_legs_nplr

from reference import run_recurrence, zoh_discretize


def _random_s4d(init: str) -> S4DKernel:
    kernel = S4DKernel(channels=2, width=3, state_size=8, init=init, dt_min=0.01, dt_max=0.5).double()
    with torch.no_grad():  # move away from the initialization so every parameter matters
        kernel.log_neg_real.add_(0.3 * torch.randn_like(kernel.log_neg_real))
        if init != "real":  # S4D-Real has no imaginary part to move
            kernel.imag.add_(0.3 * torch.randn_like(kernel.imag))
    return kernel


@pytest.mark.parametrize("init", ["lin", "inv", "real"])
def test_s4d_kernel_equals_zoh_recurrence(init):
    kernel = _random_s4d(init)
    ssm = SSM(kernel).double()
    u = torch.randn(2, 3, 50, dtype=torch.float64)
    dt, a, c = kernel.continuous()
    # Independent discretization: the matrix exponential of the augmented system.
    da, db = zoh_discretize(dt, a, torch.ones_like(a))
    y_ref = run_recurrence(da, db, c, u, real_scale=2.0) + ssm.D[..., None] * u[:, None]
    y = ssm(u.transpose(1, 2)).permute(0, 2, 3, 1)                              # (B, C, H, L)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)


def test_s4d_initializations():
    lin = S4DKernel(1, 1, 8, init="lin")
    inv = S4DKernel(1, 1, 8, init="inv")
    torch.testing.assert_close(lin.imag[0, 0], math.pi * torch.arange(4.0))
    n = torch.arange(4.0)
    torch.testing.assert_close(inv.imag[0, 0], 8 / math.pi * (8 / (2 * n + 1) - 1))
    for k in (lin, inv):
        torch.testing.assert_close(k.log_neg_real.exp(), torch.full_like(k.log_neg_real, 0.5))
        dt = k.log_dt.exp()
        assert (dt >= 1e-3 - 1e-9).all() and (dt <= 1e-1 + 1e-9).all()
    real = S4DKernel(1, 1, 8, init="real")  # S4D-Real: A_n = -(n + 1), and it stays real
    torch.testing.assert_close(real.log_neg_real.exp()[0, 0], n + 1)
    assert "imag" not in dict(real.named_parameters()) and not real.imag.any()


def test_hippo_legs_nplr_is_similar_to_hippo():
    n = 8
    lam, p, b = hippo_legs_nplr(n)
    full = lambda z: torch.cat([z, z.conj()])  # noqa: E731
    a_diag = torch.diag(full(lam)) - full(p)[:, None] * full(p).conj()[None, :]
    # HiPPO-LegS is lower triangular with diagonal -(n+1): its eigenvalues are -1..-N.
    eig = torch.linalg.eigvals(a_diag)
    torch.testing.assert_close(eig.real.sort().values, -torch.arange(n, 0, -1, dtype=torch.float64),
                               atol=1e-8, rtol=0)
    torch.testing.assert_close(eig.imag, torch.zeros(n, dtype=torch.float64), atol=1e-8, rtol=0)
    # Transfer functions P^T (sI - A)^{-1} B agree in the original and the diagonal basis.
    idx = torch.arange(n, dtype=torch.float64)
    r = torch.sqrt(2 * idx + 1)
    a = -torch.tril(r[:, None] * r[None, :], -1) - torch.diag(idx + 1)
    p0, b0 = torch.sqrt(idx + 0.5), r
    for s in (0.3 + 1j, 2.0 - 0.5j):
        eye = torch.eye(n, dtype=torch.complex128)
        ref = p0.to(torch.complex128) @ torch.linalg.solve(s * eye - a.to(torch.complex128),
                                                           b0.to(torch.complex128))
        got = full(p).conj() @ torch.linalg.solve(s * eye - a_diag, full(b))
        assert abs(ref - got) < 1e-8


def _random_s4() -> S4Kernel:
    kernel = S4Kernel(channels=2, width=2, state_size=8, dt_min=0.01, dt_max=0.3).double()
    with torch.no_grad():
        for p in (kernel.P, kernel.B, kernel.imag, kernel.log_neg_real):
            p.add_(0.2 * torch.randn_like(p))
    return kernel


def test_s4_kernel_equals_bilinear_recurrence():
    kernel = _random_s4()
    ssm = SSM(kernel).double()
    dt, lam, p, b, c = kernel.continuous()
    a = torch.diag_embed(lam) - p.unsqueeze(-1) * p.conj().unsqueeze(-2)
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    inv = torch.linalg.inv(eye - dt[..., None, None] / 2 * a)
    da = inv @ (eye + dt[..., None, None] / 2 * a)
    db = (inv @ b.unsqueeze(-1)).squeeze(-1) * dt[..., None]
    u = torch.randn(2, 2, 45, dtype=torch.float64)
    y_ref = run_recurrence(da, db, c, u) + ssm.D[..., None] * u[:, None]
    y = ssm(u.transpose(1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("length", [1, 2, 9, 16, 31])
def test_s4_kernel_equals_matrix_powers(length):
    kernel = _random_s4()
    da, db, c = kernel.discrete()
    powers = [torch.linalg.matrix_power(da, l) for l in range(length)]
    ref = torch.stack([(c * (pw @ db.unsqueeze(-1)).squeeze(-1)).sum(-1).real for pw in powers], -1)
    torch.testing.assert_close(kernel(length), ref, rtol=1e-9, atol=1e-11)


def test_s4_real_discretization_is_the_complex_one_in_real_coordinates():
    """discrete_real (closed-form Woodbury inverse) equals discrete (dense complex solves) after
    the change of basis x = Q r, r = [Re x1; Im x1]; its free response reproduces the kernel."""
    kernel = _random_s4()
    with torch.no_grad():
        kernel.P.add_(0.3 * torch.randn_like(kernel.P))
        kernel.B.add_(0.3 * torch.randn_like(kernel.B))
    da, db, c = kernel.discrete()
    half = da.shape[-1] // 2
    eye = torch.eye(half, dtype=da.dtype)
    q = torch.cat([torch.cat([eye, 1j * eye], 1), torch.cat([eye, -1j * eye], 1)], 0)
    q_inv = torch.linalg.inv(q)
    da_r, db_r, c_r = kernel.discrete_real()
    assert da_r.dtype == db_r.dtype == c_r.dtype == torch.float64
    torch.testing.assert_close(da_r.to(da.dtype), q_inv @ da @ q, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(db_r.to(da.dtype), (q_inv @ db.unsqueeze(-1)).squeeze(-1),
                               rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(c_r.to(da.dtype), c @ q, rtol=1e-12, atol=1e-13)
    taps = [c_r.unsqueeze(-2) @ torch.linalg.matrix_power(da_r, l) @ db_r.unsqueeze(-1)
            for l in range(20)]
    torch.testing.assert_close(torch.cat(taps, -1).squeeze(-2), kernel(20), rtol=1e-9, atol=1e-11)


def test_s4_kernel_float32_close_to_float64():
    kernel = S4Kernel(1, 4, 16)
    k32 = kernel(2048)
    k64 = kernel.double()(2048)
    assert k32.dtype == torch.float32
    torch.testing.assert_close(k32.double(), k64, rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize("cls", [S4Kernel, S4DKernel])
def test_structured_kernels_are_length_consistent_and_float32_under_autocast(cls):
    kernel = cls(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        long = kernel(300)
    assert long.dtype == torch.float32 and long.shape == (2, 3, 300)
    # The first taps do not depend on the requested length: any length is the same filter.
    torch.testing.assert_close(kernel(77), long[..., :77], rtol=1e-4, atol=1e-5)


def test_implicit_kernel_shape_prefix_and_decay():
    kernel = ImplicitKernel(2, 3, train_length=64, hidden=16, frequencies=3, decay=2.0)
    k = kernel(200)
    assert k.shape == (2, 3, 200) and k.dtype == torch.float32
    torch.testing.assert_close(kernel(64), k[..., :64])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel(10).dtype == torch.float32
    # Zero decay changes the kernel by exactly the exp(-alpha t) window.
    t = torch.arange(64) / 64
    kernel.decay = 0.0
    torch.testing.assert_close(k[..., :64], kernel(64) * torch.exp(-2.0 * t))


def test_explicit_kernel_squash_smooth_and_padding():
    kernel = ExplicitKernel(1, 2, train_length=16, squash=0.1, smooth=1)
    with torch.no_grad():
        kernel.weight.copy_(torch.linspace(-0.5, 0.5, 32).reshape(1, 2, 16))
    k = kernel(20)
    w = kernel.weight
    expected = torch.sign(w) * (w.abs() - 0.1).clamp(min=0)
    torch.testing.assert_close(k[..., :16], expected)
    assert (k[..., 16:] == 0).all()                      # no taps beyond the training length
    kernel.smooth = 3
    smooth = kernel(16)
    torch.testing.assert_close(smooth[..., 5], expected[..., 4:7].mean(-1))
    torch.testing.assert_close(smooth[..., 0], expected[..., 0:2].mean(-1))


@pytest.mark.parametrize("cls", [S4Kernel, S4DKernel, ImplicitKernel, ExplicitKernel])
def test_every_kernel_parameter_gets_a_gradient(cls):
    kernel = cls(2, 3, 16) if cls in (S4Kernel, S4DKernel) else cls(2, 3, 32)
    kernel(40).square().sum().backward()
    for name, p in kernel.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
