"""Training loop: `blockstate train`.

Read top to bottom: resolve the config, prepare data and tokenizer, build the model and optimizer,
restore a checkpoint when resuming, then step until a step, token or wall-clock budget is spent,
validating, logging and checkpointing along the way. Data parallel through `torchrun` (DDP), or
fully sharded with `--fsdp` (`fsdp`: FSDP2 and sharded checkpoints).

Its concerns live in modules named after them: `train_config` (TrainConfig, flags, config files),
`optim` (AdamW groups and the learning-rate schedule), `device` (device, processes, precision),
`evaluate` (losses and validation metrics), `carry` (what a model carries from batch to batch,
and the stream it reads), `rundir` (run directory, lock, metrics sinks), `checkpoint` (atomic
safetensors checkpoints) and `budget` (size "auto").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .budget import PLANNED_FIELDS, explicit_fields, plan_for_budget, plan_tokenizer
from .carry import Carry, carry_for
from .checkpoint import load_checkpoint, load_latest_intact, remove_temporary, save_checkpoint
from .config import ModelConfig
from .data import (
    PackedSequences,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    default_cache_dir,
    load_tokenizer,
    resolve_corpus,
    tokenize_split,
)
from .device import Distributed, autocast_dtype, device_peak_flops, resolve_device
from .distributed_budget import agree_at_boundary, saved_by_main
from .evaluate import evaluate_batches, spread_windows, unigram_perplexity
from .fileio import atomic_write
from .model import BlockStateLM
from .optim import build_optimizer, learning_rate
from .registry import model_config
from .resources import check_training_fits
from .rundir import (
    LOCK_FILE,
    RUN_ENTRIES,
    MetricsLog,
    RunLock,
    check_clearable,
    check_metric_sinks,
    check_writable,
    clear_run,
    is_run_dir,
    mark_run,
)
from .step import FP16_OVERFLOW, NonFinitePolicy, StepResult, TrainStep, grad_scaler
from .train_config import BUDGET_FIELDS, OUTPUT_FIELDS, TrainConfig


def prepare_tokenizer(config: TrainConfig, corpus, out_dir: Path, is_main: bool,
                      resuming: bool = False,
                      fall_back: Callable[[str], None] | None = None,
                      restore_from: Path | None = None) -> Tokenizer:
    """The run's tokenizer, saved in out_dir/tokenizer: a resumed run's own (restored from the
    checkpoint's copy, `restore_from`, when out_dir has none); for a new run, the
    one the config asks for (one left by an earlier attempt is reused only if it was trained with
    the same settings on the same corpus). With `fall_back` (for a tokenizer the budget plan
    chose, not the user), a SentencePiece tokenizer that cannot be trained on the corpus (too
    little text for its vocabulary) gives way to the byte tokenizer, and `fall_back` is given the
    line that says so; without it, that failure is raised."""
    tok_dir = out_dir / "tokenizer"
    if is_main and restore_from is not None and not (tok_dir / "tokenizer.json").exists():
        tok_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(Path(restore_from).iterdir()):  # the verified copy, byte for byte
            if path.is_file():
                atomic_write(tok_dir / path.name, path.read_bytes())
    if is_main and not (resuming and (tok_dir / "tokenizer.json").exists()):
        try:
            tokenizer = build_tokenizer(config.tokenizer, corpus=corpus,
                                        vocab_size=config.vocab_size, directory=tok_dir)
        except TokenizerError as error:
            if fall_back is None:
                raise
            fall_back(f"size auto: using the byte tokenizer instead ({error})")
            tokenizer = build_tokenizer("byte")
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
    messages: list[str] = []  # warnings found before the logger exists
    local_data = local_corpus_path(config.data, messages.append)
    if local_data is not None:  # store the absolute path, so a resume from elsewhere finds it
        config = dataclasses.replace(config, data=str(local_data))
    if config.init_from is not None and Path(config.init_from).expanduser().exists():
        # stored absolute, as data is: the same on resume, and from any directory
        config = dataclasses.replace(config, init_from=str(Path(config.init_from).expanduser().resolve()))
    init = None  # the checkpoint a new run starts from (--init-from: weights only)
    if config.init_from is not None and not resume:
        init, config = _init_from(config, out_dir, requested)
    checkpoint = None
    if resume:
        if resume is not True:  # a step directory (or another run) to resume from
            checkpoint = load_checkpoint(resume)
        elif out_dir.exists():  # raises, naming them, when step directories exist but none loads
            checkpoint = load_latest_intact(out_dir, messages.append)
        if checkpoint is None and not is_run_dir(out_dir):
            raise ValueError(f"--resume: {out_dir} holds no checkpoint to resume from")
    if checkpoint is not None:
        config = _resumed_config(config, checkpoint.train_state, requested, override, messages)
        _check_run_tokenizer(out_dir, checkpoint)
    elif resume:
        messages.append(f"{out_dir} holds no checkpoint (the run stopped before its first); "
                        f"starting it from step 0")
        overwrite = True
    elif not overwrite:
        check_writable(out_dir)
    if checkpoint is None and out_dir.exists() and is_run_dir(out_dir) and not overwrite:
        _check_restartable(out_dir, config)
        overwrite = True  # the same run, killed before its first checkpoint: start it again

    # ---- validate everything before anything on disk changes
    corpus = resolve_corpus(config.data)
    if local_data is not None and local_data.is_dir():
        inside = out_dir.resolve()
        if inside == local_data or local_data in inside.parents:
            raise ValueError(f"--out {out_dir} lies inside the corpus directory {local_data}: the "
                             f"run's files would become training data. Choose --out outside it")
    if checkpoint is not None:
        _check_same_data(out_dir, corpus, allow_changed_data)
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    ddp = Distributed.from_env(device)
    if ddp.world_size > 1 and config.device == "auto" and device.type == "cuda":
        device = torch.device(f"cuda:{ddp.local_rank}")
    if config.context_parallel > 1:
        _check_context_parallel(config, ddp)
    if config.fsdp and ddp.world_size > 1 and checkpoint is not None and checkpoint.sharded_dir is None:
        raise ValueError(f"--fsdp: checkpoint {checkpoint.path} was written without --fsdp "
                         f"(safetensors); resume it without --fsdp, or in one process")
    if config.batch_size % (_data_processes(config, ddp) * config.grad_accum):
        raise ValueError(f"batch_size={config.batch_size} must be divisible by processes x grad_accum "
                         f"= {ddp.world_size} x {config.grad_accum}")
    if overwrite and checkpoint is None and ddp.is_main:
        check_clearable(out_dir, [local_data] if local_data is not None else [])
    check_training_fits(config, device, ddp.world_size)

    lock = RunLock(out_dir)
    existed = set(os.listdir(out_dir)) if out_dir.is_dir() else None
    progress = _Progress()
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        return _train(config, out_dir, checkpoint, overwrite, corpus, device, ddp, on_step, quiet,
                      messages, explicit_fields(config, requested), progress, init)
    except BaseException:
        if ddp.is_main and checkpoint is None and not progress.started:
            _remove_new_entries(out_dir, existed)  # a refused setup leaves the disk as it was
        raise
    finally:
        lock.release()


def _check_restartable(out_dir: Path, config: TrainConfig) -> None:
    """Refuse to start a new run over the run in `out_dir` unless that run stopped before its first
    checkpoint with the same settings (budgets aside)."""
    if (out_dir / "checkpoints").is_dir() and any((out_dir / "checkpoints").iterdir()):
        raise ValueError(f"{out_dir} already holds a run; pass --resume to continue it or "
                         f"--overwrite to start over")
    record = _run_record(out_dir) or {}
    previous = record.get("requested_train", record.get("train"))
    if previous is not None and {k: v for k, v in previous.items() if k not in BUDGET_FIELDS} != {
            k: v for k, v in config.to_dict().items() if k not in BUDGET_FIELDS}:
        raise ValueError(f"{out_dir} holds a run that stopped before its first checkpoint, with "
                         f"other settings; pass --overwrite to replace it")


def _data_processes(config: TrainConfig, ddp: Distributed) -> int:
    """Processes that read different sequences: all of them, or one group under context parallelism
    (its processes read the same sequences, each its own blocks of them)."""
    return 1 if config.context_parallel > 1 else ddp.world_size


def _check_context_parallel(config: TrainConfig, ddp: Distributed) -> None:
    from .context_parallel import check_model

    if ddp.world_size != config.context_parallel:
        raise ValueError(f"--context-parallel {config.context_parallel} needs exactly that many "
                         f"processes (torchrun --nproc_per_node {config.context_parallel}), not "
                         f"{ddp.world_size}; it is not combined with data parallelism")
    if config.size == "auto":
        raise ValueError("--context-parallel needs a fixed --size (size auto plans for one process)")
    mconfig = model_config(config.model, config.size, **config.model_overrides)
    check_model(mconfig)
    seq_len = config.seq_len or mconfig.max_seq_len
    if seq_len % (config.context_parallel * mconfig.block_size):
        raise ValueError(f"--context-parallel {config.context_parallel}: seq_len={seq_len} must be "
                         f"a multiple of processes x W = {config.context_parallel} x "
                         f"{mconfig.block_size}")


@dataclasses.dataclass
class _Progress:
    started: bool = False  # the training loop began: from then on the run's files are kept


def _remove_new_entries(out_dir: Path, existed: set[str] | None) -> None:
    """Remove what a new run wrote in `out_dir` before it failed to start (the directory itself
    when this request created it); entries that were there before are left alone."""
    import shutil

    if not out_dir.is_dir():
        return
    for entry in out_dir.iterdir():
        if (existed is None or entry.name not in existed) and entry.name in RUN_ENTRIES:
            if entry.name == LOCK_FILE:
                entry.unlink(missing_ok=True)  # unlinked while still held: no second writer slips in
            elif entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    if existed is None and not any(out_dir.iterdir()):
        out_dir.rmdir()


def local_corpus_path(data: str, warn: Callable[[str], None] | None = None) -> Path | None:
    """The absolute path `data` names when it is a local file or directory, None when it is a
    registered corpus or hf:NAME (a folder of that name in the working directory never shadows
    a registered corpus: write ./NAME for it)."""
    from .data.corpora import REGISTRY

    if not data.strip():
        raise ValueError("--data is empty; give a corpus name (see `blockstate corpora`) or a path")
    if data in REGISTRY or data.startswith("hf:"):
        if data in REGISTRY and Path(data).exists() and warn is not None:
            warn(f"note: --data {data} is the registered corpus; for the folder of that name here, "
                 f"write ./{data}")
        return None
    path = Path(data).expanduser()
    return path.resolve() if path.exists() else None


def _check_run_tokenizer(out_dir: Path, checkpoint) -> None:
    """Refuse to resume when the run's tokenizer/ differs from the tokenizer the checkpoint was
    trained with (its verified copy): the token ids would mean other text."""
    saved = checkpoint.tokenizer_dir
    current = out_dir / "tokenizer"
    if saved is None or not current.is_dir():
        return  # nothing recorded to compare with, or restored from the checkpoint's copy
    for path in sorted(saved.iterdir()):
        other = current / path.name
        if not other.is_file() or other.read_bytes() != path.read_bytes():
            raise ValueError(f"--resume: {other} is not the tokenizer that {checkpoint.path} was "
                             f"trained with (its copy: {path}); restore it from there, or start a "
                             f"new run for another tokenizer")


# What --init-from takes from the checkpoint's run unless given: the model and its tokenizer.
INIT_FIELDS = ("model", "size", "model_overrides", "tokenizer", "vocab_size")


def with_init_settings(fields: dict[str, Any], init_from) -> dict[str, Any]:
    """`fields` (TrainConfig fields a user gave) completed by the model and tokenizer settings of
    the run whose checkpoint `init_from` (a path, or a loaded Checkpoint) is: its INIT_FIELDS where
    `fields` has none, and its model_overrides under those given."""
    init = load_checkpoint(init_from) if isinstance(init_from, str | Path) else init_from
    saved = init.train_state.get("train_config") or {}
    inherited = {name: saved[name] for name in INIT_FIELDS if name in saved}
    merged = {**inherited, **fields}
    if isinstance(inherited.get("model_overrides"), dict):
        merged["model_overrides"] = {**inherited["model_overrides"], **fields.get("model_overrides", {})}
    return merged


def _init_from(config: TrainConfig, out_dir: Path, requested: set[str] | None):
    """The checkpoint `config.init_from` names (verified) and the config of a new run that starts
    from its weights: the checkpoint's model and tokenizer settings where the request gives none
    (`with_init_settings`); refused, in one line, when the model the request describes is not the
    checkpoint's."""
    init = load_checkpoint(config.init_from)
    flag = f"--init-from {config.init_from}"
    inside = out_dir.resolve()
    if inside == init.path.resolve() or inside in init.path.resolve().parents:
        raise ValueError(f"{flag} lies inside --out {out_dir}; fine-tune into another directory")
    if init.tokenizer_dir is None:
        raise ValueError(f"{flag}: the checkpoint was saved without its tokenizer; a fine-tune needs "
                         f"the tokenizer the weights were trained with")
    given = explicit_fields(config, requested)
    kind = load_tokenizer(init.tokenizer_dir).kind
    if "tokenizer" in given and config.tokenizer not in ("auto", kind):
        raise ValueError(f"{flag}: the checkpoint's tokenizer is {kind}; a fine-tune keeps it (drop "
                         f"--tokenizer {config.tokenizer})")
    if "size" in given and config.size == "auto":
        raise ValueError(f"{flag}: size auto plans a new model; a fine-tune keeps the checkpoint's "
                         f"(drop --size auto)")
    merged = with_init_settings({name: getattr(config, name) for name in given if name in INIT_FIELDS},
                                init)
    config = dataclasses.replace(config, **{**merged, "tokenizer": kind})
    if config.size == "auto":  # a checkpoint without its train config: nothing to inherit
        raise ValueError(f"{flag}: give the checkpoint's --model, --size and --set")
    mine = model_config(config.model, config.size, **{**config.model_overrides,
                                                        "vocab_size": init.model_config.get("vocab_size")})
    theirs = init.model_config
    differ = sorted(k for k in set(theirs) | set(mine.to_dict()) if mine.to_dict().get(k) != theirs.get(k))
    if differ:
        shown = ", ".join(f"{k}={mine.to_dict().get(k)!r} (checkpoint: {theirs.get(k)!r})" for k in differ)
        raise ValueError(f"{flag}: the model config does not match the checkpoint's: {shown}; drop "
                         f"the model flags to use the checkpoint's")
    return init, config


def _resumed_config(config: TrainConfig, train_state: dict[str, Any], requested: set[str] | None,
                    override: bool, messages: list[str]) -> TrainConfig:
    """The config a resumed run continues with: its own, with the budgets of `config` (all of
    them: a budget the request does not give no longer applies). Other
    settings among `requested` (all fields when None) that differ are refused unless `override`,
    which applies them. Size "auto" asks for no particular size and the run keeps its own; nor is
    what its budget plan chose a change."""
    saved = TrainConfig.from_dict(train_state["train_config"])
    names = requested if requested is not None else {f.name for f in dataclasses.fields(config)}
    given = explicit_fields(config, requested)
    if config.size == "auto":
        names = set(names) - {"size"}
        if train_state.get("plan") is not None:
            names -= set(PLANNED_FIELDS) - given
    if config.tokenizer == "auto":  # nor does tokenizer "auto" ask for a particular tokenizer
        names = set(names) - {"tokenizer"} - ({"vocab_size"} - given)
    changed = sorted(name for name in names - set(BUDGET_FIELDS) - set(OUTPUT_FIELDS)
                     if getattr(config, name) != getattr(saved, name))
    # what a run writes or shows (samples, metrics lines, checkpoints) may change without --override
    output = sorted(name for name in set(names) & set(OUTPUT_FIELDS)
                    if getattr(config, name) != getattr(saved, name))
    if changed and not override:
        was = ", ".join(f"{name}={getattr(saved, name)!r}" for name in changed)
        now = ", ".join(f"{name}={getattr(config, name)!r}" for name in changed)
        raise ValueError(f"--resume: the run was trained with {was}; this request has {now}. "
                         f"Only budgets change on resume unless you pass --override")
    budget = {k: getattr(config, k) for k in BUDGET_FIELDS}  # the request's budgets replace the run's
    if changed:
        messages.append(f"resuming with changed settings: {', '.join(changed)}")
    if output:
        messages.append(f"resuming with changed output settings: "
                        f"{', '.join(f'{name}={getattr(config, name)!r}' for name in output)}")
    return dataclasses.replace(saved, **budget,
                               **{name: getattr(config, name) for name in changed + output})


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
    # runs recorded before fingerprints hashed the content carry the names/sizes/mtimes one
    current = (corpus.fingerprint() if corpus_record.get("fingerprint_kind") else
               corpus.stats_fingerprint())
    if recorded != current and not allow_changed_data:
        raise ValueError(f"the corpus {corpus.name!r} changed since {out_dir} started (fingerprint "
                         f"{current} instead of {recorded}); resuming would train on "
                         f"other data. Pass --allow-changed-data to resume anyway")


def _train(config: TrainConfig, out_dir: Path, checkpoint, overwrite: bool, corpus,
           device: torch.device, ddp: Distributed, on_step, quiet: bool,
           messages: list[str], explicit: set[str], progress: _Progress,
           init=None) -> dict[str, Any]:
    """The run itself, once `train` has validated the request: set up, step, finish."""
    from tqdm.auto import tqdm

    _open_run_dir(out_dir, overwrite and checkpoint is None, ddp)

    def log(message: str) -> None:
        if ddp.is_main and not quiet:
            tqdm.write(message, file=sys.stdout)

    for message in messages:
        log(message)
    run = _setup(config, out_dir, checkpoint, corpus, device, ddp, explicit, init, log)
    config, state, model = run.config, run.state, run.model
    train_step = TrainStep(run.train_model, run.optimizer, device, config.precision,
                           config.grad_clip, config.grad_accum, run.scaler, parameters=model,
                           world_size=ddp.world_size, rank=ddp.rank, sharded=run.sharded,
                           split_block=model.config.block_size if config.context_parallel > 1 else None)
    nonfinite = NonFinitePolicy(config.nonfinite)

    # ---- loop: one optimizer step per iteration until a budget is spent or a signal arrives
    bar = tqdm(total=state.horizon, initial=state.step, disable=quiet or not ddp.is_main,
               unit="step", dynamic_ncols=True, file=sys.stderr)
    model.train()
    if checkpoint is not None and ddp.is_main and _budget_spent(config, state, run.elapsed()):
        _say_nothing_to_train(config, state, run.elapsed())
    progress.started = True
    stopper = _StopSignals().install()
    try:
        while True:
            # every process stops at the same boundary and reads process 0's clock
            # (distributed_budget): a stop signal received by any process stops them all
            now = agree_at_boundary(ddp, device, stopper.received, run.elapsed(),
                                    lambda spent: _budget_spent(config, state, spent))
            if now.stop:
                stopper.received = now.signal
                break
            step_start = time.perf_counter()
            progress_in_time = _time_progress(config, state, now.elapsed)
            lr = learning_rate(state.step, config, state.horizon, progress_in_time)
            # the carry then holds what the batch leaves (it was read: the next continues after it)
            result = train_step(run.stream.next_batch(), lr, run.carry)
            stop = nonfinite.observe(result)
            if result.skipped is not None:
                run.skipped(result, nonfinite.skipped, stop)  # raises (saved) when `stop`
                continue
            state.step += 1
            state.tokens += result.tokens
            record = run.record(result, lr, time.perf_counter() - step_start)
            bar.update(1)
            run.show(bar, record)
            if on_step is not None:
                on_step(state.step, record)
            run.after_step()  # validation, sample and checkpoint when their intervals come
    except KeyboardInterrupt:  # a second Ctrl-C during a step: the step is incomplete, so the
        # newest checkpoint (not this state) is what a resume continues from
        log(f"interrupted again during step {state.step + 1}; not saving the incomplete step "
            f"(resume continues from the newest checkpoint)")
        stopper.restore()
        raise
    except BaseException:
        stopper.restore()
        raise
    finally:
        bar.close()
    return run.finish(stopper, checkpoint.train_state["tokens"] if checkpoint else 0)


def _open_run_dir(out_dir: Path, clear: bool, ddp: Distributed) -> None:
    """Clear a run being replaced, remove temporary files a killed run left, mark the directory."""
    if clear and ddp.is_main:
        clear_run(out_dir)
    if ddp.is_main:
        remove_temporary(out_dir)
        mark_run(out_dir)
    if dist.is_initialized():
        dist.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)


def _say_nothing_to_train(config: TrainConfig, state: _RunState, elapsed: float) -> None:
    budgets = ", ".join(f"{k}={getattr(config, k)}" for k in BUDGET_FIELDS
                        if getattr(config, k) is not None)
    print(f"blockstate: the run is at step {state.step} ({state.tokens:,} tokens, "
          f"{elapsed:.0f} s of training), which already meets the budget {budgets}; nothing to "
          f"train. Give a larger budget to continue it", file=sys.stderr)


def _setup(config: TrainConfig, out_dir: Path, checkpoint, corpus, device: torch.device,
           ddp: Distributed, explicit: set[str], init, log) -> _Run:
    """Data, tokenizer and model (size "auto" planned for the budget; a resume keeps its plan),
    the optimizer, the state restored from `checkpoint`, the resolved config written."""
    prepare_start = time.perf_counter()
    requested_config, plan = config, (checkpoint.train_state.get("plan") if checkpoint else None)
    note = None
    if checkpoint is None:  # "auto": bpe for a budget-sized model, else bytes
        config, note = plan_tokenizer(config, explicit)
        if note:
            log(note)
    if init is not None and ddp.is_main:  # a fine-tune reads text as its weights were trained to
        load_tokenizer(init.tokenizer_dir).save(out_dir / "tokenizer")
    tokenizer = prepare_tokenizer(config, corpus, out_dir, ddp.is_main,
                                  checkpoint is not None or init is not None,
                                  fall_back=log if note else None,
                                  restore_from=checkpoint.tokenizer_dir if checkpoint else None)
    if note and tokenizer.kind == "byte":  # the planned tokenizer could not be trained here
        config = dataclasses.replace(config, tokenizer="byte")
    splits = _tokenized_splits(corpus, tokenizer, config, ddp)
    if checkpoint is None and config.size == "auto":
        config, plan = _plan(config, explicit, tokenizer, device, ddp, log,
                             time.perf_counter() - prepare_start)
    mconfig = model_config(config.model, config.size,
                           **{**config.model_overrides, "vocab_size": tokenizer.vocab_size})
    seq_len = config.seq_len or mconfig.max_seq_len
    train_data = PackedSequences(splits["train"], seq_len, tokenizer.pad_id, config.pack_documents)
    val_data = PackedSequences(splits["validation"], seq_len, tokenizer.pad_id, config.pack_documents)
    # what the model carries from batch to batch (the segment-recurrent baselines: their memory,
    # unless told not to), and the stream of batches it reads
    carry = carry_for(mconfig, config.carry_memory)
    data_processes = _data_processes(config, ddp)  # under context parallelism all read one stream
    stream = carry.stream(train_data, config.batch_size, config.seed,
                          ddp.rank if data_processes > 1 else 0, data_processes)
    model, train_model, sharded = _build_model(config, mconfig, device, ddp, init, log)
    optimizer = build_optimizer(model, config, device)
    scaler = grad_scaler(config.precision, device)

    # ---- where the run stands: fresh, or restored from the checkpoint
    state = _RunState(horizon=_horizon(config, seq_len))
    if checkpoint is not None:
        state = _restore(checkpoint, model, optimizer, stream, carry, mconfig, state.horizon, device,
                         log)
        if scaler is not None and checkpoint.train_state.get("grad_scaler"):
            scaler.load_state_dict(checkpoint.train_state["grad_scaler"])
    if state.horizon is not None and config.warmup_steps >= state.horizon > state.step:
        log(f"warning: warmup_steps={config.warmup_steps} is not shorter than the run's "
            f"{state.horizon} planned steps: the learning rate never reaches lr={config.lr:g}; lower "
            f"--warmup-steps")
    resolved = {"train": config.to_dict(), "model": mconfig.to_dict(), "seq_len": seq_len,
                "tokenizer": tokenizer.kind, "processes": ddp.world_size, "device": str(device),
                "parameters": model.num_parameters(), "corpus": corpus.metadata()}
    resolved["requested_train"] = requested_config.to_dict()  # as asked ("auto" unresolved)
    if plan is not None:
        resolved["plan"] = plan
    if ddp.is_main:
        atomic_write(out_dir / "train_config.json", json.dumps(resolved, indent=2))
        shown = {k: v for k, v in resolved.items() if k not in ("corpus", "plan", "requested_train")}
        log("resolved config:\n" + json.dumps(shown, indent=2))
        log(f"{model.num_parameters():,} parameters; {len(train_data):,} training sequences of "
            f"{seq_len} tokens; {len(val_data):,} validation sequences")
    metrics = MetricsLog(out_dir / "metrics.jsonl", state.step if checkpoint else None, ddp.is_main,
                         log, sinks=tuple(x for x in config.log_to.split(",") if x),
                         run_config=resolved)
    return _Run(config, out_dir, device, ddp, log, mconfig, seq_len, tokenizer, splits, val_data,
                stream, carry, model, train_model, optimizer, scaler, state, plan, metrics, sharded,
                config.batch_size // (data_processes * config.grad_accum))


def _build_model(config: TrainConfig, mconfig: ModelConfig, device: torch.device, ddp: Distributed,
                 init, log) -> tuple[BlockStateLM, nn.Module, bool]:
    """The model (from `init`'s weights for a fine-tune), FSDP-sharded with --fsdp; what the
    forward pass runs (compiled, DDP-wrapped); whether it is sharded."""
    torch.manual_seed(config.seed)
    model = BlockStateLM(mconfig).to(device)  # the config resolved once, above
    if init is not None:  # weights only: the optimizer, schedule and step start afresh
        if init.model_config != mconfig.to_dict():
            raise ValueError(f"--init-from {init.path}: the checkpoint's model config is not this "
                             f"run's (its tokenizer's vocabulary differs?)")
        init.load_model(model)
        log(f"initialized from {init.path} (step {init.step}): weights only; a new optimizer and "
            f"schedule from step 0")
    sharded = config.fsdp and ddp.world_size > 1  # one process: nothing to shard, DCP checkpoints
    if sharded:
        from .fsdp import shard_model

        if device.type == "cuda":
            torch.cuda.set_device(device)
        shard_model(model, device, autocast_dtype(config.precision, device))
    model.activation_checkpointing = config.activation_checkpointing
    train_model: nn.Module = torch.compile(model) if config.compile else model
    if _data_processes(config, ddp) > 1 and not sharded:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, train_model, sharded


@dataclasses.dataclass(eq=False)
class _Run:
    """A run once set up: what the loop steps, and what it saves, validates, logs and samples."""

    config: TrainConfig
    out_dir: Path
    device: torch.device
    ddp: Distributed
    log: Callable[[str], None]
    mconfig: ModelConfig
    seq_len: int
    tokenizer: Tokenizer
    splits: dict
    val_data: PackedSequences
    stream: Any                       # yields the batches `carry` reads
    carry: Carry                      # what the model carries from batch to batch
    model: BlockStateLM
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    state: _RunState
    plan: dict | None
    metrics: MetricsLog
    sharded: bool
    micro: int                        # sequences per micro-batch of one process
    last_val: dict | None = None
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.peak_flops = device_peak_flops(self.device, self.config.precision, self.config.peak_tflops)
        # validation windows spread over the whole split, the same at every evaluation
        self.val_windows = spread_windows(self.val_data,
                                          self.config.eval_batches * self.micro * self.seq_len)
        self.save = saved_by_main(self.ddp, self._save)  # the others wait until it is written

    @property
    def computes(self) -> bool:
        """This process validates and samples (process 0; every process under FSDP)."""
        return self.ddp.is_main or self.sharded

    def elapsed(self) -> float:
        return self.state.elapsed_before + time.perf_counter() - self.start

    def _save(self, last: bool = False) -> None:
        """A checkpoint (process 0 writes it; under --fsdp every process writes its shards, and
        the `last` of the run also holds the whole weights in model.safetensors)."""
        if not self.computes:
            return
        state = self.state
        train_state = {"step": state.step, "tokens": state.tokens, "horizon": state.horizon,
                       "warmup_end": state.warmup_end, "plan": self.plan, "elapsed": self.elapsed(),
                       "data": self.stream.state_dict(), "train_config": self.config.to_dict(),
                       "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}
        if not _parameters_finite(self.model, self.sharded):
            self.log(f"warning: step {state.step}: parameters are not finite; no checkpoint written "
                     f"(the previous one is kept)")
            return
        if self.config.fsdp:
            from .fsdp import save_sharded_checkpoint

            save_sharded_checkpoint(self.out_dir, state.step, self.model, self.optimizer,
                                    self.ddp.is_main, last, model_config=self.mconfig.to_dict(),
                                    train_state=train_state, tokenizer_dir=self.out_dir / "tokenizer")
            return
        # Carried memory is saved when this process holds all of it (one process).
        carried = self.carry.tensors() if self.ddp.world_size == 1 else None
        save_checkpoint(self.out_dir, state.step, self.model, self.mconfig.to_dict(), train_state,
                        self.optimizer, tokenizer_dir=self.out_dir / "tokenizer", memory=carried)

    def validate(self) -> dict[str, Any]:
        result = evaluate_batches(self.model, self.val_data, self.tokenizer, self.micro,
                                  self.config.eval_batches, self.device,
                                  carry=self.config.carry_memory,
                                  precision=self.config.precision, indices=self.val_windows)
        result["step"] = self.state.step
        self.metrics.write({"split": "validation", **result})
        self.last_val = result
        return result

    def sample(self) -> dict[str, str] | None:
        """A sample from the model (process 0; every process must call under FSDP)."""
        whole = _whole_model(self.model, self.mconfig, self.device, self.sharded)  # FSDP: gathers
        return _sample(whole, self.tokenizer, self.val_data, self.config, self.device) \
            if self.ddp.is_main else None

    def skipped(self, result: StepResult, in_a_row: int, stop: bool) -> None:
        """Record a skipped batch; with `stop`, save the run (finite parameters) and raise."""
        step = self.state.step
        if result.skipped == FP16_OVERFLOW:
            self.metrics.write({"step": step, "skipped_batch": True, "reason": result.skipped,
                                "loss_scale": self.scaler.get_scale()})
            return
        self.metrics.write({"step": step, "skipped_batch": True, "reason": result.skipped})
        what = result.skipped.removeprefix("non-finite ")
        self.log(f"warning: step {step + 1}: non-finite {what}; batch skipped ({in_a_row} in a row)")
        if stop:
            self.save()
            raise ValueError(
                f"training stopped at step {step}: non-finite {what} ({in_a_row} batch(es) in a "
                f"row, nonfinite={self.config.nonfinite!r}); the run is saved at step {step} with "
                f"finite parameters. Lower --lr or check the data")

    def record(self, result: StepResult, lr: float, seconds: float) -> dict[str, Any]:
        """The step's metrics (written every log_every steps and at the first)."""
        step, config = self.state.step, self.config
        record = {"step": step, "tokens": self.state.tokens, "loss": result.loss, "lr": lr,
                  "grad_norm": result.grad_norm, "tokens_per_s": result.tokens / seconds,
                  "elapsed": self.elapsed()}
        if self.peak_flops is not None:  # 6 FLOPs per parameter and token, over all processes
            record["mfu"] = (6.0 * self.model.num_parameters() * record["tokens_per_s"]
                             / (self.peak_flops * self.ddp.world_size))
        if step % config.log_every == 0 or step == 1:
            self.metrics.write(record)
        return record

    def show(self, bar, record: dict[str, Any]) -> None:
        """The progress bar's line (and, for a run budgeted by time, its expected total)."""
        step, config, loss = record["step"], self.config, record["loss"]
        if self.state.horizon is None and config.max_time is not None and step % 10 == 0:
            spent = self.elapsed()  # the bar's total: steps at the speed so far (schedule on time)
            bar.total = step + int(max(0.0, config.max_time - spent) * step / max(1e-9, spent))
        shown = {"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}
        bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{math.exp(min(loss, 50)):.1f}",
                        tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{record['lr']:.2e}", **shown,
                        refresh=False)

    def after_step(self) -> None:
        """Validation, a sample and a checkpoint, each when its interval comes."""
        step, config = self.state.step, self.config
        if step % config.eval_every == 0 and self.computes:  # FSDP: all compute
            val = self.validate()
            self.log(f"step {step}: validation loss {val['loss']:.4f} "
                     f"ppl {val['perplexity']:.2f} bpb {val['bits_per_byte']:.3f}")
        if config.sample_every and step % config.sample_every == 0 and self.computes:
            sample = self.sample()
            if sample is not None:
                self.metrics.write({"step": step, "split": "sample", **sample})
                self.log(f"step {step}: sample: {sample['prompt']}\u2502{sample['continuation']}")
        if step % config.save_every == 0:
            self.save()

    def finish(self, stopper: _StopSignals, resumed_tokens: int) -> dict[str, Any]:
        """The end: final validation, checkpoint, sample and summary (a signal during them is
        still honoured at the next of these stages, and the summary names it)."""
        state, config, mconfig = self.state, self.config, self.mconfig
        train_time, total_time = time.perf_counter() - self.start, self.elapsed()
        try:
            if stopper.received is not None:
                self.log(f"{stopper.received} received: saving a checkpoint at step {state.step} "
                         f"and stopping")
            elif self.computes and (self.last_val is None or self.last_val["step"] != state.step):
                self.validate()
            self.save(last=True)
            self.metrics.close()
            sample = None
            if self.computes and stopper.received is None and config.sample_tokens > 0:
                sample = self.sample()
            interrupted = stopper.received
        finally:
            stopper.restore()
        summary = {"step": state.step, "tokens": state.tokens, "elapsed_s": total_time,
                   "unigram_perplexity": unigram_perplexity(
                       self.splits["train"].tokens, self.splits["validation"].tokens,
                       self.tokenizer.vocab_size),
                   "sample": sample,
                   "tokens_per_s": (state.tokens - resumed_tokens) / max(1e-9, train_time),
                   "validation": self.last_val if self.ddp.is_main else None,  # FSDP: all validate
                   "parameters": self.model.num_parameters(), "out": str(self.out_dir),
                   "shape": {"d_model": mconfig.d_model, "n_layers": mconfig.n_layers,
                             "block_size": mconfig.block_size, "seq_len": self.seq_len,
                             "batch_size": config.batch_size, "lr": config.lr},
                   "interrupted": interrupted}
        if self.ddp.is_main:
            atomic_write(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        return summary


@dataclasses.dataclass
class _RunState:
    """Where a run stands; saved in every checkpoint's train state."""

    step: int = 0
    tokens: int = 0
    horizon: int | None = None        # optimizer steps of the budget, None for time only
    elapsed_before: float = 0.0       # seconds trained before this process (a resumed run)
    # A run budgeted by time only schedules its cosine on time: from the end of warmup (seconds
    # of training when it ended) to max_time, so it reaches its final learning rate at its end
    # whatever the speed of its steps.
    warmup_end: float | None = None


def _tokenized_splits(corpus, tokenizer: Tokenizer, config: TrainConfig, ddp: Distributed) -> dict:
    """The train and validation splits, tokenized and cached by the main process first."""
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
    return splits


def _plan(config: TrainConfig, explicit: set[str], tokenizer: Tokenizer, device: torch.device,
          ddp: Distributed, log, prepared: float) -> tuple[TrainConfig, dict]:
    """Size "auto": the main process measures and plans (`blockstate.budget`), every process
    trains what it chose. `prepared`: seconds spent on the data so far (deducted from time)."""
    decision = [None]
    if ddp.is_main:
        decision = [plan_for_budget(config, explicit, tokenizer.vocab_size, device, log,
                                    prepared=prepared)]
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    return decision[0]


def _horizon(config: TrainConfig, seq_len: int) -> int | None:
    """Optimizer steps in the budget (None when only time is given)."""
    if config.max_steps is not None:
        return config.max_steps
    if config.max_tokens is not None:
        return math.ceil(config.max_tokens / (config.batch_size * seq_len))
    return None


def _restore(checkpoint, model: nn.Module, optimizer, stream, carry: Carry, mconfig,
             horizon: int | None, device: torch.device, log) -> _RunState:
    """Load the checkpoint's parameters, optimizer, RNG, data position and carried state; the
    run's state (with this request's `horizon`, or the run's own when the request gives only
    time)."""
    if checkpoint.model_config != mconfig.to_dict():
        raise ValueError(f"checkpoint {checkpoint.path} was trained with another model config")
    if checkpoint.sharded_dir is not None:  # an --fsdp run's, written at any number of processes
        from .fsdp import load_sharded

        load_sharded(checkpoint.sharded_dir, model, optimizer)
    else:
        checkpoint.load_model(model)
        checkpoint.load_optimizer(optimizer)
    checkpoint.restore_rng()
    saved = checkpoint.train_state
    stream.load_state_dict(saved["data"])
    state = _RunState(step=saved["step"], tokens=saved["tokens"],
                      horizon=saved["horizon"] if horizon is None else horizon,
                      elapsed_before=saved["elapsed"], warmup_end=saved.get("warmup_end"))
    carry.restore(checkpoint, device, log)
    log(f"resumed from {checkpoint.path} at step {state.step}")
    return state


def _budget_spent(config: TrainConfig, state: _RunState, elapsed: float) -> bool:
    return ((config.max_steps is not None and state.step >= config.max_steps)
            or (config.max_tokens is not None and state.tokens >= config.max_tokens)
            or (config.max_time is not None and elapsed >= config.max_time))


def _time_progress(config: TrainConfig, state: _RunState, elapsed: float) -> float | None:
    """For a run budgeted by time only, the fraction of its post-warmup time spent (else None)."""
    if state.horizon is not None or config.max_time is None or state.step < config.warmup_steps:
        return None
    if state.warmup_end is None:
        state.warmup_end = elapsed
    return (elapsed - state.warmup_end) / max(1e-9, config.max_time - state.warmup_end)


def _parameters_finite(model: nn.Module, sharded: bool) -> bool:
    if sharded:
        from .fsdp import parameters_finite

        return parameters_finite(model)
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _whole_model(model: nn.Module, mconfig: ModelConfig, device: torch.device, sharded: bool
                 ) -> nn.Module | None:
    """`model` itself, or under FSDP (where sampling's prefill and step would not gather the
    parameters) an unsharded copy on process 0 (None on the others; every process must call)."""
    if not sharded:
        return model
    from .fsdp import full_model_state

    state = full_model_state(model)
    if dist.get_rank() != 0:
        return None
    whole = BlockStateLM(mconfig)
    whole.load_state_dict(state)
    return whole.to(device)


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
    """Continue `config.sample_prompt` (default: the start of the first validation sequence), for
    a look at what the model learned. Its own random generator: training's RNG is left as it was."""
    if config.sample_tokens <= 0:
        return None
    if config.sample_prompt is not None:
        prompt = tokenizer.encode(config.sample_prompt)
    else:
        inputs, _ = val_data[0]
        prompt = [int(t) for t in inputs[:48] if t not in (tokenizer.pad_id, tokenizer.bos_id)]
    out = model.generate([prompt], config.sample_tokens, temperature=0.8, top_k=40, seed=config.seed)[0]
    return {"prompt": tokenizer.decode(prompt), "continuation": tokenizer.decode(out[len(prompt):])}
