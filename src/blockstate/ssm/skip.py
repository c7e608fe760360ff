"""Skipping uninformative positions in a selective SSM's long-memory heads, at inference, to read
sequences longer than training showed (training-free; the token filtering of LongMamba, Ye et al.
2025, in a simple form).

A selective head whose state decays slowly on the usual input (its memory horizon, 1 / (dt x |A|)
positions at its median step dt, longer than the sequences it was trained on) never reached a
steady state in training: on a longer sequence it keeps accumulating what the usual input writes,
and its outputs drift away from anything the layers after it learned to read. `skip_filler`
measures each head's median step on calibration sequences at the training length (the median, not
the mean: the few positions a head writes with a large step would pull a mean up) and, in every
head whose horizon at that step exceeds the length, makes a position whose dt is below `factor`
times the median a no-op: dt = 0, so the state neither decays nor takes the input there. What the
model chose to write with a large step (a key, a passkey digit) is kept as trained; the rest no
longer piles up.

Each position is decided from its own inputs, so the model stays causal, and the one-token step
applies the same rule, so generation still equals the full forward pass. The thresholds are buffers
that are not saved with the weights (the weights load into any model of the same configuration);
`skip_thresholds` gives them as JSON values, which a checkpoint carries in its train state under
`SKIP_STATE_KEY` and `blockstate.loading.load_model` sets again. `stop_skipping` removes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .selective import SelectiveSSM

SKIP_STATE_KEY = "skip_below"  # a checkpoint's train-state entry: the thresholds of a skipping model


def selective_ssms(model: nn.Module) -> list[tuple[str, SelectiveSSM]]:
    """The selective SSM sublayers of `model`, by module name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SelectiveSSM)]


@torch.no_grad()
def ssm_inputs(model: nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input u (B, L, P) of each selective SSM sublayer of `model` (by module name) when the
    model, in eval mode, reads `tokens` (B, L)."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [ssm.register_forward_pre_hook(
        lambda _, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, ssm in selective_ssms(model)]
    was_training = model.training
    model.eval()
    try:
        model(tokens.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return inputs


@torch.no_grad()
def skip_filler(model: nn.Module, calibration: torch.Tensor, factor: float = 2.0
                ) -> list[dict[str, Any]]:
    """Calibrate and turn on skipping in `model` (see the module's docstring) from `calibration`,
    token ids (B, L) drawn like the training data at the training length L. Returns, per selective
    SSM sublayer, its name, its number of heads and how many of them now skip. A model without a
    selective SSM is left unchanged (an empty list)."""
    if not factor > 0:
        raise ValueError(f"skip factor must be > 0, got {factor}")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 \
            or calibration.dtype != torch.long or calibration.numel() == 0:
        raise ValueError("calibration must be a non-empty (batch, length) tensor of token ids, got "
                         f"{getattr(calibration, 'shape', type(calibration).__name__)}")
    layers = selective_ssms(model)
    if not layers:
        return []
    stop_skipping(model)
    inputs = ssm_inputs(model, calibration)
    length = calibration.shape[1]
    summary = []
    for name, ssm in layers:
        typical, horizon = median_steps(ssm, inputs[name])
        skipping = horizon > length
        ssm.skip_below = torch.where(skipping, factor * typical, torch.zeros_like(typical))
        summary.append({"layer": name, "heads": skipping.numel(),
                        "skipping": int(skipping.sum())})
    return summary


@torch.no_grad()
def median_steps(ssm: SelectiveSSM, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's median step dt over the positions of `u` (B, L, P), the SSM sublayer's input,
    and its memory horizon at that step, 1 / (dt x |A|) positions (the slowest decay where a head
    has several): two (K, G) tensors. Steps are read as `ssm` computes them, skipping included."""
    _, _, dt, _, _ = ssm._inputs(u.float())                                    # (B, L, K, G)
    typical = dt.flatten(0, 1).median(0).values                                # (K, G)
    rate = ssm._decay(dt)
    rate = (rate.real if rate.is_complex() else rate).abs()
    if rate.dim() == 3:  # a decay per state dimension or mode: the slowest one
        rate = rate.amin(-1)                                                   # (K, G)
    return typical, 1 / (typical * rate).clamp_min(torch.finfo(typical.dtype).tiny)


def stop_skipping(model: nn.Module) -> None:
    """Remove what `skip_filler` set: every position computed as trained."""
    for _, ssm in selective_ssms(model):
        ssm.skip_below = None


def skip_thresholds(model: nn.Module) -> dict[str, list]:
    """The thresholds `skip_filler` set in `model`, as JSON values (nested lists of floats, exact
    for float32), by module name; an empty dict when the model does not skip."""
    return {name: ssm.skip_below.tolist() for name, ssm in selective_ssms(model)
            if ssm.skip_below is not None}


def set_skip_thresholds(model: nn.Module, thresholds: dict[str, list], source: str = "") -> None:
    """Set the thresholds of `skip_thresholds` in `model` (the same configuration), replacing any;
    a layer left out does not skip."""
    layers = dict(selective_ssms(model))
    where = f" from {source}" if source else ""
    unknown = sorted(set(thresholds) - set(layers))
    if unknown:
        raise ValueError(f"skip thresholds{where} name selective SSM layers this model lacks: "
                         f"{unknown}")
    values = {}
    for name, value in thresholds.items():
        ssm = layers[name]
        heads = (ssm.kernel.channels, ssm.kernel.heads)
        tensor = torch.tensor(value, dtype=ssm.D.dtype, device=ssm.D.device)
        if tensor.shape != heads:
            raise ValueError(f"skip thresholds{where} for {name} have shape {tuple(tensor.shape)}, "
                             f"the layer has {heads} heads (channels, heads)")
        values[name] = tensor
    stop_skipping(model)
    for name, tensor in values.items():
        layers[name].skip_below = tensor
