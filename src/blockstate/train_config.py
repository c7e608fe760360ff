"""The training configuration: `TrainConfig` (every setting of a run, validated), the help text
and choices the command line is built from, durations and config files."""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelConfig, check_field_types
from .registry import SIZES, list_models, model_config
from .rundir import METRIC_SINKS

SCHEDULES = ("cosine", "inverse_sqrt", "constant")
TOKENIZERS = ("auto", "byte", "bpe", "unigram")
NONFINITE_POLICIES = ("skip", "stop")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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

    # --- Data ---
    data: str = "python-stdlib"
    # auto | byte | bpe | unigram (SentencePiece, trained on the train split); "auto": BPE for a
    # budget-sized model (size auto with a time or token budget, blockstate.budget), else byte
    tokenizer: str = "auto"
    vocab_size: int = 4096              # SentencePiece vocabulary (byte: fixed 259)
    seq_len: int | None = None          # training length L; default: the model's max_seq_len
    pack_documents: bool = False        # allow a training sequence to span two documents
    cache_dir: str | None = None        # tokenized corpora; default ~/.cache/blockstate

    # --- Model ---
    model: str = "bst-recommended"
    # "auto": sized for the time or token budget (blockstate.budget); tiny/small/base/large as set
    size: str = "auto"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Segment-recurrent models (transformer-xl, brt) carry memory from one training sequence to the
    # next of the same document, reading lanes of consecutive windows; false trains (and evaluates)
    # them on shuffled windows without memory, like every other model.
    carry_memory: bool = True

    # --- Optimizer and schedule ---
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
    # On a non-finite loss or gradient norm: "skip" the batch (stop after MAX_SKIPPED_BATCHES in a
    # row) or "stop" at once; either way the saved parameters stay finite.
    nonfinite: str = "skip"

    # --- Budget (at least one; training stops at the first spent) ---
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None       # seconds

    # --- Checkpointing and fine-tuning ---
    save_every: int = 200
    # Start from this checkpoint's weights (a run directory or a step directory): a new run with a
    # new optimizer and schedule from step 0, the checkpoint's model and tokenizer (fine-tuning).
    init_from: str | None = None

    # --- Logging and output ---
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    # Where metrics go besides metrics.jsonl: comma-separated auto | none | tensorboard | wandb
    log_to: str = "auto"
    # Peak FLOP/s (in TFLOP/s) of one device for the MFU of the progress line and metrics; None
    # uses the data-sheet peak of known GPUs (PEAK_TFLOPS) and shows no MFU elsewhere.
    peak_tflops: float | None = None
    sample_tokens: int = 200            # length of the sample printed at the end (0: none)
    sample_every: int = 0               # also sample every N steps during training (0: at the end only)
    sample_prompt: str | None = None    # the samples' prompt; default: the first validation sequence's start

    # --- System ---
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    # Mixed precision of the forward pass: "auto" is bfloat16 autocast on CUDA and float32 elsewhere.
    precision: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    # Processes (torchrun) that split every training sequence by whole blocks, the SSM state handed
    # from one to the next (blockstate.context_parallel); 1: each process holds whole sequences.
    context_parallel: int = 1
    # Under torchrun, shard parameters, gradients and optimizer state over the processes (FSDP2,
    # blockstate.fsdp) instead of replicating them (DDP); checkpoints are then DCP shards.
    fsdp: bool = False
    seed: int = 0

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
                     "log_every", "vocab_size", "context_parallel"):
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
        if self.sample_every < 0:
            raise ValueError(f"sample_every={self.sample_every} must be >= 0 (0: sample at the end only)")
        if self.sample_prompt is not None and not self.sample_prompt:
            raise ValueError("sample_prompt='' is empty; give some text, or leave it out for the start "
                             "of the first validation sequence")
        if self.init_from is not None and not self.init_from.strip():
            raise ValueError("init_from='' is empty; give a run directory or checkpoint step directory")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2 (a training sequence needs an "
                             f"input and a next token)")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device={self.device!r} is not valid; use auto, cpu, cuda, cuda:N or mps")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by "
                             f"grad_accum={self.grad_accum}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed} is out of range; give an integer in [0, 2**63)")
        if not self.lr <= MAX_LR:
            raise ValueError(f"lr={self.lr} is out of range; a learning rate above {MAX_LR:g} only "
                             f"makes the weights diverge")
        if not self.data.strip():
            raise ValueError("data='' is empty; give a corpus name (see `blockstate corpora`) or a path")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0 (got {self.lr}), 0 <= min_lr_ratio <= 1 (got "
                             f"{self.min_lr_ratio}) and warmup_steps >= 0 (got {self.warmup_steps})")
        # validates the overrides ("auto" plans on top of the small size's fields)
        mconfig = model_config(self.model, "small" if self.size == "auto" else self.size,
                               **self.model_overrides)
        self._check_fsdp(mconfig)
        seq_len = self.seq_len or mconfig.max_seq_len
        if mconfig.block_size > seq_len:
            raise ValueError(f"block_size={mconfig.block_size} is longer than the training length "
                             f"seq_len={seq_len}; choose block_size <= seq_len")
        if mconfig.carries_memory and seq_len % mconfig.block_size:
            raise ValueError(f"{mconfig.arch.kind} carries memory between sequences: seq_len={seq_len} "
                             f"must be a multiple of block_size={mconfig.block_size}")

    def _check_fsdp(self, mconfig: ModelConfig) -> None:
        """What --fsdp is not combined with (one line each)."""
        if not self.fsdp:
            return
        if self.context_parallel > 1:
            raise ValueError(f"fsdp is not combined with context_parallel={self.context_parallel}; "
                             f"choose one (--fsdp or --context-parallel)")
        if self.precision == "fp16":
            raise ValueError("fsdp with precision='fp16' is not supported (its loss scaler does not "
                             "handle sharded gradients); use --precision bf16 or fp32")
        if mconfig.carries_memory and self.carry_memory:
            raise ValueError(f"fsdp does not carry the memory of {mconfig.arch.kind} between sequences; pass "
                             f"--no-carry-memory, or train without --fsdp")

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
    "data": "corpus name (see `blockstate corpora`), hf:NAME[:CONFIG][,text=COLUMN][,streaming], "
            "directory, .jsonl or text file",
    "tokenizer": "byte, or a SentencePiece bpe/unigram tokenizer trained on the train split; auto: "
                 "bpe of 1024 pieces when size auto plans for a budget, else byte",
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
    "precision": "autocast of the forward pass: auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16 or "
                 "fp16 (with dynamic loss scaling)",
    "peak_tflops": "peak TFLOP/s of one device, for the MFU shown in the progress line "
                   "(default: known GPUs' data-sheet peak; none on CPU)",
    "log_to": "metrics besides metrics.jsonl, comma-separated: auto (TensorBoard when installed), "
              "none, tensorboard, wandb (WANDB_* environment variables apply)",
    "activation_checkpointing": "recompute each layer's activations in the backward pass "
                                "(less memory, about a third more compute)",
    "context_parallel": "split every training sequence by whole blocks over this many processes "
                        "(torchrun --nproc_per_node P), passing the SSM state between them; BST "
                        "with SH/MH context and an S4, S4D or selective kernel",
    "fsdp": "under torchrun: shard parameters, gradients and optimizer state over the processes "
            "(FSDP2; one unit per layer) instead of DDP; checkpoints are torch.distributed.checkpoint "
            "shards that resume at any number of processes",
    "cache_dir": "directory of tokenized corpora (default: ~/.cache/blockstate)",
    "sample_tokens": "tokens per sample: the one printed at the end and those of --sample-every "
                     "(0: no samples)",
    "sample_every": "also sample every N steps, into metrics.jsonl and the log (0: at the end only)",
    "sample_prompt": "prompt of the samples (default: the start of the first validation sequence)",
    "init_from": "fine-tune: start from this run's or checkpoint step directory's weights, with its "
                 "model and tokenizer, a new optimizer and schedule, at step 0",
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
# Settings that change only what a run writes or shows, never its trained weights: a resume may
# change them without --override.
OUTPUT_FIELDS = ("sample_tokens", "sample_every", "sample_prompt", "log_every", "log_to", "eval_every",
                 "eval_batches", "save_every", "peak_tflops")
# The groups of `blockstate train --help`, in order: every TrainConfig field is in exactly one
# (model_overrides is the command line's --set); the command line's own flags (--out, --resume,
# ...) join them by title in `cli.build_parser`.
FIELD_GROUPS: dict[str, tuple[str, ...]] = {
    "run": (),
    "data": ("data", "tokenizer", "vocab_size", "seq_len", "pack_documents", "cache_dir"),
    "model": ("model", "size", "model_overrides", "carry_memory"),
    "optimizer and schedule": ("batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps",
                               "schedule", "weight_decay", "beta1", "beta2", "grad_clip", "nonfinite"),
    "budget (at least one; training stops at the first spent)": BUDGET_FIELDS,
    "checkpointing and fine-tuning": ("save_every", "init_from"),
    "logging and output": ("log_every", "eval_every", "eval_batches", "log_to", "peak_tflops",
                           "sample_tokens", "sample_every", "sample_prompt"),
    "system": ("device", "precision", "compile", "activation_checkpointing", "context_parallel",
               "fsdp", "seed"),
}
MAX_LR = 100.0  # far above any useful AdamW learning rate; refuses typos such as 1e38


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML, JSON (or, with PyYAML installed, YAML) file of TrainConfig fields. A run's own
    train_config.json gives the run's resolved settings (its "train" table: what size "auto" and
    tokenizer "auto" chose), so `--config RUN/train_config.json` trains the same run again."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory; give a TOML, JSON (or YAML) file")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("train"), dict):
            data = data["train"]  # a run's train_config.json: its resolved training settings
    elif path.suffix in (".yaml", ".yml"):
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
