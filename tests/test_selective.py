"""The selective SSM ("ssd" kernel): the chunked algorithm against the step-by-step recurrence,
block-end outputs for MF, block-wise inference, and the optional fused CUDA kernel."""

import math

import pytest
import torch

from blockstate import ModelConfig, build_model
from blockstate.ssm import ssd
from blockstate.ssm.selective import SelectiveSSM, _fused_available
from blockstate.ssm.ssd import (
    ssd_block_ends,
    ssd_chunked,
    ssd_reference,
    ssd_rotary,
    ssd_rotary_block_ends,
    state_decays,
    state_outputs,
)

DECAYS = ["head", "state", "complex"]


def _inputs(batch=2, length=37, k=3, g=2, p=4, n=5, seed=0, decay="head"):
    """Inputs of the scan; decay "state" gives each head a decay per state dimension, "complex" a
    complex one (rotations up to 5 radians per unit step) with complex B and C."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, k, g, p, generator=gen, dtype=torch.float64)
    dt = torch.rand(batch, length, k, g, generator=gen, dtype=torch.float64) * 0.5
    a = -torch.rand(k, g, *((n,) if decay != "head" else ()), generator=gen, dtype=torch.float64) * 3
    b = torch.randn(batch, length, k, n, generator=gen, dtype=torch.float64)
    c = torch.randn(batch, length, k, n, generator=gen, dtype=torch.float64)
    if decay == "complex":
        a = torch.complex(a, torch.rand(k, g, n, generator=gen, dtype=torch.float64) * 10 - 5)
        b = torch.complex(b, torch.randn(batch, length, k, n, generator=gen, dtype=torch.float64))
        c = torch.complex(c, torch.randn(batch, length, k, n, generator=gen, dtype=torch.float64))
    return x, dt, a, b, c


@pytest.mark.parametrize("chunk", [1, 4, 8, 64])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("decay", DECAYS)
def test_chunked_scan_equals_the_recurrence(chunk, with_state, decay):
    x, dt, a, b, c = _inputs(decay=decay)
    h0 = torch.randn(2, 3, 2, 4, 5, dtype=b.dtype) if with_state else None
    y_ref, h_ref = ssd_reference(x, dt, a, b, c, h0)
    y, h = ssd_chunked(x, dt, a, b, c, chunk, h0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("decay", DECAYS)
def test_chunked_scan_gradients_equal_the_recurrences(decay):
    inputs = [t.requires_grad_() for t in _inputs(length=20, decay=decay)]
    y, _ = ssd_chunked(*inputs, chunk=8)
    grads = torch.autograd.grad(y.square().sum(), inputs)
    y_ref, _ = ssd_reference(*inputs)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), inputs)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("decay", DECAYS + ["rotary"])
def test_a_scan_split_in_parts_and_combined_by_the_carried_states_equals_the_whole(decay):
    """What context parallelism computes on each part: the scan from zeros, plus the readout of
    the state the earlier parts leave (each part's own end state and its decay, combined in
    order), equals the scan of the whole sequence."""
    if decay == "rotary":
        (x, dt, real, omega, b, c), a = _rotary_inputs(length=36)
    else:
        x, dt, a, b, c = _inputs(length=36, decay=decay)
    y_ref, h_ref = ssd_reference(x, dt, a, b, c)
    incoming, ys = None, []
    for part in (slice(0, 12), slice(12, 20), slice(20, 36)):
        xp, dtp, bp, cp = (t[:, part] for t in (x, dt, b, c))
        if decay == "rotary":
            y, own = ssd_rotary(xp, dtp, real, omega, bp, cp, 8)
        else:
            y, own = ssd_chunked(xp, dtp, a, bp, cp, 8)
        decays = state_decays(dtp, a, own.dtype)                          # (B, T, K, G, N')
        if incoming is not None:
            y = y + state_outputs(cp, decays, incoming)
            own = own + decays[:, -1].unsqueeze(-2) * incoming
        ys.append(y)
        incoming = own
    torch.testing.assert_close(torch.cat(ys, 1), y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(incoming, h_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("decay", DECAYS)
def test_block_end_outputs_come_from_the_boundary_states(decay):
    x, dt, a, b, c = _inputs(length=40, decay=decay)
    y, _ = ssd_reference(x, dt, a, b, c)
    torch.testing.assert_close(ssd_block_ends(x, dt, a, b, c, 8), y[:, 7::8], rtol=0, atol=1e-12)


@pytest.mark.parametrize("decay", DECAYS + ["rotary"])
def test_block_end_outputs_of_the_module_equal_its_forward_pass(decay):
    ssm = SelectiveSSM(4, 32, 8, 1e-3, 1e-1, chunk_size=16, decay=decay).double()
    torch.nn.init.uniform_(ssm.kernel.to_dt.bias, -1.0, 1.0)  # steps that turn the modes visibly
    u = torch.randn(2, 50, 32, dtype=torch.float64)
    torch.testing.assert_close(ssm.block_end_outputs(u, 10), ssm(u)[:, 9::10], rtol=0, atol=1e-12)


@pytest.mark.parametrize("heads, decay, bc_norm", [(None, "head", False), (32, "head", False),
                                                   (8, "state", False), (None, "head", True),
                                                   (8, "complex", False), (None, "complex", True),
                                                   (8, "rotary", False), (None, "rotary", True)])
def test_one_token_steps_keep_a_constant_state_and_equal_the_forward_pass(heads, decay, bc_norm):
    ssm = SelectiveSSM(2, 32, 8, 1e-3, 1e-1, chunk_size=8, heads=heads, decay=decay,
                       bc_norm=bc_norm).double()
    if bc_norm:  # gains away from 1, so that a step that skipped them would differ
        torch.nn.init.uniform_(ssm.kernel.bc_gain, 0.5, 2.0)
    u = torch.randn(2, 48, 32, dtype=torch.float64)
    full = ssm(u)
    cache = ssm.allocate_cache(2, u.device, torch.float64)
    ssm.prefill_cache(u[:, :13], cache)                 # a prompt that is not a chunk multiple
    shapes = (cache.state.shape, cache.tail.shape)
    steps = [ssm.step(u[:, t], cache) for t in range(13, 48)]
    assert (cache.state.shape, cache.tail.shape) == shapes
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 13:], rtol=0, atol=1e-12)


def test_the_selective_ssm_depends_on_content_unlike_a_time_invariant_one():
    """An LTI SSM is linear in its input; the selective one is not (its step and B/C follow it)."""
    ssm = SelectiveSSM(1, 16, 8, 1e-3, 1e-1).double()
    u1, u2 = torch.randn(2, 1, 32, 16, dtype=torch.float64)
    assert (ssm(u1 + u2) - ssm(u1) - ssm(u2)).abs().max() > 1e-3


def test_presets_and_configuration():
    assert build_model("bst-sh-ssd", "tiny").config.ssm.kind == "ssd"
    assert build_model("bst-mf-ssd", "tiny").config.context.kind == "mf"
    with pytest.raises(ValueError, match="ssm kind 'ssd' has no field 'method'"):
        ModelConfig(ssm={"kind": "ssd", "method": "fft"})


def test_heads_and_decay_kind():
    """ssm.heads sets the heads per channel (each its own step and decay); decay kind "state" gives
    every head N decays, A_n = n + 1 at initialization (S6), in place of one."""
    model = build_model("bst-sh-ssd", "tiny", **{"ssm.heads": 16, "ssm.decay": "state"})
    kernel = model.layers[model.config.resolved_bst_layers[0]].context.ssm.kernel
    assert kernel.heads == 16 and kernel.log_a.shape == (1, 16, 8)
    torch.testing.assert_close(kernel.log_a.exp()[0, 3], torch.arange(1.0, 9.0))
    default = build_model("bst-sh-ssd", "tiny")
    assert default.layers[default.config.resolved_bst_layers[0]].context.ssm.kernel.heads == 4
    with pytest.raises(ValueError, match="must divide the SSM width 16"):
        ModelConfig(d_model=64, ssm={"kind": "ssd", "heads": 3})
    with pytest.raises(ValueError, match="ssm.decay.kind='channel' is not valid; registered decay "
                                         "kinds: head, state, complex, rotary"):
        ModelConfig(ssm={"kind": "ssd", "decay": "channel"})
    with pytest.raises(ValueError, match="ssm kind 's4' has no field 'decay'"):
        ModelConfig(ssm={"kind": "s4", "decay": "state"})


def test_complex_decay_pairs_the_state_into_rotating_modes():
    """ssd_decay="complex": N/2 complex modes per head, A_m = -1/2 + i pi m at initialization
    (S4D-Lin), the cache's state the same N real numbers per head as the real kinds."""
    model = build_model("bst-sh-ssd", "tiny", **{"ssm.decay": "complex"})
    ssm = model.layers[model.config.resolved_bst_layers[0]].context.ssm
    a = ssm._decay(torch.zeros(()))
    assert a.is_complex() and a.shape == (1, 4, 4)
    torch.testing.assert_close(a[0, 2], torch.complex(torch.full((4,), -0.5),
                                                       torch.pi * torch.arange(4.0)))
    real = build_model("bst-sh-ssd", "tiny").layers[model.config.resolved_bst_layers[0]].context.ssm
    cache, real_cache = (s.allocate_cache(2, torch.device("cpu")) for s in (ssm, real))
    assert cache.state.shape == real_cache.state.shape and not cache.state.is_complex()
    # per layer: 4 heads x 4 modes of real and imaginary parts in place of 4 scalar decays
    extra = len(model.config.resolved_bst_layers) * (4 * 4 * 2 - 4)
    assert model.num_parameters() - build_model("bst-sh-ssd", "tiny").num_parameters() == extra
    with pytest.raises(ValueError, match="needs an even ssm.state_size"):
        ModelConfig(ssm={"kind": "ssd", "decay": "complex", "state_size": 7})


def test_complex_modes_count_the_steps_the_input_takes():
    """A mode's phase advances with dt_t, not with positions: inserting steps of dt = 0 (tokens the
    input chose to skip) leaves the readout of the complex state unchanged, and the rotation shows
    in it (unlike a real decay of the same magnitude)."""
    x, dt, a, b, c = _inputs(length=12, decay="complex")
    y, h = ssd_chunked(x, dt, a, b, c, 4)
    skip = torch.zeros_like(dt[:, :5])
    padded = [torch.cat([t[:, :6], z, t[:, 6:]], 1) for t, z in
              ((x, torch.randn_like(x[:, :5])), (dt, skip), (b, torch.randn_like(b[:, :5])),
               (c, c[:, 5:6].expand(-1, 5, -1, -1)))]
    y_skip, h_skip = ssd_chunked(padded[0], padded[1], a, padded[2], padded[3], 4)
    torch.testing.assert_close(h_skip, h, rtol=0, atol=1e-12)
    torch.testing.assert_close(y_skip[:, 11:], y[:, 6:], rtol=0, atol=1e-12)
    y_real, _ = ssd_chunked(x, dt, (-a.abs()).to(a.dtype), b, c, 4)  # no rotation
    assert (y - y_real).abs().max() > 1e-2


def _rotary_inputs(length=37, seed=1):
    """Inputs of the rotary scan, (x, dt, a (K, G), omega (K, G, N), b, c), and the complex decays
    (K, G, N) of the same system for the reference."""
    x, dt, a, b, c = _inputs(length=length, seed=seed, decay="complex")
    real = -torch.rand(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3
    omega = a.imag.clone()
    return (x, dt, real, omega, b, c), torch.complex(real.unsqueeze(-1).expand_as(omega), omega)


@pytest.mark.parametrize("chunk", [1, 8, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_rotary_scan_equals_the_complex_recurrence(chunk, with_state):
    """ssd_decay="rotary": the real scan with B and C rotated by the input-dependent phases is the
    complex recurrence whose decays share their real part within a head."""
    (x, dt, a, omega, b, c), decays = _rotary_inputs()
    h0 = torch.randn(2, 3, 2, 4, 5, dtype=b.dtype) if with_state else None
    y_ref, h_ref = ssd_reference(x, dt, decays, b, c, h0)
    y, h = ssd_rotary(x, dt, a, omega, b, c, chunk, h0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-12)
    if h0 is None:
        torch.testing.assert_close(ssd_rotary_block_ends(x, dt, a, omega, b, c, 8), y_ref[:, 7::8],
                                   rtol=0, atol=1e-12)


def test_rotary_scan_gradients_equal_the_recurrences():
    inputs, _ = _rotary_inputs(length=20)
    inputs = [t.requires_grad_() for t in inputs]
    y, _ = ssd_rotary(*inputs, chunk=8)
    grads = torch.autograd.grad(y.square().sum(), inputs)
    x, dt, a, omega, b, c = inputs
    decays = torch.complex(a.unsqueeze(-1).expand_as(omega), omega)
    y_ref, _ = ssd_reference(x, dt, decays, b, c)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), inputs)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("group", [None, 1])
def test_rotary_block_ends_gradients_equal_the_recurrences(group, monkeypatch):
    """MF's path (B turned block by block, C at the block ends only) has the gradients of the
    complex recurrence's block-end readouts, for a length that leaves a partial block, whether it
    turns all blocks at once or one at a time (BLOCK_GROUP = 1)."""
    if group is not None:
        monkeypatch.setattr(ssd, "BLOCK_GROUP", group)
    inputs, _ = _rotary_inputs(length=27)
    inputs = [t.requires_grad_() for t in inputs]
    y = ssd_rotary_block_ends(*inputs, block=8)
    assert y.shape[1] == 3
    grads = torch.autograd.grad(y.square().sum(), inputs)
    x, dt, a, omega, b, c = inputs
    y_ref, _ = ssd_reference(x, dt, torch.complex(a.unsqueeze(-1).expand_as(omega), omega), b, c)
    grads_ref = torch.autograd.grad(y_ref[:, 7::8].square().sum(), inputs)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


def test_rotary_phases_stay_precise_over_long_float32_sequences():
    """The phases grow with the steps taken (here to about 10^4 radians); summed in float64 and
    reduced modulo 2 pi, the float32 scan keeps the float64 recurrence's readout."""
    (x, dt, a, omega, b, c), decays = _rotary_inputs(length=2048)
    omega = omega * 4
    decays = torch.complex(decays.real / 20, omega)  # slow decays: old phases stay in the readout
    y_ref, _ = ssd_reference(x, dt, decays, b, c)
    single = [t.float() if not t.is_complex() else t.to(torch.complex64)
              for t in (x, dt, a / 20, omega, b, c)]
    y, _ = ssd_rotary(*single, chunk=64)
    assert (y.double() - y_ref).abs().max() < 1e-4 * y_ref.abs().max()  # 3e-4 summed in float32
    # MF's block ends take each block's first step as the float64 reference (blocks of 128 steps)
    ends = ssd_rotary_block_ends(*single, block=128)
    assert (ends.double() - y_ref[:, 127::128]).abs().max() < 1e-4 * y_ref.abs().max()


def test_rotary_decay_starts_as_the_complex_one():
    """ssd_decay="rotary" keeps one real decay per head (N/2 + 1 numbers per head in place of N);
    at initialization (-1/2 for every mode) it is the complex kind with the same weights."""
    torch.manual_seed(0)
    rotary = SelectiveSSM(2, 32, 8, 1e-3, 1e-1, chunk_size=8, decay="rotary").double()
    complex_ = SelectiveSSM(2, 32, 8, 1e-3, 1e-1, chunk_size=8, decay="complex").double()
    assert rotary.kernel.log_a.shape == (2, 8) and complex_.kernel.log_a.shape == (2, 8, 4)
    state = {k: v for k, v in rotary.state_dict().items() if k != "kernel.log_a"}
    complex_.load_state_dict(state, strict=False)
    torch.testing.assert_close(complex_._decay(torch.zeros(())), rotary._decay(torch.zeros(())))
    u = torch.randn(2, 30, 32, dtype=torch.float64)
    torch.testing.assert_close(rotary(u), complex_(u), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs an even ssm.state_size"):
        ModelConfig(ssm={"kind": "ssd", "decay": "rotary", "state_size": 7})


def test_normalized_b_and_c_carry_distant_tokens_near_the_skip_terms_scale():
    """ssd_bc_norm: B_t and C_t of unit RMS (learned gains), so that at initialization the state's
    part of the output is a sizeable fraction of the skip term (about 1% without it)."""
    def state_to_skip(bc_norm):
        torch.manual_seed(0)
        ssm = SelectiveSSM(1, 16, 8, 1e-3, 1e-1, bc_norm=bc_norm)
        u = torch.randn(8, 64, 16)
        with torch.no_grad():
            y = ssm(u)
            ssm.D.zero_()
            state = ssm(u)
        return (state.norm() / (y - state).norm()).item()
    assert state_to_skip(False) < 0.05 < 0.2 < state_to_skip(True)
    with pytest.raises(ValueError, match="ssm kind 's4' has no field 'bc_norm'"):
        ModelConfig(ssm={"kind": "s4", "bc_norm": True})


def test_still_modes_start_at_frequency_zero_and_are_checked():
    """ssd_still_modes=K: the first K modes of every head start without rotation (the others at pi m,
    as before), stay trainable, and the setting is refused where there are no rotating modes."""
    torch.manual_seed(0)
    ssm = SelectiveSSM(2, 16, 8, 1e-3, 1e-1, heads=4, decay="rotary", still_modes=3)
    torch.manual_seed(0)
    turning = SelectiveSSM(2, 16, 8, 1e-3, 1e-1, heads=4, decay="rotary")
    expected = math.pi * torch.tensor([0.0, 0.0, 0.0, 3.0]).expand(2, 4, 4)
    torch.testing.assert_close(ssm.kernel.a_imag.detach(), expected)
    assert ssm.kernel.a_imag.requires_grad
    # nothing else changes: the same draws of every other parameter
    others = {k: v for k, v in ssm.state_dict().items() if k != "kernel.a_imag"}
    for name, value in others.items():
        torch.testing.assert_close(value, turning.state_dict()[name])
    config = ModelConfig(ssm={"kind": "ssd", "state_size": 8,
                              "decay": {"kind": "complex", "still_modes": 4}})
    assert config.ssm.decay.still_modes == 4
    for bad, match in [({"decay": {"kind": "head", "still_modes": 2}},
                        "decay kind 'head' has no field"),
                       ({"decay": {"kind": "rotary", "still_modes": 5}, "state_size": 8},
                        "accepted: 0 to the 4 modes"),
                       ({"decay": {"kind": "rotary", "still_modes": -1}},
                        r"^ssm\.decay\.still_modes=-1 must be >= 0$"),
                       ({"kind": "s4", "decay": {"kind": "rotary", "still_modes": 1}},
                        "ssm kind 's4' has no field 'decay'")]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(ssm={"kind": "ssd", **bad})
    with pytest.raises(ValueError, match="rotating kind"):
        SelectiveSSM(1, 16, 8, 1e-3, 1e-1, decay="head", still_modes=1)


@pytest.mark.skipif(not _fused_available(torch.device("cuda")) if torch.cuda.is_available() else True,
                    reason="needs CUDA and the mamba-ssm package")
@pytest.mark.parametrize("decay", ["head", "rotary"])
def test_fused_cuda_kernel_matches_the_pytorch_path(decay):
    ssm = SelectiveSSM(3, 64, 16, 1e-3, 1e-1, chunk_size=64, decay=decay).cuda()
    u = torch.randn(2, 256, 64, device="cuda")
    fused = ssm(u)
    ssm.use_fused = False
    torch.testing.assert_close(fused, ssm(u), rtol=1e-3, atol=1e-3)
