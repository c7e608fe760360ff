"""Skipping filler in the selective SSM's long-memory heads (blockstate.ssm.skip)."""

import pytest
import torch

from blockstate import build_model
from blockstate.ssm import SelectiveSSM
from blockstate.ssm.skip import set_skip_thresholds, skip_filler, skip_thresholds, stop_skipping

W = 16


def _model(name="bst-recommended"):
    torch.manual_seed(0)
    return build_model(name, "tiny", init_std=0.1).eval()


def _calibrated(factor=2.0):
    model = _model()
    summary = skip_filler(model, torch.randint(0, 256, (4, 3 * W)), factor)
    return model, summary


def test_calibration_skips_the_heads_that_outlast_the_calibration_length():
    model, summary = _calibrated()
    assert [s["layer"] for s in summary] == [n for n, m in model.named_modules()
                                             if isinstance(m, SelectiveSSM)]
    assert all(0 < s["skipping"] < s["heads"] for s in summary), summary  # dt starts in [1e-3, 0.1]
    for _, ssm in ((n, m) for n, m in model.named_modules() if isinstance(m, SelectiveSSM)):
        assert ssm.skip_below.shape == ssm.kernel.log_a.shape
    assert not any("skip_below" in k for k in model.state_dict())  # never saved with the weights


def test_skipping_changes_the_outputs_and_stopping_restores_them_exactly():
    tokens = torch.randint(0, 256, (2, 4 * W))
    model = _model()
    before = model(tokens)
    skip_filler(model, torch.randint(0, 256, (4, 3 * W)))
    assert (model(tokens) - before).abs().max() > 1e-3
    stop_skipping(model)
    assert torch.equal(model(tokens), before)


def test_a_skipped_position_neither_decays_nor_writes_the_state():
    torch.manual_seed(0)
    ssm = SelectiveSSM(channels=2, width=8, state_size=4, dt_min=1e-3, dt_max=1e-1)
    u = torch.randn(2, 20, 8)
    x = ssm._inputs(u)[0]
    ssm.skip_below = torch.full_like(ssm.kernel.log_a, float("inf"))  # every position skipped
    torch.testing.assert_close(ssm(u), ssm.D * x.unsqueeze(2))        # the state stays zero: D x


def test_a_skipping_model_stays_causal_and_steps_like_its_forward_pass():
    model, _ = _calibrated()
    tokens = torch.randint(0, 256, (2, 5 * W + 3))
    full = model(tokens)
    changed = tokens.clone()
    changed[:, 2 * W + 5] = (changed[:, 2 * W + 5] + 1) % 256
    torch.testing.assert_close(model(changed)[:, :2 * W + 5], full[:, :2 * W + 5], atol=0, rtol=0)
    cache = model.allocate_inference_cache(tokens.shape[0])
    got = [model.prefill(tokens[:, :W + 3], cache)]
    got += [model.step(tokens[:, t], cache).unsqueeze(1) for t in range(W + 3, tokens.shape[1])]
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-4, rtol=0)


def test_a_model_without_a_selective_ssm_is_left_alone():
    model = _model("bst-sh-s4")
    tokens = torch.randint(0, 256, (2, 2 * W))
    before = model(tokens)
    assert skip_filler(model, torch.randint(0, 256, (2, 2 * W))) == []
    assert torch.equal(model(tokens), before)


@pytest.mark.parametrize("calibration, factor, message", [
    (torch.randint(0, 256, (2, 32)), 0.0, "factor must be > 0"),
    (torch.randint(0, 256, (32,)), 2.0, r"\(batch, length\) tensor of token ids"),
    (torch.rand(2, 32), 2.0, r"\(batch, length\) tensor of token ids"),
])
def test_bad_calibration_is_refused_in_one_line(calibration, factor, message):
    with pytest.raises(ValueError, match=message):
        skip_filler(_model(), calibration, factor)


def test_thresholds_round_trip_through_json_values_exactly():
    import json

    model, _ = _calibrated()
    thresholds = json.loads(json.dumps(skip_thresholds(model)))
    tokens = torch.randint(0, 256, (2, 4 * W))
    expected = model(tokens)
    other = _model()
    assert skip_thresholds(other) == {}
    set_skip_thresholds(other, thresholds)
    assert torch.equal(other(tokens), expected)
    set_skip_thresholds(other, {})  # no layer named: none skips
    assert skip_thresholds(other) == {}


@pytest.mark.parametrize("thresholds, message", [
    ({"layers.9.ssm": [[1.0]]}, r"layers this model lacks: \['layers.9.ssm'\]"),
    ({"LAYER": [1.0, 2.0]}, r"have shape \(2,\), the layer has"),
])
def test_thresholds_that_do_not_fit_are_refused_in_one_line(thresholds, message):
    model = _model()
    name = next(n for n, m in model.named_modules() if isinstance(m, SelectiveSSM))
    thresholds = {(name if k == "LAYER" else k): v for k, v in thresholds.items()}
    with pytest.raises(ValueError, match=message):
        set_skip_thresholds(model, thresholds)
