"""Training loop: `blockstate train`.

Read top to bottom: resolve the config, prepare data and tokenizer, build the model and optimizer,
restore a checkpoint when resuming, then step until a step, token or wall-clock budget is spent,
validating, logging and checkpointing along the way. Data parallel through `torchrun` (DDP).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .budget import PLANNED_FIELDS, explicit_fields, plan_for_budget
from .checkpoint import load_checkpoint, load_latest_intact, remove_temporary, save_checkpoint
from .config import check_field_types
from .data import (
    BatchStream,
    PackedSequences,
    SegmentStream,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    resolve_corpus,
    tokenize_split,
)
from .fileio import atomic_write
from .memory import Memory, SegmentCarry
from .registry import SIZES, build_model, list_models, model_config
from .rundir import (
    METRIC_SINKS,
    MetricsLog,
    RunLock,
    check_clearable,
    check_metric_sinks,
    clear_run,
    is_run_dir,
)

SCHEDULES = ("cosine", "inverse_sqrt", "constant")
TOKENIZERS = ("byte", "bpe", "unigram")
# A run stops after this many consecutive batches with a non-finite loss or gradient norm.
MAX_SKIPPED_BATCHES = 10
NONFINITE_POLICIES = ("skip", "stop")
PRECISIONS = ("auto", "fp32", "bf16")


def parse_duration(text: str | float | int | None) -> float | None:
    """'90s', '5m', '1.5h' or a number of seconds -> seconds."""
    if text is None or isinstance(text, int | float):
        return None if text is None else float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
    if not match:
        raise ValueError(f"max_time={text!r} is not a duration; use e.g. 90s, 5m or 1.5h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


@dataclass
class TrainConfig:
    """Everything that defines a training run. Model architecture comes from the preset `model` at
    `size` with `model_overrides` applied; `vocab_size` of the model follows the tokenizer."""

    model: str = "bst-sh-s4"
    # "auto": sized for the time or token budget (blockstate.budget); tiny/small/base/large as set
    size: str = "auto"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: str = "python-stdlib"
    tokenizer: str = "byte"             # byte | bpe | unigram (SentencePiece, trained on train split)
    vocab_size: int = 4096              # SentencePiece vocabulary (byte: fixed 259)
    seq_len: int | None = None          # training length L; default: the model's max_seq_len
    pack_documents: bool = False        # allow a training sequence to span two documents
    batch_size: int = 8                 # sequences per optimizer step, over all processes
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1           # final learning rate of the cosine schedule, relative
    warmup_steps: int = 50
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None       # seconds
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    compile: bool = False
    # Mixed precision of the forward pass: "auto" is bfloat16 autocast on CUDA and float32 elsewhere.
    precision: str = "auto"
    activation_checkpointing: bool = False
    # Where metrics go besides metrics.jsonl: comma-separated auto | none | tensorboard | wandb
    log_to: str = "auto"
    # Peak FLOP/s (in TFLOP/s) of one device for the MFU of the progress line and metrics; None
    # uses the data-sheet peak of known GPUs (PEAK_TFLOPS) and shows no MFU elsewhere.
    peak_tflops: float | None = None
    cache_dir: str | None = None        # tokenized corpora; default ~/.cache/blockstate
    sample_tokens: int = 200            # length of the sample printed at the end (0: none)
    # On a non-finite loss or gradient norm: "skip" the batch (stop after MAX_SKIPPED_BATCHES in a
    # row) or "stop" at once; either way the saved parameters stay finite.
    nonfinite: str = "skip"
    # Segment-recurrent models (transformer-xl, brt) carry memory from one training sequence to the
    # next of the same document, reading lanes of consecutive windows; false trains (and evaluates)
    # them on shuffled windows without memory, like every other model.
    carry_memory: bool = True

    def __post_init__(self) -> None:
        self.max_time = parse_duration(self.max_time)
        self.validate()

    def validate(self) -> None:
        check_field_types(self)
        if self.model not in list_models():
            raise ValueError(f"model={self.model!r} is unknown; available: {', '.join(list_models())}")
        if self.size not in ("auto", *SIZES):
            raise ValueError(f"size={self.size!r} is unknown; available: auto, {', '.join(SIZES)}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={self.tokenizer!r} is not valid; allowed: {', '.join(TOKENIZERS)}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={self.nonfinite!r} is not valid; allowed: "
                             f"{', '.join(NONFINITE_POLICIES)}")
        sinks = [x for x in self.log_to.split(",") if x]
        if not sinks or set(sinks) - set(METRIC_SINKS):
            raise ValueError(f"log_to={self.log_to!r} is not valid; give a comma-separated list of "
                             f"{', '.join(METRIC_SINKS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not valid; allowed: "
                             f"{', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not valid; allowed: {', '.join(SCHEDULES)}")
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batches", "save_every",
                     "log_every", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops={self.peak_tflops!r} must be > 0")
        for name in ("max_steps", "max_tokens", "seq_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.max_time is not None and self.max_time <= 0:
            raise ValueError(f"max_time={self.max_time} must be positive")
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be > 0 (a negative clip ascends the "
                             f"gradient, 0 freezes training)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.sample_tokens < 0:
            raise ValueError(f"sample_tokens={self.sample_tokens} must be >= 0")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2 (a training sequence needs an "
                             f"input and a next token)")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device={self.device!r} is not valid; use auto, cpu, cuda, cuda:N or mps")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by "
                             f"grad_accum={self.grad_accum}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0 (got {self.lr}), 0 <= min_lr_ratio <= 1 (got "
                             f"{self.min_lr_ratio}) and warmup_steps >= 0 (got {self.warmup_steps})")
        # validates the overrides ("auto" plans on top of the small size's fields)
        mconfig = model_config(self.model, "small" if self.size == "auto" else self.size,
                               **self.model_overrides)
        seq_len = self.seq_len or mconfig.max_seq_len
        if mconfig.block_size > seq_len:
            raise ValueError(f"block_size={mconfig.block_size} is longer than the training length "
                             f"seq_len={seq_len}; choose block_size <= seq_len")
        if mconfig.carries_memory and seq_len % mconfig.block_size:
            raise ValueError(f"{mconfig.arch} carries memory between sequences: seq_len={seq_len} "
                             f"must be a multiple of block_size={mconfig.block_size}")

    def has_budget(self) -> bool:
        return any(v is not None for v in (self.max_steps, self.max_tokens, self.max_time))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {', '.join(sorted(names))}")
        return cls(**data)


# Help text of every TrainConfig field: the command-line flags of `blockstate train` are built
# from the dataclass and these texts (see `cli.add_train_flags`), so every field is settable.
FIELD_HELP: dict[str, str] = {
    "model": "model preset (see `blockstate models`)",
    "size": "model size; auto sizes width, depth, lengths, batch and lr for a --max-time or "
            "--max-tokens budget from throughput measured on this machine (small without one)",
    "model_overrides": "model config overrides (the command line's --set FIELD=VALUE)",
    "data": "corpus name (see `blockstate corpora`), hf:NAME, directory, .jsonl or text file",
    "tokenizer": "byte, or a SentencePiece bpe/unigram tokenizer trained on the train split",
    "vocab_size": "SentencePiece vocabulary size (the byte tokenizer has 259)",
    "seq_len": "training length L (default: the model's max_seq_len)",
    "pack_documents": "let a training sequence span the end of one document and the next",
    "batch_size": "sequences per optimizer step, over all processes",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate of the cosine schedule, relative to --lr",
    "warmup_steps": "steps of linear warmup",
    "schedule": "learning-rate schedule after warmup",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this value (> 0)",
    "max_steps": "budget: optimizer steps",
    "max_tokens": "budget: training tokens",
    "max_time": "budget: wall-clock time, e.g. 90s, 5m, 1.5h",
    "eval_every": "validate every N steps",
    "eval_batches": "validation batches per evaluation",
    "save_every": "checkpoint every N steps",
    "log_every": "write a metrics line every N steps",
    "seed": "random seed (model initialization, data order, dropout)",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "compile": "torch.compile the model",
    "precision": "autocast of the forward pass: auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16",
    "peak_tflops": "peak TFLOP/s of one device, for the MFU shown in the progress line "
                   "(default: known GPUs' data-sheet peak; none on CPU)",
    "log_to": "metrics besides metrics.jsonl, comma-separated: auto (TensorBoard when installed), "
              "none, tensorboard, wandb (WANDB_* environment variables apply)",
    "activation_checkpointing": "recompute each layer's activations in the backward pass "
                                "(less memory, about a third more compute)",
    "cache_dir": "directory of tokenized corpora (default ~/.cache/blockstate)",
    "sample_tokens": "length of the sample printed at the end (0: none)",
    "nonfinite": "on a non-finite loss or gradient: skip the batch or stop the run",
    "carry_memory": "transformer-xl/brt: carry memory across consecutive windows of a document "
                    "(else shuffled windows without memory)",
}
FIELD_CHOICES: dict[str, Callable[[], list[str]]] = {
    "model": list_models, "size": lambda: ["auto", *SIZES], "tokenizer": lambda: list(TOKENIZERS),
    "schedule": lambda: list(SCHEDULES), "nonfinite": lambda: list(NONFINITE_POLICIES),
    "precision": lambda: list(PRECISIONS),
}
BUDGET_FIELDS = ("max_steps", "max_tokens", "max_time")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (or, with PyYAML installed, YAML) file of TrainConfig fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML configs need PyYAML: pip install 'blockstate[yaml]'") from None
        data = yaml.safe_load(text)
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a table of training options")
    return data


def learning_rate(step: int, config: TrainConfig, horizon: int | None,
                  progress: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule. The
    cosine runs over the steps after warmup up to `horizon`, or, for a run budgeted by time only
    (horizon None), over `progress`: the fraction of the time after warmup already spent."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "inverse_sqrt":
        return config.lr * math.sqrt(max(1, config.warmup_steps) / (step + 1))
    if horizon is not None:
        progress = (step - config.warmup_steps) / max(1, horizon - config.warmup_steps)
    progress = min(1.0, max(0.0, progress or 0.0))
    floor = config.min_lr_ratio * config.lr
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norms, biases, embeddings' scale-free parameters
    of the SSM (marked `_no_weight_decay`) or other vectors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available; use --device cpu")
    return device


# Dense data-sheet peaks, TFLOP/s per device: (bf16 tensor cores, fp32).
PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5)}


def device_peak_flops(device: torch.device, precision: str, given_tflops: float | None) -> float | None:
    """Peak FLOP/s of one `device` at `precision`: `given_tflops` when set, else the data-sheet
    peak of a known GPU, else None (no MFU is shown)."""
    if given_tflops is not None:
        return given_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAK_TFLOPS.items():
        if key in name:
            return (bf16 if autocast_dtype(precision, device) is not None else fp32) * 1e12
    return None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None: float32, no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid; allowed: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16}[precision]


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    """The run's AdamW: `parameter_groups`, the config's lr and betas, and the fused kernel where
    PyTorch has one (CPU and CUDA): one pass over the parameters instead of a dozen small ops per
    tensor (3 ms instead of 9 ms per step at 0.9M parameters on this project's 2-core CPU)."""
    return torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                             betas=(config.beta1, config.beta2),
                             fused=device.type in ("cpu", "cuda"))


def token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
               precision: str = "auto", **forward: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (nats) over non-ignored targets, and the per-token losses.
    `forward`: passed to the model (a segment-recurrent model's `carry` and `keep`)."""
    dtype = autocast_dtype(precision, device)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(inputs, **forward)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                             reduction="none").view_as(targets)
    return losses.sum(), losses


def carries_memory(model: nn.Module) -> bool:
    return model.config.carries_memory


@torch.no_grad()
def iter_losses(model: nn.Module, dataset: PackedSequences, batch_size: int, max_batches: int | None,
                device: torch.device, indices: np.ndarray | None = None, carry: bool = True,
                precision: str = "auto"):
    """Yield (targets, per-token losses) for batches of `dataset`'s windows: `indices` in order
    (default all). A model that carries memory instead reads lanes of consecutive windows of whole
    documents, in corpus order, with its memory carried from batch to batch (unless `carry` is
    false: then it reads windows like every other model)."""
    if carries_memory(model) and carry:
        stream = SegmentStream(dataset, batch_size, seed=0, shuffle=False)
        steps = stream.batches_per_epoch
        if max_batches is not None:
            steps = min(max_batches, steps)
        carry = SegmentCarry()
        for _ in range(steps):
            inputs, targets, keep = stream.next_batch()
            used = _scored_columns(targets, model.config.block_size)
            _, losses = token_loss(model, inputs[:, :used].to(device), targets[:, :used].to(device),
                                   device, precision=precision, carry=carry, keep=keep.to(device))
            yield targets, F.pad(losses.cpu(), (0, targets.shape[1] - used))
        return
    indices = np.arange(len(dataset)) if indices is None else indices
    for b, start in enumerate(range(0, len(indices), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        inputs, targets = dataset.batch(indices[start:start + batch_size].tolist())
        used = _scored_columns(targets, model.config.block_size)
        _, losses = token_loss(model, inputs[:, :used].to(device), targets[:, :used].to(device),
                               device, precision=precision)
        yield targets, F.pad(losses.cpu(), (0, targets.shape[1] - used))


def _scored_columns(targets: torch.Tensor, block_size: int) -> int:
    """Columns of a batch up to its last scored target, rounded up to whole blocks (at most all):
    the padding after it cannot change earlier outputs (causality), so it is not computed, and
    evaluation memory follows the tokens scored, not the window length."""
    scored = (targets != -100).any(0).nonzero()
    used = int(scored.max()) + 1 if len(scored) else 1
    return min(targets.shape[1], -(-used // block_size) * block_size)


@torch.no_grad()
def evaluate_batches(model: nn.Module, dataset: PackedSequences, tokenizer: Tokenizer,
                     batch_size: int, max_batches: int | None, device: torch.device,
                     carry: bool = True, precision: str = "auto") -> dict[str, float]:
    """Loss, perplexity and bits per byte over the first windows of `dataset`, in order."""
    was_training = model.training
    model.eval()
    byte_lengths = torch.as_tensor(tokenizer.token_byte_lengths(), dtype=torch.float64)
    nll, count, n_bytes = 0.0, 0, 0.0
    for targets, losses in iter_losses(model, dataset, batch_size, max_batches, device, carry=carry,
                                       precision=precision):
        valid = targets != -100
        nll += float(losses[valid].double().sum())
        count += int(valid.sum())
        n_bytes += float(byte_lengths[targets[valid]].sum())
    model.train(was_training)
    loss = nll / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count,
            "bits_per_byte": nll / math.log(2) / max(1.0, n_bytes)}


def default_cache_dir() -> Path:
    return Path(os.environ.get("BLOCKSTATE_CACHE", Path.home() / ".cache" / "blockstate"))


def prepare_tokenizer(config: TrainConfig, corpus, out_dir: Path, is_main: bool,
                      resuming: bool = False) -> Tokenizer:
    """The run's tokenizer, saved in out_dir/tokenizer: a resumed run's own; for a new run, the
    one the config asks for (one left by an earlier attempt is reused only if it was trained with
    the same settings on the same corpus)."""
    tok_dir = out_dir / "tokenizer"
    if is_main and not (resuming and (tok_dir / "tokenizer.json").exists()):
        tokenizer = build_tokenizer(config.tokenizer, corpus=corpus, vocab_size=config.vocab_size,
                                    directory=tok_dir)
        tokenizer.save(tok_dir)
    if dist.is_initialized():  # every process reaches this barrier, whatever exists on disk
        dist.barrier()
    return load_tokenizer(tok_dir)


def train(config: TrainConfig, out_dir: str | Path, resume: bool | str | Path = False,
          overwrite: bool = False, on_step: Callable[[int, dict[str, Any]], None] | None = None,
          quiet: bool = False, allow_changed_data: bool = False, requested: set[str] | None = None,
          override: bool = False) -> dict[str, Any]:
    """Train according to `config`, writing checkpoints and metrics under `out_dir`.

    `resume`: True continues the run in `out_dir` from its newest intact checkpoint; a path
    resumes from that checkpoint (a step directory). `overwrite` replaces a run in `out_dir`
    (removing only the run's own files, and only after everything is validated). One
    process writes a run directory at a time (a lock refuses a second). SIGINT/SIGTERM end the
    run at the next step boundary with a checkpoint from which it resumes exactly; the summary's
    "interrupted" then names the signal. On resume, settings of `config` other than the budget
    that differ from the run's (among the fields in `requested`, all when None) are refused
    unless `override`, which applies them. `on_step(step, record)` is called after every optimizer
    step (e.g. for custom logging). Returns a summary with the final validation metrics and
    throughput.
    """

    out_dir = Path(out_dir)
    for flag, path in (("--out", out_dir), ("--cache-dir", config.cache_dir)):
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise ValueError(f"{flag} {path} is a file, not a directory")
    if not config.has_budget():
        raise ValueError("no training budget: give --max-steps, --max-tokens or --max-time")
    check_metric_sinks(tuple(config.log_to.split(",")))
    if Path(config.data).exists():  # store the absolute path, so a resume from elsewhere finds it
        config = dataclasses.replace(config, data=str(Path(config.data).resolve()))
    messages: list[str] = []  # warnings found before the logger exists
    checkpoint = None
    if resume:
        if resume is not True:  # a step directory (or another run) to resume from
            checkpoint = load_checkpoint(resume)
        elif out_dir.exists():
            checkpoint = load_latest_intact(out_dir, messages.append)
        if checkpoint is None and not (out_dir / "train_config.json").exists():
            raise ValueError(f"--resume: {out_dir} holds no checkpoint to resume from")
    if checkpoint is not None:
        saved = TrainConfig.from_dict(checkpoint.train_state["train_config"])
        names = requested if requested is not None else {f.name for f in dataclasses.fields(config)}
        if config.size == "auto":  # "auto" asks for no particular size: the run keeps its own
            names = set(names) - {"size"}
            if checkpoint.train_state.get("plan") is not None:  # nor is what its plan chose a change
                names -= set(PLANNED_FIELDS) - explicit_fields(config, requested)
        changed = sorted(name for name in names - set(BUDGET_FIELDS)
                         if getattr(config, name) != getattr(saved, name))
        if changed and not override:
            was = ", ".join(f"{name}={getattr(saved, name)!r}" for name in changed)
            now = ", ".join(f"{name}={getattr(config, name)!r}" for name in changed)
            raise ValueError(f"--resume: the run was trained with {was}; this request has {now}. "
                             f"Only budgets change on resume unless you pass --override")
        budget = {k: getattr(config, k) for k in BUDGET_FIELDS}
        config = dataclasses.replace(saved, **{k: v for k, v in budget.items() if v is not None},
                                     **{name: getattr(config, name) for name in changed})
        if changed:
            messages.append(f"resuming with changed settings: {', '.join(changed)}")
    elif resume:
        messages.append(f"{out_dir} holds no checkpoint (the run stopped before its first); "
                        f"starting it from step 0")
        overwrite = True
    elif out_dir.exists() and is_run_dir(out_dir) and not overwrite:
        if (out_dir / "checkpoints").is_dir() and any((out_dir / "checkpoints").iterdir()):
            raise ValueError(f"{out_dir} already holds a run; pass --resume to continue it or "
                             f"--overwrite to start over")
        record = _run_record(out_dir) or {}
        previous = record.get("requested_train", record.get("train"))
        if previous is not None and {k: v for k, v in previous.items() if k not in BUDGET_FIELDS} != {
                k: v for k, v in config.to_dict().items() if k not in BUDGET_FIELDS}:
            raise ValueError(f"{out_dir} holds a run that stopped before its first checkpoint, with "
                             f"other settings; pass --overwrite to replace it")
        overwrite = True  # the same run, killed before its first checkpoint: start it again

    # ---- validate everything before anything on disk changes
    corpus = resolve_corpus(config.data)
    local_data = Path(config.data)
    if checkpoint is not None:
        _check_same_data(out_dir, corpus, allow_changed_data)
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    ddp = Distributed.from_env(device)
    if ddp.world_size > 1 and config.device == "auto" and device.type == "cuda":
        device = torch.device(f"cuda:{ddp.local_rank}")
    if config.batch_size % (ddp.world_size * config.grad_accum):
        raise ValueError(f"batch_size={config.batch_size} must be divisible by processes x grad_accum "
                         f"= {ddp.world_size} x {config.grad_accum}")
    if overwrite and checkpoint is None and ddp.is_main:
        check_clearable(out_dir, [local_data] if local_data.exists() else [])

    lock = RunLock(out_dir)
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        return _train(config, out_dir, checkpoint, overwrite, corpus, device, ddp, on_step, quiet,
                      messages, explicit_fields(config, requested))
    finally:
        lock.release()


def _run_record(out_dir: Path) -> dict[str, Any] | None:
    """The run's resolved train_config.json, or None when it is absent or unreadable."""
    try:
        record = json.loads((out_dir / "train_config.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _check_same_data(out_dir: Path, corpus, allow_changed_data: bool) -> None:
    """Refuse to resume on a corpus whose fingerprint differs from the one the run started on."""
    corpus_record = (_run_record(out_dir) or {}).get("corpus")
    recorded = corpus_record.get("fingerprint") if isinstance(corpus_record, dict) else None
    if recorded is None:
        return  # nothing recorded (an older run): nothing to compare
    if recorded != corpus.fingerprint() and not allow_changed_data:
        raise ValueError(f"the corpus {corpus.name!r} changed since {out_dir} started (fingerprint "
                         f"{corpus.fingerprint()} instead of {recorded}); resuming would train on "
                         f"other data. Pass --allow-changed-data to resume anyway")


def _train(config: TrainConfig, out_dir: Path, checkpoint, overwrite: bool, corpus,
           device: torch.device, ddp: Distributed, on_step, quiet: bool,
           messages: list[str], explicit: set[str]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if overwrite and checkpoint is None and ddp.is_main:
        clear_run(out_dir)
    if ddp.is_main:
        remove_temporary(out_dir)
    if dist.is_initialized():
        dist.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        if ddp.is_main and not quiet:
            tqdm.write(message, file=sys.stdout)

    for message in messages:
        log(message)

    # ---- data and tokenizer
    tokenizer = prepare_tokenizer(config, corpus, out_dir, ddp.is_main, checkpoint is not None)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    splits = {}
    for split in ("train", "validation"):
        if ddp.is_main:
            splits[split] = tokenize_split(corpus, tokenizer, split, cache_dir)
        if dist.is_initialized():
            dist.barrier()
        if not ddp.is_main:
            splits[split] = tokenize_split(corpus, tokenizer, split, cache_dir)
        ids = splits[split].tokens
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= tokenizer.vocab_size):
            raise ValueError(f"the {split} split's cached token ids leave [0, "
                             f"{tokenizer.vocab_size}); remove the stale cache in {cache_dir}")

    # ---- model: size "auto" is planned for the budget here (a resumed run keeps its plan)
    requested_config, plan = config, (checkpoint.train_state.get("plan") if checkpoint else None)
    if checkpoint is None and config.size == "auto":
        decision = [None]
        if ddp.is_main:
            decision = [plan_for_budget(config, explicit, tokenizer.vocab_size, device, log)]
        if dist.is_initialized():  # every process trains what the main process measured
            dist.broadcast_object_list(decision, src=0)
        config, plan = decision[0]
    overrides = {**config.model_overrides, "vocab_size": tokenizer.vocab_size}
    mconfig = model_config(config.model, config.size, **overrides)
    seq_len = config.seq_len or mconfig.max_seq_len
    train_data = PackedSequences(splits["train"], seq_len, tokenizer.pad_id, config.pack_documents)
    val_data = PackedSequences(splits["validation"], seq_len, tokenizer.pad_id, config.pack_documents)
    # transformer-xl and brt carry memory from batch to batch (unless told not to)
    xl = mconfig.carries_memory and config.carry_memory
    stream = (SegmentStream if xl else BatchStream)(train_data, config.batch_size, config.seed,
                                                    ddp.rank, ddp.world_size)
    memory = None  # the memory left by the previous batch (saved with checkpoints)

    torch.manual_seed(config.seed)
    model = build_model(config.model, config.size, **overrides).to(device)
    optimizer = build_optimizer(model, config, device)
    step, tokens_seen, horizon, elapsed_before = 0, 0, None, 0.0
    # A run budgeted by time only schedules its cosine on time: from the end of warmup (seconds
    # of training when it ended) to max_time, so it reaches its final learning rate at its end
    # whatever the speed of its steps.
    warmup_end: float | None = None
    if config.max_steps is not None:
        horizon = config.max_steps
    elif config.max_tokens is not None:
        horizon = math.ceil(config.max_tokens / (config.batch_size * seq_len))
    if checkpoint is not None:
        if checkpoint.model_config != mconfig.to_dict():
            raise ValueError(f"checkpoint {checkpoint.path} was trained with another model config")
        checkpoint.load_model(model)
        checkpoint.load_optimizer(optimizer)
        checkpoint.restore_rng()
        state = checkpoint.train_state
        step, tokens_seen = state["step"], state["tokens"]
        horizon = state["horizon"] if horizon is None else horizon
        elapsed_before = state["elapsed"]
        warmup_end = state.get("warmup_end")
        stream.load_state_dict(state["data"])
        if xl:
            memory = checkpoint.memory(device)
            if memory is None and step > 0:
                log("warning: the checkpoint holds no carried memory; the first batch after resuming "
                    "starts without it")
        log(f"resumed from {checkpoint.path} at step {step}")
    model.activation_checkpointing = config.activation_checkpointing
    peak_flops = device_peak_flops(device, config.precision, config.peak_tflops)
    train_model: nn.Module = model
    if config.compile:
        train_model = torch.compile(model)
    if ddp.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    resolved = {"train": config.to_dict(), "model": mconfig.to_dict(), "seq_len": seq_len,
                "tokenizer": tokenizer.kind, "processes": ddp.world_size, "device": str(device),
                "parameters": model.num_parameters(), "corpus": corpus.metadata()}
    if plan is not None:
        resolved.update(plan=plan, requested_train=requested_config.to_dict())
    if ddp.is_main:
        atomic_write(out_dir / "train_config.json", json.dumps(resolved, indent=2))
        shown = {k: v for k, v in resolved.items() if k not in ("corpus", "plan", "requested_train")}
        log("resolved config:\n" + json.dumps(shown, indent=2))
        log(f"{model.num_parameters():,} parameters; {len(train_data):,} training sequences of "
            f"{seq_len} tokens; {len(val_data):,} validation sequences")
    metrics = MetricsLog(out_dir / "metrics.jsonl", step if checkpoint else None, ddp.is_main, log,
                         sinks=tuple(x for x in config.log_to.split(",") if x),
                         run_config=resolved)

    def save() -> None:
        if not ddp.is_main:
            return
        train_state = {"step": step, "tokens": tokens_seen, "horizon": horizon,
                       "warmup_end": warmup_end, "plan": plan,
                       "elapsed": elapsed_before + time.perf_counter() - start,
                       "data": stream.state_dict(), "train_config": config.to_dict()}
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            log(f"warning: step {step}: parameters are not finite; no checkpoint written (the "
                f"previous one is kept)")
            return
        # Carried memory is saved when this process holds all of it (one process).
        carried = memory.tensors() if memory is not None and ddp.world_size == 1 else None
        save_checkpoint(out_dir, step, model, mconfig.to_dict(), train_state, optimizer,
                        tokenizer_dir=out_dir / "tokenizer", memory=carried)

    def validate() -> dict[str, Any]:
        result = evaluate_batches(model, val_data, tokenizer, micro, config.eval_batches, device,
                                  carry=xl, precision=config.precision)
        result["step"] = step
        metrics.write({"split": "validation", **result})
        return result

    # ---- loop
    micro = config.batch_size // (ddp.world_size * config.grad_accum)
    start = time.perf_counter()
    last_val = None
    bar = tqdm(total=horizon, initial=step, disable=quiet or not ddp.is_main, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    model.train()
    skipped = 0  # consecutive batches skipped for a non-finite loss or gradient
    stopper = _StopSignals().install()
    try:
        while stopper.received is None:
            elapsed = elapsed_before + time.perf_counter() - start
            if ((config.max_steps is not None and step >= config.max_steps)
                    or (config.max_tokens is not None and tokens_seen >= config.max_tokens)
                    or (config.max_time is not None and elapsed >= config.max_time)):
                break
            step_start = time.perf_counter()
            progress = None
            if horizon is None and config.max_time is not None and step >= config.warmup_steps:
                if warmup_end is None:
                    warmup_end = elapsed
                progress = (elapsed - warmup_end) / max(1e-9, config.max_time - warmup_end)
            lr = learning_rate(step, config, horizon, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets, *extra = stream.next_batch()                       # this rank's slice
            count = (targets != -100).sum().to(torch.float64)
            if dist.is_initialized():
                dist.all_reduce(count)
            loss_sum = torch.zeros((), dtype=torch.float64)
            memories = []
            for m in range(config.grad_accum):
                rows = slice(m * micro, (m + 1) * micro)
                x, y = inputs[rows].to(device), targets[rows].to(device)
                forward = {}
                if xl:  # this micro-batch's rows of the carried memory
                    carry = SegmentCarry(None if memory is None else memory.rows(rows))
                    forward = {"carry": carry, "keep": extra[0][rows].to(device)}
                last = m == config.grad_accum - 1
                sync = train_model.no_sync() if (ddp.world_size > 1 and not last) else nullcontext()
                with sync:
                    total, _ = token_loss(train_model, x, y, device, precision=config.precision,
                                          **forward)
                    if xl:
                        memories.append(carry.memory)
                    # mean over the global batch's tokens; DDP averages over processes
                    (total * ddp.world_size / count.item()).backward()
                loss_sum += total.detach().double().cpu()
            if xl:
                memory = Memory.cat(memories)
            if dist.is_initialized():
                dist.all_reduce(loss_sum)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            finite_loss = math.isfinite(float(loss_sum))
            if not (finite_loss and math.isfinite(float(grad_norm))):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                what = "loss" if not finite_loss else "gradient norm"
                metrics.write({"step": step, "skipped_batch": True, "reason": f"non-finite {what}"})
                log(f"warning: step {step + 1}: non-finite {what}; batch skipped ({skipped} in a row)")
                if config.nonfinite == "stop" or skipped >= MAX_SKIPPED_BATCHES:
                    save()
                    raise ValueError(
                        f"training stopped at step {step}: non-finite {what} "
                        f"({skipped} batch(es) in a row, nonfinite={config.nonfinite!r}); the run "
                        f"is saved at step {step} with finite parameters. Lower --lr or check the "
                        f"data")
                continue
            skipped = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(count.item())
            loss = (loss_sum / count).item()
            step_time = time.perf_counter() - step_start
            if horizon is None and config.max_time is not None and step % 10 == 0:
                # the bar's total: steps at the speed so far (the schedule runs on time)
                spent = elapsed_before + time.perf_counter() - start
                bar.total = step + int(max(0.0, config.max_time - spent) * step / max(1e-9, spent))
            record = {"step": step, "tokens": tokens_seen, "loss": loss, "lr": lr,
                      "grad_norm": float(grad_norm), "tokens_per_s": int(count.item()) / step_time,
                      "elapsed": elapsed_before + time.perf_counter() - start}
            shown = {}
            if peak_flops is not None:  # 6 FLOPs per parameter and token, over all processes
                record["mfu"] = (6.0 * model.num_parameters() * record["tokens_per_s"]
                                 / (peak_flops * ddp.world_size))
                shown["mfu"] = f"{record['mfu']:.1%}"
            if step % config.log_every == 0 or step == 1:
                metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{math.exp(min(loss, 50)):.1f}",
                            tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{lr:.2e}", **shown,
                            refresh=False)
            if on_step is not None:
                on_step(step, record)
            if step % config.eval_every == 0 and ddp.is_main:
                last_val = validate()
                log(f"step {step}: validation loss {last_val['loss']:.4f} "
                          f"ppl {last_val['perplexity']:.2f} bpb {last_val['bits_per_byte']:.3f}")
            if step % config.save_every == 0:
                save()
    except KeyboardInterrupt:  # a second Ctrl-C during a step: the step is incomplete, so the
        # newest checkpoint (not this state) is what a resume continues from
        log(f"interrupted again during step {step + 1}; not saving the incomplete step "
            f"(resume continues from the newest checkpoint)")
        raise
    finally:
        stopper.restore()
        bar.close()
    elapsed = elapsed_before + time.perf_counter() - start
    train_time = time.perf_counter() - start
    interrupted = stopper.received
    if interrupted is not None:
        log(f"{interrupted} received: saving a checkpoint at step {step} and stopping")
    elif ddp.is_main and (last_val is None or last_val["step"] != step):
        last_val = validate()
    save()
    metrics.close()
    sample = None
    if ddp.is_main and interrupted is None:
        sample = _sample(model, tokenizer, val_data, config, device)
    summary = {"step": step, "tokens": tokens_seen, "elapsed_s": elapsed,
               "unigram_perplexity": unigram_perplexity(
                   splits["train"].tokens, splits["validation"].tokens, tokenizer.vocab_size),
               "sample": sample,
               "tokens_per_s": (tokens_seen - (checkpoint.train_state["tokens"] if checkpoint else 0))
               / max(1e-9, train_time),
               "validation": last_val, "parameters": model.num_parameters(), "out": str(out_dir),
               "shape": {"d_model": mconfig.d_model, "n_layers": mconfig.n_layers,
                         "block_size": mconfig.block_size, "seq_len": seq_len,
                         "batch_size": config.batch_size, "lr": config.lr},
               "interrupted": interrupted}
    if ddp.is_main:
        atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


class _StopSignals:
    """SIGINT and SIGTERM ask the training loop to stop at the next step boundary (`received` names
    the signal); a second one of the same kind acts as usual (KeyboardInterrupt / termination).
    Installed only in the main thread, where Python allows signal handlers."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> _StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _sample(model: nn.Module, tokenizer: Tokenizer, val_data: PackedSequences, config: TrainConfig,
            device: torch.device) -> dict[str, str] | None:
    """Continue the start of the first validation sequence, for a look at what the model learned."""
    if config.sample_tokens <= 0:
        return None
    inputs, _ = val_data[0]
    prompt = [int(t) for t in inputs[:48] if t not in (tokenizer.pad_id, tokenizer.bos_id)]
    out = model.generate([prompt], config.sample_tokens, temperature=0.8, top_k=40, seed=config.seed)[0]
    return {"prompt": tokenizer.decode(prompt), "continuation": tokenizer.decode(out[len(prompt):])}


def unigram_perplexity(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `eval_tokens` of the add-one unigram model fitted to `train_tokens`: the
    baseline a language model must beat."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    eval_counts = np.bincount(np.asarray(eval_tokens), minlength=vocab_size)
    return float(np.exp(-(eval_counts @ log_p) / eval_counts.sum()))
