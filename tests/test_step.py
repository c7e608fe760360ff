"""The one training step (`blockstate.step`) that `train`, `tasks run` and the size probe share."""

import pytest
import torch
from torch import nn

from blockstate.step import FP16_OVERFLOW, NonFinitePolicy, StepResult, TrainStep


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(inputs))                                   # (B, L, V)


def _batch(rows: int = 4, length: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (rows, length + 1), generator=g)
    targets = tokens[:, 1:].clone()
    targets[0, :2] = -100  # unscored positions do not count
    return tokens[:, :-1], targets


def _step(grad_accum: int = 1, **kw) -> tuple[TinyLM, TrainStep]:
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, TrainStep(model, optimizer, torch.device("cpu"), "fp32", grad_accum=grad_accum, **kw)


def test_accumulation_gives_the_step_of_the_whole_batch():
    whole_model, whole = _step()
    accum_model, accum = _step(grad_accum=2)
    a, b = whole(_batch(), 0.1), accum(_batch(), 0.1)
    assert a.skipped is None and a.tokens == b.tokens == 4 * 6 - 2
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for p, q in zip(whole_model.parameters(), accum_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert p.grad is None  # gradients are dropped after the step


def test_lr_is_scaled_per_group_and_clipping_reports_the_norm_before():
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.SGD([{"params": model.embed.parameters(), "lr_scale": 0.5},
                                 {"params": model.head.parameters()}], lr=1.0)
    step = TrainStep(model, optimizer, torch.device("cpu"), "fp32", grad_clip=1e-3)
    result = step(_batch(), 0.2)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.2]
    assert result.grad_norm > 1e-3  # the norm before clipping


def test_a_non_finite_loss_skips_the_batch_and_leaves_the_parameters():
    model, step = _step()
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    result = step(_batch(), 0.1)
    assert result.skipped == "non-finite loss"
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q) or (p.isnan() == q.isnan()).all()
        assert p.grad is None


def test_non_finite_policy():
    ok, bad = StepResult(1.0, 1, 1.0), StepResult(float("nan"), 1, 1.0, "non-finite loss")
    overflow = StepResult(1.0, 1, float("inf"), FP16_OVERFLOW)
    skip = NonFinitePolicy("skip", max_skipped=3)
    assert [skip.observe(r) for r in (bad, bad, ok, bad, overflow, bad, bad)] == [
        False, False, False, False, False, False, True]
    assert NonFinitePolicy("stop").observe(bad) and not NonFinitePolicy("stop").observe(overflow)
