"""Components register themselves: a kernel, a context variant and an arch defined here, in the
test file, with one registration each and no edit to the library, train, generate, checkpoint
and load like the built-in ones (docs/architecture.md's recipes)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import blockstate
from blockstate import ModelConfig, build_model
from blockstate.cli import main
from blockstate.components import ConfigError, kinds, register, unregister
from blockstate.layers import BlockAttentionLayer, SHContext
from blockstate.layers.block import LayersAt
from blockstate.layers.bst import SHOptions
from blockstate.ssm import KernelOptions
from blockstate.tasks import TASKS, TaskBatch, register_task
from blockstate.tasks.generators import IGNORE
from blockstate.train import TrainConfig, train

from reference import word_corpus


# ---------------------------------------------------------------------- a kernel
class DecayKernel(nn.Module):
    """K[c, h, l] = gain[c, h] exp(-rate[c, h] l / L): one learned exponential per channel."""

    initializes_itself = True   # the model's generic initialization leaves it alone
    max_length = None           # defined at any length

    def __init__(self, channels: int, width: int, rate: float):
        super().__init__()
        self.channels, self.width = channels, width
        self.log_rate = nn.Parameter(torch.full((channels, width), math.log(rate)))
        self.gain = nn.Parameter(torch.randn(channels, width) / math.sqrt(width))

    def forward(self, length: int) -> torch.Tensor:
        t = torch.arange(length, dtype=self.gain.dtype, device=self.gain.device)
        return self.gain[..., None] * torch.exp(-self.log_rate.exp()[..., None] * t)  # (C, H, L)


@register("ssm", "test-decay")
@dataclass
class DecayOptions(KernelOptions):
    rate: float = 0.1

    def check(self) -> None:
        super().check()
        if self.rate <= 0:
            raise ConfigError(f"ssm.rate={self.rate} must be > 0")

    def build_kernel(self, model, channels: int, width: int) -> nn.Module:
        return DecayKernel(channels, width, self.rate)


# ---------------------------------------------------------------------- a context variant
class GatedSHContext(SHContext):
    """SH context states scaled by a learned gate."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.gate = nn.Parameter(torch.ones(()))

    def _context_outputs(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return super()._context_outputs(y, dtype) * self.gate.to(dtype)


@register("context", "test-gated")
@dataclass
class GatedOptions(SHOptions):
    module: ClassVar[type] = GatedSHContext


# ---------------------------------------------------------------------- an arch (a baseline)
class TwoMLPLayer(BlockAttentionLayer):
    """A block-attention layer with its MLP applied twice."""

    def tail(self, x: torch.Tensor, *attended: torch.Tensor) -> torch.Tensor:
        x = super().tail(x, *attended)
        return x + self.mlp(self.mlp_norm(x))

    def step_tail(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x = super().step_tail(x, a)
        return x + self.mlp(self.mlp_norm(x))


@register("arch", "test-two-mlp")
@dataclass
class TwoMLPArch(LayersAt):
    layer: ClassVar[type] = TwoMLPLayer


# ---------------------------------------------------------------------- a task
@register_task
@dataclass(frozen=True)
class Echo:
    """Repeat the symbol `lag` positions back."""

    name: ClassVar[str] = "test-echo"
    seq_len: int = 32
    lag: int = 4
    symbols: int = 8

    @property
    def vocab_size(self) -> int:
        return self.symbols

    def sample(self, batch_size: int, seed: int) -> TaskBatch:
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.randint(0, self.symbols, (batch_size, self.seq_len), generator=generator)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, self.lag:] = inputs[:, :-self.lag]
        distance = torch.full_like(inputs, -1)
        distance[:, self.lag:] = self.lag
        return TaskBatch(inputs, targets, distance)

    def solve(self, inputs: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(inputs, IGNORE)
        out[:, self.lag:] = inputs[:, :-self.lag]
        return out

    def chance(self) -> float:
        return 1 / self.symbols


KINDS = (("ssm", "test-decay"), ("context", "test-gated"), ("arch", "test-two-mlp"))


@pytest.fixture(scope="module", autouse=True)
def _registered():
    yield
    for group, kind in KINDS:
        unregister(group, kind)
    TASKS.pop(Echo.name, None)


def _greedy_matches_forward(model: nn.Module, prompt: list[int], steps: int) -> None:
    out = model.generate([prompt], steps, temperature=0)[0]
    with torch.no_grad():
        for t in range(len(prompt), len(out)):
            expected = model(torch.tensor([out[:t]]))[0, -1].argmax().item()
            assert out[t] == expected, t


def test_registered_kinds_are_listed_and_configured():
    assert "test-decay" in kinds("ssm") and "test-gated" in kinds("context")
    config = ModelConfig(ssm={"kind": "test-decay", "rate": 0.5})
    assert config.ssm.rate == 0.5 and config.to_dict()["ssm"]["kind"] == "test-decay"
    assert ModelConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="ssm.rate=-1"):
        ModelConfig(ssm={"kind": "test-decay", "rate": -1.0})
    with pytest.raises(ValueError, match="ssm kind 'test-decay' has no field 'state_size'"):
        build_model("bst-sh-s4", "tiny", ssm={"kind": "test-decay", "state_size": 4})


def test_a_kernel_defined_here_trains_checkpoints_loads_and_generates(tmp_path):
    corpus = word_corpus(tmp_path / "corpus")
    config = TrainConfig(model="bst-sh-s4", size="tiny", data=str(corpus), seq_len=64, batch_size=4,
                         warmup_steps=1, max_steps=4, eval_every=1000, eval_batches=1,
                         save_every=2, log_every=1, sample_tokens=0, cache_dir=str(tmp_path / "cache"),
                         model_overrides={"ssm": {"kind": "test-decay", "rate": 0.3},
                                          "block_size": 16})
    run = tmp_path / "run"
    train(config, run, quiet=True)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) >= 4 and all(math.isfinite(x) for x in losses)
    manifest = json.loads(next((run / "checkpoints").glob("step-*/checkpoint.json")).read_text())
    assert manifest["model_config"]["ssm"] == {"kind": "test-decay", "width_divisor": None,
                                               "chunk_size": 64, "method": "auto", "rate": 0.3}
    model, tokenizer = blockstate.load(run)
    kernel = model.layers[0].context.ssm.kernel
    assert isinstance(kernel, DecayKernel) and model.config.ssm.rate == 0.3
    assert not torch.allclose(kernel.log_rate, torch.full_like(kernel.log_rate, math.log(0.3)))
    _greedy_matches_forward(model, tokenizer.encode("document 3\n"), 20)


def test_a_context_variant_defined_here_is_causal_and_generates():
    torch.manual_seed(0)
    model = build_model("bst-sh-s4", "tiny", context="test-gated").double().eval()
    assert isinstance(model.layers[0].context, GatedSHContext)
    tokens = torch.randint(0, 256, (1, 40))
    changed = tokens.clone()
    changed[0, 25] = (changed[0, 25] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert (a[0, :25] - b[0, :25]).abs().max() < 1e-12 < (a[0, 25:] - b[0, 25:]).abs().max()
    _greedy_matches_forward(model, tokens[0, :10].tolist(), 24)


def test_an_arch_defined_here_builds_its_layers_and_generates():
    torch.manual_seed(0)
    model = build_model("bst-sh-s4", "tiny", arch="test-two-mlp", bst_layers=[1]).eval()
    assert [type(layer) for layer in model.layers] == [BlockAttentionLayer, TwoMLPLayer]
    _greedy_matches_forward(model, [1, 2, 3, 4, 5], 20)


def test_a_task_defined_here_runs_in_the_suite_with_a_kernel_defined_here(tmp_path):
    task = Echo()
    batch = task.sample(4, seed=0)
    scored = batch.targets != IGNORE
    assert torch.equal(task.solve(batch.inputs)[scored], batch.targets[scored])
    out = tmp_path / "suite"
    assert main(["tasks", "run", "--task", "test-echo", "--param", "lag=4,20", "--models", "bst-sh-s4",
                 "--seeds", "0", "--steps", "2", "--batch-size", "2", "--eval-sequences", "4",
                 "--set", "ssm.kind=test-decay", "--device", "cpu", "--out", str(out)]) == 0
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]
    assert [r["params"]["lag"] for r in records] == [20, 4]
    assert all(r["model_config"]["ssm"]["kind"] == "test-decay" for r in records)
    assert "test-echo" in (out / "report.md").read_text()
