"""The run directory of `blockstate train`: what belongs in it, an exclusive lock for its one
writer, safe removal on `--overwrite`, and append-only metrics that survive a kill at any moment.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .fileio import atomic_write

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
# The file that makes a directory a blockstate run: written when a run starts, before anything else.
RUN_MARKER = "blockstate-run.json"
RUN_FORMAT = "blockstate-run"
# Everything `train` (and `reproduce`, which evaluates into the run) writes in a run directory.
RUN_ENTRIES = frozenset({RUN_MARKER, "train_config.json", METRICS_FILE, "checkpoints", "tokenizer",
                         "summary.json", "eval.json", "tensorboard", "wandb", LOCK_FILE})


class RunLock:
    """An exclusive advisory lock on `run_dir/.lock`, held while the process lives (the OS releases
    it when the process dies, however it dies). The file records the holder's PID."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform (Windows): nothing to hold
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"{self.path.parent} is in use by another process (PID {holder}); "
                             f"wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a blockstate run: it holds the run marker, or (a run written before the
    marker existed) a train_config.json whose content is a blockstate run record. Folder names
    alone (a `checkpoints/` of another tool) never make a run."""
    path = Path(path)
    marker = _json_object(path / RUN_MARKER)
    if marker is not None:
        return marker.get("format") == RUN_FORMAT
    record = _json_object(path / "train_config.json")
    return record is not None and {"train", "model", "corpus"} <= set(record)


def mark_run(run_dir: Path) -> None:
    """Write the run marker (idempotent), so later requests recognise the directory as a run."""
    if _json_object(Path(run_dir) / RUN_MARKER) is None:
        atomic_write(Path(run_dir) / RUN_MARKER, json.dumps({"format": RUN_FORMAT, "version": 1}) + "\n")


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _entries(run_dir: Path, names: frozenset[str] | None = None) -> list[str]:
    """The entries of `run_dir` (only those among `names` when given) but the lock file, sorted,
    directories with a trailing slash."""
    return sorted(entry.name + ("/" if entry.is_dir() else "") for entry in run_dir.iterdir()
                  if entry.name != LOCK_FILE and (names is None or entry.name in names))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def check_clearable(run_dir: Path, keep_inside: list[Path]) -> None:
    """Raise ValueError unless `run_dir` may be cleared for a new run: it does not exist, is
    empty, or is a run (its other files, such as a plot, are then kept by `clear_run`); and none
    of `keep_inside` (e.g. the training corpus) lies inside it. Nothing is removed."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.exists():
        return
    if not is_run_dir(run_dir):
        present = _entries(run_dir)
        if present:
            raise ValueError(f"--overwrite: {run_dir} is not a blockstate run (no {RUN_MARKER}) and "
                             f"holds {_shown(present)}; nothing was removed. Choose another --out")
    for path in keep_inside:
        path = Path(path).resolve()
        if path == run_dir or run_dir in path.parents:
            raise ValueError(f"--overwrite: {path} lies inside the run directory {run_dir}; "
                             f"nothing was removed. Keep data outside --out")


def check_writable(run_dir: Path) -> None:
    """Raise ValueError when a new run would replace files in `run_dir` that no run wrote: the
    directory exists, is not a run, and holds entries of the names a run writes."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or is_run_dir(run_dir):
        return
    taken = _entries(run_dir, RUN_ENTRIES)
    if taken:
        raise ValueError(f"{run_dir} is not a blockstate run (no {RUN_MARKER}) but holds "
                         f"{_shown(taken)}, which a run would replace; nothing was changed. "
                         f"Choose another --out")


def clear_run(run_dir: Path) -> None:
    """Remove what a run wrote in `run_dir` (after `check_clearable`), keeping the lock file and
    every other file: in checkpoints/ only the step directories, the `latest` pointer and what
    interrupted saves left."""
    import shutil

    from .checkpoint import is_checkpoint_entry

    for entry in Path(run_dir).iterdir():
        if entry.name not in RUN_ENTRIES or entry.name in (LOCK_FILE, RUN_MARKER):
            continue
        if entry.name == "checkpoints" and entry.is_dir():
            for item in entry.iterdir():
                if is_checkpoint_entry(item.name):
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
            if not any(entry.iterdir()):
                entry.rmdir()
        elif entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """The record with non-finite numbers (a diverged validation loss) as null, named under
    "non_finite", so that every line stays valid JSON."""
    bad = sorted(key for key, value in record.items() if isinstance(value, float)
                 and not math.isfinite(value))
    if not bad:
        return record
    return {**{key: None if key in bad else value for key, value in record.items()}, "non_finite": bad}


def read_metrics(path: Path, warn: Any = None) -> list[dict[str, Any]]:
    """The records of a metrics file. A partial last line (a kill or a full disk mid-write) is
    dropped with a warning; any other unreadable line raises ValueError naming file and line."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            last = number == len(lines) or (number == len(lines) - 1 and not lines[-1])
            if last and not text.endswith("\n"):
                if warn is not None:
                    warn(f"warning: {path}: dropping its partial last line {number} ({e})")
                continue
            raise ValueError(f"{path}: line {number} is not a metrics record ({e})") from None
        records.append(record)
    return records


METRIC_SINKS = ("auto", "none", "tensorboard", "wandb")


def check_metric_sinks(sinks: tuple[str, ...]) -> None:
    """Raise ValueError for an unknown sink, or, naming the pip command, for a requested sink that
    is not installed (train calls this before a run directory is created)."""
    unknown = sorted(set(sinks) - set(METRIC_SINKS))
    if unknown:
        raise ValueError(f"unknown metrics sink(s) {unknown}; allowed: {', '.join(METRIC_SINKS)}")
    if "tensorboard" in sinks and _summary_writer() is None:
        raise ValueError("--log-to tensorboard needs the tensorboard package: pip install "
                         "tensorboard")
    if "wandb" in sinks:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--log-to wandb needs the wandb package: pip install wandb") from None


def _summary_writer():
    """torch's TensorBoard SummaryWriter class, or None when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # torch's TensorBoard support needs the tensorboard package
        return None
    return SummaryWriter


class MetricsLog:
    """Append-only JSON Lines metrics, plus the `sinks` asked for: "auto" (TensorBoard when it is
    installed, with a notice either way), "none", "tensorboard", "wandb" (Weights & Biases; its
    WANDB_* environment variables apply, e.g. WANDB_MODE=offline). Each record is one `write` of
    one line. On resume the file is cut back to the checkpoint's step by writing a new file and
    renaming it over the old one, so a kill never leaves it half-written."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool, warn: Any = None,
                 sinks: tuple[str, ...] = ("auto",), run_config: dict | None = None):
        self.path, self.enabled, self.writer, self.wandb_run = path, enabled, None, None
        check_metric_sinks(sinks)
        if not enabled:
            return
        notice = warn or (lambda message: None)
        if resume_step is not None and path.exists():  # drop what was logged after the checkpoint
            kept = [r for r in read_metrics(path, warn) if r.get("step", 0) <= resume_step]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept), durable=True)
        elif path.exists():
            read_metrics(path, warn)  # fail now, naming the file, rather than at the end
        if "tensorboard" in sinks or "auto" in sinks:
            writer = _summary_writer()
            directory = path.parent / "tensorboard"
            if writer is None:  # only "auto" gets here: check_metric_sinks refused "tensorboard"
                notice("TensorBoard is not installed (pip install tensorboard): metrics go to "
                       "metrics.jsonl only")
            else:
                notice(f"TensorBoard scalars: tensorboard --logdir {directory}")
                self.writer = writer(str(directory))
        if "wandb" in sinks:
            import wandb

            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "blockstate"),
                                        name=path.parent.name, config=run_config or {},
                                        resume="allow", dir=str(path.parent))
            notice(f"Weights & Biases run: {getattr(self.wandb_run, 'url', None) or 'offline'}")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(_finite(record), allow_nan=False) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        prefix = record.get("split", "train")
        scalars = {f"{prefix}/{key}": value for key, value in record.items()
                   if isinstance(value, float) and key != "elapsed"}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])
        if self.wandb_run is not None and scalars:
            self.wandb_run.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
