"""Train presets on a synthetic long-range task and score them by distance: `blockstate tasks run`.

Every run trains one preset (optionally with model overrides, for ablations) for a fixed number of
optimizer steps on freshly sampled batches, so results do not depend on the machine's load, then
scores a held-out set sampled with a separate seed. Presets are compared at a matched parameter
count (a baseline's MLP width is chosen to bring it within `PARAM_TOLERANCE` of BST:SH:S4; BST
variants and ablations keep their own size, reported with each run). A finished
run is one JSON file; re-running the same command skips it. A run in progress saves a checkpoint
(model, optimizer, loss curve, elapsed time) every `checkpoint_every` steps next to where its JSON
will go, and continues from it when the command is run again, with the same result as an
uninterrupted run (the batches are a function of the seed and the step): a sweep interrupted at
any point loses at most the steps since the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint, load_latest_intact, save_checkpoint
from ..evaluate import block_ranges
from ..fileio import atomic_write
from ..optim import scaled_parameter_groups, warmup_cosine
from ..registry import BST, build_model, list_models, matched_mlp_width
from ..ssm.skip import SKIP_STATE_KEY, set_skip_thresholds, skip_filler, skip_thresholds, stop_skipping
from ..step import TrainStep
from .generators import IGNORE, make_task, score

SUITE_SIZE = "tiny"             # d_model 64, 2 layers, 2 heads, W = 16, N = 8, S = 4 (registry.SIZES)
REFERENCE_MODEL = "bst-sh-s4"   # the parameter budget the other presets are matched to
PARAM_TOLERANCE = 0.10
BST_PRESETS = tuple(list_models(BST))
CALIBRATION_SEED = 2**31 - 1     # --skip-filler's calibration sequences: no training seed
# The scored sequences are drawn from seeds EVAL_SEED + i * batch_size. Training batches come from
# seed * 10**6 + step, so for run seed 1 these are the batches of steps 3, 3 + batch_size, ...:
# that run's scored sequences of its own task were each trained on once, early (steps 3 to 3 +
# eval_sequences). Kept as it is so that every record scores the same sequences.
EVAL_SEED = 1_000_003
SKIP_STATISTIC = "median"       # what skip_filler calibrates on; a record scored otherwise is redone


@dataclasses.dataclass(frozen=True)
class Settings:
    """Optimization of one run: AdamW, linear warmup then cosine decay to 10% of `lr`."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_sequences: int = 512
    ssm_lr_scale: float = 1.0   # learning rate of the SSM kernels' parameters, relative to `lr`
    # A curriculum, the same for every run: (steps, task parameters) stages trained first, in
    # order, on the task with those parameters changed; the task itself takes the remaining steps.
    # One optimizer and one learning-rate schedule span all the steps.
    curriculum: tuple[tuple[int, tuple[tuple[str, int], ...]], ...] = ()
    # (steps, factor[, every]): the last `steps` steps train with filler skipped at `factor`
    # (`blockstate.ssm.skip`), calibrated when they start on the task at its training length, and
    # again every `every` steps of the stage when given (the thresholds follow the steps as
    # training moves them); the model is scored and kept skipping. Models without a selective SSM
    # train as without it.
    filler_stage: tuple[int, float] | tuple[int, float, int] = ()

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if (self.lr <= 0 or self.weight_decay < 0 or self.grad_clip <= 0 or self.warmup_steps < 0
                or self.ssm_lr_scale <= 0):
            raise ValueError(f"invalid optimization settings {self}")
        ends = self.stage_ends()
        if any(steps < 1 for steps, _ in self.curriculum) or (ends and ends[-1] >= self.steps):
            raise ValueError(f"curriculum stages of {[s for s, _ in self.curriculum]} steps: each "
                             f"needs >= 1 step and together fewer than steps={self.steps}, so that "
                             f"the task itself is trained")
        if self.filler_stage:
            if len(self.filler_stage) not in (2, 3):
                raise ValueError(f"filler_stage={self.filler_stage}: expected (steps, factor) or "
                                 f"(steps, factor, every)")
            steps, factor = self.filler_stage[:2]
            if not (steps >= 1 and factor > 0 and self.skip_from() >= max([1, *ends[-1:]])):
                raise ValueError(f"filler stage of {steps} steps at factor {factor}: it needs >= 1 "
                                 f"step, a factor > 0, and to start after step 0 and after the "
                                 f"curriculum (steps={self.steps}, curriculum ends at step "
                                 f"{ends[-1] if ends else 0})")
            every = self.recalibrate_every()
            if every is not None and every < 1:
                raise ValueError(f"filler stage recalibrated every {every} steps: it needs >= 1")

    def record(self) -> dict[str, Any]:
        """These settings as JSON values, as runs and checkpoints store them (without
        `curriculum` or `filler_stage` when unset, as records written before they existed)."""
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        for name in ("curriculum", "filler_stage"):
            if not getattr(self, name):
                del out[name]
        return out

    def skip_from(self) -> int | None:
        """The step from which the run trains with filler skipped (None: it never does)."""
        return self.steps - self.filler_stage[0] if self.filler_stage else None

    def recalibrate_every(self) -> int | None:
        """Every how many steps of the filler stage skipping is calibrated again (None: only when
        the stage starts)."""
        return self.filler_stage[2] if len(self.filler_stage) == 3 else None

    def calibrates_at(self, step: int) -> bool:
        """Whether skipping is (re)calibrated before training step `step`."""
        start, every = self.skip_from(), self.recalibrate_every()
        if start is None or step < start:
            return False
        return step == start or (every is not None and (step - start) % every == 0)

    def stage_ends(self) -> list[int]:
        """The step at which each curriculum stage ends."""
        return list(itertools.accumulate(steps for steps, _ in self.curriculum))


@dataclasses.dataclass(frozen=True)
class Run:
    """One (task configuration, model, overrides, seed) training run."""

    task: str
    params: tuple[tuple[str, int], ...]        # the task's parameters, sorted
    model: str
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()  # model config overrides (ablations)
    label: str = ""                              # name in the report; default: the model

    @property
    def name(self) -> str:
        return self.label or self.model

    @property
    def task_key(self) -> str:
        return "-".join([self.task] + [f"{k}{v}" for k, v in self.params])

    @property
    def stem(self) -> str:
        """The run's name among its task's runs: NAME-seedS."""
        return f"{self.name}-seed{self.seed}"

    def path(self, out: Path) -> Path:
        return out / "runs" / self.task_key / f"{self.stem}.json"

    def kept_path(self, keep_models: str | Path) -> Path:
        """Where `--keep-models` saves the run's trained model."""
        return Path(keep_models) / self.task_key / self.stem

    def partial_path(self, out: Path) -> Path:
        """The checkpoints of the run while it trains (removed when it finishes)."""
        return self.path(out).with_suffix(".partial")


def model_overrides(run: Run, vocab_size: int, seq_len: int) -> dict[str, Any]:
    """The full overrides of `run`'s model: task vocabulary and length, ablation, and for a baseline
    the MLP width that matches BST:SH:S4's parameter count (as `blockstate reproduce` does)."""
    overrides = {"vocab_size": vocab_size, **dict(run.overrides)}
    block = overrides.get("block_size", 16)
    overrides["max_seq_len"] = -(-seq_len // block) * block
    if "d_ff" not in overrides and run.model not in BST_PRESETS:  # BST variants keep their size
        overrides.update(matched_mlp_width(run.model, SUITE_SIZE, overrides, REFERENCE_MODEL,
                                           PARAM_TOLERANCE))
    return overrides


@torch.no_grad()
def evaluate(model: torch.nn.Module, task, sequences: int, batch_size: int, block_size: int,
             seed: int = EVAL_SEED) -> dict[str, Any]:
    """Accuracy overall and per distance bin on `sequences` held-out sequences of `task` (generated
    on the CPU from `seed`, scored on the model's device), and `exact`: the fraction of sequences
    whose every scored position is right (a whole passkey, every copied symbol)."""
    model.eval()
    device = next(model.parameters()).device
    correct, distance, exact = [], [], []
    for start in range(0, sequences, batch_size):
        batch = task.sample(min(batch_size, sequences - start), seed + start)
        predictions = model(batch.inputs.to(device)).argmax(-1).cpu()             # (B, L)
        c, d = score(predictions, batch)
        correct.append(c)
        distance.append(d)
        exact.append(((predictions == batch.targets) | (batch.targets == IGNORE)).all(1))  # (B,)
    c, d = torch.cat(correct).float(), torch.cat(distance)
    bins = []
    for low, high in block_ranges(block_size, int(d.max()) + 1):  # distance bins
        inside = (d >= low) & (d < high)
        if inside.any():
            bins.append({"low": low, "high": high, "count": int(inside.sum()),
                         "accuracy": float(c[inside].mean())})
    return {"accuracy": float(c.mean()), "exact": float(torch.cat(exact).float().mean()),
            "count": len(c), "bins": bins, "chance": task.chance(), "seq_len": task.seq_len}


def train_run(run: Run, settings: Settings, eval_params: list[dict[str, int]] | None = None,
              log: Callable[[str], None] = print, device: str | torch.device = "cpu",
              checkpoints: Path | None = None, checkpoint_every: int = 0,
              init_from: Path | None = None, keep: Path | None = None,
              skip_factor: float | None = None) -> dict[str, Any]:
    """Train `run` on `device` and return its record (config, parameter count, loss curve,
    evaluations). Batches are generated on the CPU from the run's seed, so they are the same on
    every device. With `checkpoints` (a directory) and `checkpoint_every` > 0, the state is saved
    there every that many steps, and a run that finds a checkpoint there continues from it.
    `init_from` (a run or step directory of the same model, trained on another task setting)
    gives the model its weights before step 0: a curriculum stage; the optimizer, schedule and
    batches start afresh. `settings.curriculum` instead trains the stages within this run. With
    `keep` (a directory), the trained model is saved there as a checkpoint (weights, config, the
    run's settings, its skip thresholds if any; no optimizer), which
    `blockstate.loading.load_model` reads. With `skip_factor`, the record also holds the
    evaluations with filler skipped (`filler_skipped`). `settings.filler_stage` trains the last
    steps with filler skipped; the record says which heads skip (`filler_stage`)."""
    _refuse_skipping_twice(settings, skip_factor)
    task = make_task(run.task, **dict(run.params))
    stages = curriculum_tasks(run, settings)
    overrides = model_overrides(run, task.vocab_size, max(t.seq_len for t in [task, *stages]))
    torch.manual_seed(run.seed)
    model = build_model(run.model, SUITE_SIZE, **overrides).to(device)
    if init_from is not None:
        _initialize(model, init_from, log)
    groups = scaled_parameter_groups(model, settings.weight_decay, settings.ssm_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.98))
    # float32 on every device (tasks' results are compared across machines), the loss on all targets
    train_step = TrainStep(model, optimizer, torch.device(device), precision="fp32",
                           grad_clip=settings.grad_clip)
    losses, start, elapsed, heads = [], 0, 0.0, None
    saved = load_latest_intact(checkpoints, warn=log) if checkpoints is not None else None
    if saved is not None:
        state = saved.train_state
        if state.get("settings") != settings.record() or state.get("run") != _run_key(run):
            raise ValueError(f"{checkpoints} holds a run with other settings ({state.get('settings')}"
                             f", {state.get('run')}); remove it or use the same settings")
        saved.load_model(model)
        saved.load_optimizer(optimizer)
        saved.restore_rng()
        start, losses, elapsed = saved.step, state["losses"], state["train_seconds"]
        if state.get(SKIP_STATE_KEY):
            set_skip_thresholds(model, state[SKIP_STATE_KEY], str(saved.path))
            heads = state["filler_heads"]
        log(f"{run.task_key} {run.name} seed {run.seed}: continuing from step {start}")
    started = time.perf_counter()
    model.train()
    ends = settings.stage_ends()
    for step in range(start, settings.steps):
        if settings.calibrates_at(step):
            heads = skip_filler(model, _calibration(run, settings), settings.filler_stage[1])
            log(f"{run.task_key} {run.name} seed {run.seed}: from step {step} filler skipped in "
                f"{sum(h['skipping'] for h in heads)} of {sum(h['heads'] for h in heads)} heads")
        stage = next((t for t, end in zip(stages, ends, strict=True) if step < end), task)
        batch = stage.sample(settings.batch_size, run.seed * 10**6 + step)
        lr = warmup_cosine(step, settings.lr, settings.warmup_steps, settings.steps)
        result = train_step((batch.inputs, batch.targets), lr)
        if step % 50 == 0 or step == settings.steps - 1:
            losses.append([step, round(result.loss, 5)])
        done = step + 1
        if checkpoints is not None and checkpoint_every > 0 and done % checkpoint_every == 0 \
                and done < settings.steps:
            save_checkpoint(checkpoints, done, model, model.config.to_dict(), {
                "settings": settings.record(), "run": _run_key(run), "losses": losses,
                "train_seconds": elapsed + time.perf_counter() - started,
                **_skip_state(model, heads)}, optimizer, keep=1)
    train_seconds = elapsed + time.perf_counter() - started
    evaluations = evaluate_all(model, run, settings, eval_params)
    if keep is not None:
        save_checkpoint(keep, settings.steps, model, model.config.to_dict(), {
            "settings": settings.record(), "run": _run_key(run), "losses": losses,
            "train_seconds": round(train_seconds, 1), **_skip_state(model, heads)}, keep=1)
    log(f"{run.task_key} {run.name} seed {run.seed}: accuracy {evaluations[0]['accuracy']:.3f} "
        f"(chance {task.chance():.3f}), final loss {losses[-1][1]:.3f}, {train_seconds:.0f} s")
    record = {"task": run.task, "params": dict(run.params), "task_key": run.task_key,
              "model": run.model, "label": run.name, "seed": run.seed,
              "overrides": dict(run.overrides), "model_config": model.config.to_dict(),
              "parameters": model.num_parameters(), "settings": settings.record(),
              "losses": losses, "train_seconds": round(train_seconds, 1),
              "evaluations": evaluations, "torch_threads": torch.get_num_threads(),
              "device": str(device)}
    if settings.filler_stage:
        record["filler_stage"] = {"steps": settings.filler_stage[0],
                                  "factor": settings.filler_stage[1], "from_step":
                                  settings.skip_from(), "statistic": SKIP_STATISTIC,
                                  "calibration_sequences": settings.eval_sequences, "heads": heads or []}
        if settings.recalibrate_every() is not None:
            record["filler_stage"]["recalibrate_every"] = settings.recalibrate_every()
    if skip_factor is not None:
        record["filler_skipped"] = filler_skipped(model, run, settings, eval_params, skip_factor)
    return record


def _refuse_skipping_twice(settings: Settings, skip_factor: float | None) -> None:
    """Runs that train their last steps with filler skipped are scored skipping: scoring them with
    filler skipped again (`skip_factor`) is not defined."""
    if skip_factor is not None and settings.filler_stage:
        raise ValueError("runs that train their last steps with filler skipped are scored "
                         "skipping already; --skip-filler would score them skipping again")


def _calibration(run: Run, settings: Settings) -> torch.Tensor:
    """What skipping is calibrated on: `eval_sequences` sequences of the run's task at its training
    length, from a seed no training batch or scored sequence uses."""
    task = make_task(run.task, **dict(run.params))
    return task.sample(settings.eval_sequences, CALIBRATION_SEED).inputs


def _skip_state(model: torch.nn.Module, heads: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The train-state entries of a model that skips filler: its thresholds and which heads."""
    thresholds = skip_thresholds(model)
    return {SKIP_STATE_KEY: thresholds, "filler_heads": heads} if thresholds else {}


def evaluate_all(model: torch.nn.Module, run: Run, settings: Settings,
                 eval_params: list[dict[str, int]] | None) -> list[dict[str, Any]]:
    """The evaluations of a record: the run's task, then the task with each of `eval_params`."""
    task = make_task(run.task, **dict(run.params))
    block = model.config.block_size
    evaluations = [evaluate(model, task, settings.eval_sequences, settings.batch_size, block)]
    for params in eval_params or []:
        other = make_task(run.task, **{**dict(run.params), **params})
        evaluations.append({"params": params, **evaluate(model, other, settings.eval_sequences,
                                                         settings.batch_size, block)})
    return evaluations


def filler_skipped(model: torch.nn.Module, run: Run, settings: Settings,
                   eval_params: list[dict[str, int]] | None, factor: float) -> dict[str, Any]:
    """The evaluations of `evaluate_all` with the model's long-memory selective heads skipping
    filler (`blockstate.ssm.skip`), calibrated on `eval_sequences` held-out sequences of the run's
    own task; the model is left as it was. A model without a selective SSM is scored unchanged
    (its `heads` list is empty)."""
    heads = skip_filler(model, _calibration(run, settings), factor)
    try:
        evaluations = evaluate_all(model, run, settings, eval_params)
    finally:
        stop_skipping(model)
    return {"factor": factor, "statistic": SKIP_STATISTIC, "calibration_sequences":
            settings.eval_sequences, "heads": heads, "evaluations": evaluations}


def curriculum_tasks(run: Run, settings: Settings) -> list:
    """The task of each curriculum stage of `run`: its task with the stage's parameters changed.
    A stage must keep the task's vocabulary (one model trains on all of them)."""
    params = dict(run.params)
    task = make_task(run.task, **params)
    stages = []
    for steps, changed in settings.curriculum:
        stage = make_task(run.task, **{**params, **dict(changed)})
        if stage.vocab_size != task.vocab_size:
            raise ValueError(f"curriculum stage {dict(changed)} ({steps} steps) of {run.task_key} "
                             f"has a vocabulary of {stage.vocab_size}, the task {task.vocab_size}: "
                             f"a stage must keep the vocabulary")
        stages.append(stage)
    return stages


def _initialize(model: torch.nn.Module, source: Path, log: Callable[[str], None]) -> None:
    """Load the weights of the checkpoint at `source` into `model` (the same model but for the
    training length)."""
    checkpoint = load_checkpoint(source)
    ours = {k: v for k, v in model.config.to_dict().items() if k != "max_seq_len"}
    theirs = {k: v for k, v in checkpoint.model_config.items() if k != "max_seq_len"}
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"{source} holds another model than this run builds (fields {differ})")
    checkpoint.load_model(model)  # strict: every weight present, of the same shape
    log(f"model initialized from {checkpoint.path} (step {checkpoint.step})")


def _skipped_from_kept(run: Run, record: dict[str, Any], settings: Settings,
                       eval_params: list[dict[str, int]] | None, keep_models: str | Path | None,
                       factor: float, device: str | torch.device) -> dict[str, Any]:
    """`filler_skipped` for a finished record, from the model its run kept."""
    source = run.kept_path(keep_models) if keep_models is not None else None
    if source is None or not source.exists():
        raise ValueError(f"{run.task_key} {run.stem} is finished but was not kept, so it cannot be "
                         f"scored with filler skipped: give --keep-models the directory its run "
                         f"kept it in, or train it again under another --out")
    from ..loading import load_model

    model, checkpoint = load_model(source, device)
    if checkpoint.model_config != record["model_config"]:
        raise ValueError(f"{source} holds another model than {run.task_key} {run.stem}'s record")
    return filler_skipped(model, run, settings, eval_params, factor)


def _run_key(run: Run) -> dict[str, Any]:
    """What identifies a run in its checkpoint (JSON values)."""
    return json.loads(json.dumps(dataclasses.asdict(run)))


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def run_all(runs: list[Run], settings: Settings, out: str | Path,
            eval_params: list[dict[str, int]] | None = None,
            log: Callable[[str], None] = print, device: str | torch.device = "cpu",
            checkpoint_every: int = 200, keep_models: str | Path | None = None,
            skip_factor: float | None = None) -> list[dict[str, Any]]:
    """Execute every run whose result file does not exist yet, continuing from its checkpoint
    when it has one (saved every `checkpoint_every` steps; 0: none); return all records. With
    `keep_models`, each run trained here saves its model to keep_models/TASK_KEY/NAME-seedS.
    With `skip_factor`, every record gets the evaluations with filler skipped at that factor:
    a finished record without them is scored from its kept model (under `keep_models`)."""
    _refuse_skipping_twice(settings, skip_factor)  # before any finished record is rescored
    out = Path(out)
    records = []
    for i, run in enumerate(runs):
        path = run.path(out)
        if path.exists():
            record = json.loads(path.read_text())
            if record["settings"] != settings.record():
                raise ValueError(f"{path} was trained with different settings "
                                 f"({record['settings']}); use another --out or the same settings")
            skipped = record.get("filler_skipped") or {}
            if skip_factor is not None and (skipped.get("factor"), skipped.get("statistic")) != (
                    skip_factor, SKIP_STATISTIC):
                record["filler_skipped"] = _skipped_from_kept(run, record, settings, eval_params,
                                                              keep_models, skip_factor, device)
                write_json(path, record)
            records.append(record)
            continue
        log(f"[{i + 1}/{len(runs)}] training {run.task_key} {run.name} seed {run.seed}")
        partial = run.partial_path(out)
        keep = run.kept_path(keep_models) if keep_models is not None else None
        record = train_run(run, settings, eval_params, log, device, partial, checkpoint_every,
                           keep=keep, skip_factor=skip_factor)
        write_json(path, record)
        shutil.rmtree(partial, ignore_errors=True)
        records.append(record)
    return records
