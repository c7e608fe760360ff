"""Budget-aware training defaults: `size="auto"` (the default) sizes the model for its budget.

Given a time budget (or a token budget) and no explicit size, `plan_for_budget` picks the model's
width, depth, block and training length, the batch and the learning rate from a ladder of shapes:
the largest shape that still sees `TOKENS_PER_PARAMETER` training tokens per parameter in the
budget. For a time budget, each rung's throughput is measured on this machine (a few optimizer
steps on random tokens, at most `PROBE_SHARE` of the budget, deducted from it), so the choice
follows the hardware; for a token budget, the parameter count alone decides. Any field the user
gave explicitly is kept (the plan fills in the others), and with a step budget or none, "auto" is
the `small` size. `docs/benchmarks/README.md` ("Sizing the main job") has the measurements behind the rule.

The tokenizer is part of the plan: with a budget and tokenizer "auto", `plan_tokenizer` picks a
small SentencePiece BPE vocabulary (`AUTO_VOCAB`) trained on the corpus, since each step then sees
about 2.3x more text than with bytes (measured on the Python source corpus). With a time budget,
the time spent preparing the data (training that tokenizer, tokenizing) and probing is deducted
from the budget, so the run still ends within it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Training fields the plan may choose (each only when the user did not give it).
PLANNED_FIELDS = ("size", "model_overrides", "seq_len", "batch_size", "lr", "warmup_steps", "beta2",
                  "tokenizer", "vocab_size")
# The tokenizer a budgeted run gets when none is given: BPE with this vocabulary. At 5 minutes
# and 2 threads, width 96, batch 12 x 128 (docs/benchmarks/README.md): 1.747 validation bits per
# byte against 1.948 with the byte tokenizer (each token covers 2.3 bytes of Python source).
AUTO_TOKENIZER, AUTO_VOCAB = "bpe", 1024

# Training tokens per parameter the plan asks of a budget. At 5 minutes on a 2-core CPU, 2 threads
# (docs/benchmarks/README.md, "Sizing the main job"), batch 12 x 128: the best width (96) saw 8.5
# tokens per parameter with the BPE tokenizer and 12.6 with bytes; width 128 (3.6 and 4.7) and
# width 64 (24 and 38) were worse. 8 lies between; width 96 is a close call at 2 threads (its
# probe may measure just under 8, and width 64 is then chosen, 0.02 bits per byte behind in the
# sweep). Compute-optimal rules fitted at far larger scales say about 20.
TOKENS_PER_PARAMETER = 8.0
# Share of a time budget that measuring throughput may use (it is deducted from the budget).
PROBE_SHARE = 0.05
# Share of the remaining time expected to go to optimizer steps (validation and checkpoint
# pauses take the rest).
STEP_SHARE = 0.9


@dataclass(frozen=True)
class Shape:
    """One rung of the ladder: model width/depth/heads, block W, training length L, sequences
    per step, peak learning rate and, for BST presets, the BST layers (None: the default
    placement, scaled to the depth)."""

    d_model: int
    n_layers: int
    n_heads: int
    block_size: int
    seq_len: int
    batch_size: int
    lr: float
    bst_layers: tuple[int, ...] | None = None

    def overrides(self, preset: str = "bst-sh-s4") -> dict[str, Any]:
        from .registry import PRESETS

        out: dict[str, Any] = {"d_model": self.d_model, "n_layers": self.n_layers,
                               "n_heads": self.n_heads, "block_size": self.block_size,
                               "max_seq_len": self.seq_len}
        fields = PRESETS[preset].overrides
        own_placement = any(k == "bst_layers" or k.startswith("arch.") for k in fields)
        if self.bst_layers is not None and not own_placement:  # baselines place their own layers
            out["bst_layers"] = self.bst_layers
        return out


# Small to large. Measured at 5 minutes on a 2-core CPU (docs/benchmarks/README.md): 12 x 128
# tokens per step at the small end (at 2 threads better than 6 x 128 by 0.02 bits per byte and
# than 24 x 128 by 0.07; at one thread equal to 6 x 128), one BST layer (the first) in a 4-layer
# model, W = 32 with L = 4W, and a peak learning rate of 2-3e-3. The larger rungs follow the
# usual scaling (wider, deeper, longer, larger batches, lower rates) and end at the `small`
# size; they were not tuned.
SHAPES = (
    Shape(48, 4, 4, 32, 128, 12, 3e-3, (0,)),
    Shape(64, 4, 4, 32, 128, 12, 3e-3, (0,)),
    Shape(96, 4, 4, 32, 128, 12, 3e-3, (0,)),
    Shape(128, 4, 4, 32, 128, 12, 2e-3, (0,)),
    Shape(192, 4, 4, 64, 256, 4, 2e-3, (0,)),
    Shape(256, 6, 4, 64, 512, 4, 1.5e-3),
    Shape(384, 6, 6, 128, 1024, 4, 1e-3),
    Shape(512, 8, 8, 128, 1024, 8, 6e-4),
    Shape(768, 12, 12, 256, 2048, 8, 4e-4),
)


def explicit_fields(config: Any, requested: set[str] | None) -> set[str]:
    """The fields the user gave: `requested` when known (the command line), else those whose
    value differs from the dataclass default (the Python API)."""
    if requested is not None:
        return set(requested)
    given = set()
    for f in dataclasses.fields(config):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if getattr(config, f.name) != default:
            given.add(f.name)
    return given


def plan_tokenizer(config: Any, explicit: set[str]) -> tuple[Any, str | None]:
    """Resolve `tokenizer="auto"`: for size "auto" with a time or token budget, the
    `AUTO_TOKENIZER` (with `AUTO_VOCAB` pieces unless a vocabulary size was given) and a line
    saying so; otherwise the byte tokenizer and None. Any other tokenizer is kept as given."""
    if config.tokenizer != "auto":
        return config, None
    if config.size != "auto" or (config.max_time is None and config.max_tokens is None):
        return dataclasses.replace(config, tokenizer="byte"), None
    vocab = config.vocab_size if "vocab_size" in explicit else AUTO_VOCAB
    planned = dataclasses.replace(config, tokenizer=AUTO_TOKENIZER, vocab_size=vocab)
    return planned, (f"size auto: a {AUTO_TOKENIZER} tokenizer of {vocab} pieces trained on the "
                     f"corpus (each step sees more text than with bytes; give --tokenizer byte "
                     f"to keep bytes)")


def _shape_config(config: Any, shape: Shape, explicit: set[str]) -> Any:
    """`config` with `shape` filled into every field the user did not give."""
    changes: dict[str, Any] = {"size": "small"}
    overrides = shape.overrides(config.model)
    if "seq_len" in explicit and config.seq_len is not None:
        overrides["max_seq_len"] = config.seq_len
        overrides["block_size"] = min(shape.block_size, config.seq_len)
    else:
        changes["seq_len"] = shape.seq_len
    changes["model_overrides"] = {**overrides, **config.model_overrides}
    for name in ("batch_size", "lr"):
        if name not in explicit:
            changes[name] = getattr(shape, name)
    if "beta2" not in explicit:
        changes["beta2"] = 0.99  # small batches: a shorter second-moment memory
    return dataclasses.replace(config, **changes)


def measure_tokens_per_second(config: Any, vocab_size: int, device: torch.device,
                              steps: int = 2) -> tuple[float, int]:
    """Training tokens per second of `config`'s model (one warm-up step, then `steps` timed
    training steps on random tokens: the run's own step, optimizer and precision) and its
    parameter count."""
    from .optim import build_optimizer
    from .registry import build_model
    from .step import TrainStep, grad_scaler

    model = build_model(config.model, config.size, **{**config.model_overrides,
                                                      "vocab_size": vocab_size}).to(device)
    optimizer = build_optimizer(model, config, device)  # the run's own optimizer, timed with it
    train_step = TrainStep(model, optimizer, device, config.precision, config.grad_clip,
                           config.grad_accum, grad_scaler(config.precision, device))
    tokens = torch.randint(0, vocab_size, (config.batch_size, config.seq_len + 1))
    batch = (tokens[:, :-1], tokens[:, 1:])                                    # (B, L) each

    def step() -> None:
        train_step(batch, config.lr)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return config.batch_size * config.seq_len / seconds, model.num_parameters()


def plan_for_budget(config: Any, explicit: set[str], vocab_size: int, device: torch.device,
                    log: Callable[[str], None] = print,
                    measure: Callable[..., tuple[float, int]] = measure_tokens_per_second,
                    prepared: float = 0.0) -> tuple[Any, dict[str, Any] | None]:
    """Resolve `size="auto"`: the config to train and a record of the choice (None when nothing
    was planned). See the module docstring for the rule. `prepared`: seconds the run already
    spent preparing its data, deducted from a time budget with the probe's own."""
    if config.size != "auto":
        return config, None
    if config.max_time is None and config.max_tokens is None:
        log("size auto: no time or token budget to size the model for; using size small")
        return dataclasses.replace(config, size="small"), {"rule": "no budget", "size": "small"}
    from .registry import count_parameters

    rows, chosen = [], None
    if config.max_time is None:  # a token budget: parameters alone decide
        for shape in SHAPES:
            candidate = _shape_config(config, shape, explicit)
            params = count_parameters(candidate.model, "small",
                                      **{**candidate.model_overrides, "vocab_size": vocab_size})
            rows.append({"shape": dataclasses.asdict(shape), "parameters": params,
                         "tokens": config.max_tokens})
            if chosen is None or config.max_tokens >= TOKENS_PER_PARAMETER * params:
                chosen, pick = candidate, rows[-1]
            if config.max_tokens < TOKENS_PER_PARAMETER * params:
                break
        probe = 0.0
    else:
        start = time.perf_counter()
        for shape in SHAPES:
            candidate = _shape_config(config, shape, explicit)
            tokens_per_s, params = measure(candidate, vocab_size, device)
            probe = time.perf_counter() - start
            tokens = tokens_per_s * STEP_SHARE * max(0.0, config.max_time - prepared - probe)
            rows.append({"shape": dataclasses.asdict(shape), "parameters": params,
                         "tokens_per_s": tokens_per_s, "tokens": tokens})
            fits = tokens >= TOKENS_PER_PARAMETER * params
            if chosen is None or fits:
                chosen, pick = candidate, rows[-1]
            if not fits or probe > PROBE_SHARE * config.max_time:
                break
        probe = time.perf_counter() - start
        chosen = dataclasses.replace(chosen, max_time=max(1.0, config.max_time - prepared - probe))
    steps = pick["tokens"] / (chosen.batch_size * chosen.seq_len)
    if "warmup_steps" not in explicit:  # about 5% of the expected steps
        chosen = dataclasses.replace(chosen, warmup_steps=int(min(200, max(10, steps // 20))))
    record = {"rule": f"largest shape with >= {TOKENS_PER_PARAMETER:g} training tokens per "
                      f"parameter in the budget", "tokens_per_parameter": TOKENS_PER_PARAMETER,
              "probe_seconds": round(probe, 2), "prepare_seconds": round(prepared, 2),
              "candidates": rows,
              "chosen": {name: getattr(chosen, name) for name in PLANNED_FIELDS}}
    what = "measured" if config.max_time is not None else "counted"
    log(f"size auto: {', '.join(_describe(r) for r in rows)} ({what} in {probe:.1f} s); chose "
        f"width {chosen.model_overrides['d_model']}, {chosen.model_overrides['n_layers']} layers, "
        f"W={chosen.model_overrides['block_size']}, L={chosen.seq_len}, batch {chosen.batch_size}, "
        f"lr {chosen.lr:g}: the largest expected to see >= {TOKENS_PER_PARAMETER:g} tokens per "
        f"parameter (about {pick['tokens'] / pick['parameters']:.1f} here). Give --size or any of "
        f"these flags to choose yourself")
    return chosen, record


def _describe(row: dict[str, Any]) -> str:
    text = f"width {row['shape']['d_model']}: {row['parameters'] / 1e6:.2f}M parameters"
    if "tokens_per_s" in row:
        text += f" at {row['tokens_per_s']:,.0f} tokens/s"
    return text
