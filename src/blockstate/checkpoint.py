"""Training checkpoints for exact resume, written atomically and read without unpickling anything
(except the torch.distributed.checkpoint metadata of an --fsdp run's sharded/ directory).

Layout of `run_dir/checkpoints/`:

    step-00000100/      one complete checkpoint:
      model.safetensors   model.state_dict()
      checkpoint.json     format marker, version, step, model config, train state, sha256 of every file
      optimizer.safetensors, optimizer.json   optimizer.state_dict(): tensors | everything else
      sharded/            instead, for a run trained with --fsdp: the model and optimizer state as
                          torch.distributed.checkpoint shards (blockstate.fsdp); model.safetensors
                          is then written only by the last checkpoint of a run
      rng.safetensors     torch CPU RNG state and, when CUDA is initialized, every device's
      memory.safetensors  what a segment-recurrent model carries into the next batch (optional)
      tokenizer/          a copy of the tokenizer files
    latest              the name of the newest complete step directory

A checkpoint is written into a hidden temporary directory (`staging_dir`: where every process of an
FSDP run writes its shards first) and renamed into place; `latest` is then replaced atomically.
Whenever the process dies, `latest` names a complete checkpoint or is absent.
One process writes to a run directory at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig
from .fileio import atomic_write, fsync_dir, fsync_file, sha256_file

FORMAT = "blockstate-checkpoint"
# 1: the model config as flat fields; 2: nested components (config.py's CONFIG_FORMAT). Version 1
# checkpoints are read, their model config converted.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_FILE = "rng.safetensors"
MEMORY_FILE = "memory.safetensors"
TOKENIZER_DIR = "tokenizer"
SHARDED_DIR = "sharded"

_STEP_DIR = re.compile(r"step-\d{8,}")
_TEMP_DIR = re.compile(r"\.(step-\d{8,})\.tmp-\d+")          # group 1: the step dir it becomes
_STALE = re.compile(r"\.step-\d{8,}\.(tmp|old)-\d+|\.latest\.\d+\.tmp")  # + atomic_write's for latest


def is_checkpoint_entry(name: str) -> bool:
    """Whether `name`, inside a run's checkpoints/, is something `save_checkpoint` writes."""
    return name == LATEST or bool(_STEP_DIR.fullmatch(name) or _STALE.fullmatch(name))


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the path and the problem."""


@dataclass
class Checkpoint:
    """A checkpoint directory whose files were verified by `load_checkpoint`. Tensors are read on
    demand, onto the CPU; `files` maps each file (relative to `path`) to its sha256."""

    path: Path
    step: int
    model_config: dict[str, Any]
    train_state: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict, repr=False)

    def model_state(self) -> dict[str, torch.Tensor]:
        if MODEL_FILE not in self.files:
            raise CheckpointError(
                f"checkpoint {self.path} holds its weights only as FSDP shards ({SHARDED_DIR}/); "
                f"the last checkpoint of the run has {MODEL_FILE}: finish the run, or resume it "
                f"(`blockstate train --resume`) to write one")
        return load_file(self.path / MODEL_FILE)

    @property
    def sharded_dir(self) -> Path | None:
        """The torch.distributed.checkpoint directory of model and optimizer state (an FSDP run's
        checkpoint), or None. Its metadata is a pickle: load it only from a run you trust."""
        if any(name.startswith(SHARDED_DIR + "/") for name in self.files):
            return self.path / SHARDED_DIR
        return None

    def load_model(self, model: nn.Module) -> None:
        """Load the weights strictly: every key present in both with the same shape."""
        load_weights_strictly(model, self.model_state(), f"checkpoint {self.path}",
                              "build the model from Checkpoint.model_config")

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the optimizer's state; its parameter groups must match the saved ones in size."""
        tensors = self._tensors(OPTIMIZER_TENSORS, "optimizer")
        saved = json.loads(self._text(OPTIMIZER_JSON, "optimizer"))
        state = {int(index): entries for index, entries in saved["state"].items()}
        for key, tensor in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = tensor
        groups, live = saved["param_groups"], optimizer.param_groups
        saved_sizes = [len(group["params"]) for group in groups]
        live_sizes = [len(group["params"]) for group in live]
        if saved_sizes != live_sizes:
            raise CheckpointError(
                f"checkpoint {self.path} holds optimizer state for parameter groups of sizes "
                f"{saved_sizes}, but this optimizer's groups have sizes {live_sizes}")
        # JSON turned tuples (e.g. AdamW's betas) into lists; give them back their live type.
        groups = [{key: _like(value, live_group.get(key)) for key, value in group.items()}
                  for group, live_group in zip(groups, live, strict=True)]
        optimizer.load_state_dict({"state": state, "param_groups": groups})

    def memory(self, device: torch.device | str = "cpu") -> Any:
        """The carried `blockstate.memory.Memory` saved with this checkpoint, or None."""
        from .memory import Memory

        if MEMORY_FILE not in self.files:
            return None
        try:
            return Memory.from_tensors(self._tensors(MEMORY_FILE, "memory")).to(device)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {self.path}: {MEMORY_FILE} is {e}") from None

    def restore_rng(self) -> None:
        """Restore torch's CPU RNG and, when saved and available, the CUDA devices' RNGs."""
        states = self._tensors(RNG_FILE, "RNG")
        torch.set_rng_state(states["cpu"])
        cuda = [states[f"cuda.{i}"] for i in range(len(states) - 1)]
        if cuda and torch.cuda.is_available():
            for device, state in enumerate(cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, device)

    @property
    def tokenizer_dir(self) -> Path | None:
        """The copied tokenizer files, or None when the checkpoint was saved without them."""
        if any(name.startswith(TOKENIZER_DIR + "/") for name in self.files):
            return self.path / TOKENIZER_DIR
        return None

    def _require(self, name: str, what: str) -> Path:
        if name not in self.files:
            raise CheckpointError(f"checkpoint {self.path} has no {what} state (it was saved without one)")
        return self.path / name

    def _tensors(self, name: str, what: str) -> dict[str, torch.Tensor]:
        return load_file(self._require(name, what))

    def _text(self, name: str, what: str) -> str:
        return self._require(name, what).read_text(encoding="utf-8")


def load_weights_strictly(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                          hint: str) -> None:
    """model.load_state_dict(state) when every key is present in both with the same shape; else a
    CheckpointError naming `source`, the misfit and the `hint`."""
    expected = model.state_dict()
    misfit = f"{source} does not fit this {type(model).__name__}"
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{misfit}: missing keys {_preview(missing)}, unexpected keys "
                              f"{_preview(unexpected)}; {hint}")
    for key, value in expected.items():
        if value.shape != state[key].shape:
            raise CheckpointError(
                f"{misfit}: {key} has shape {tuple(state[key].shape)} in the checkpoint but "
                f"{tuple(value.shape)} in the model; {hint}")
    model.load_state_dict(state)


def save_checkpoint(run_dir: Path, step: int, model: nn.Module | dict[str, torch.Tensor] | None,
                    model_config: dict, train_state: dict,
                    optimizer: torch.optim.Optimizer | None = None,
                    tokenizer_dir: Path | None = None, keep: int = 2,
                    memory: dict[str, torch.Tensor] | None = None,
                    staged: Path | None = None) -> Path:
    """Writes run_dir/checkpoints/step-{step:08d}/ and points run_dir/checkpoints/latest at it;
    returns the step dir. Then keeps only the `keep` newest step dirs (by step, `latest` always
    among them) and removes what interrupted saves left behind. `model`: the model or its state
    dict (None: its weights are in `staged`'s shards). `model_config` and `train_state`
    must hold JSON values; `memory` is a segment-recurrent model's carried memory
    (`Memory.tensors()`); `staged`: the `staging_dir` other processes already wrote the
    SHARDED_DIR into, installed with the rest. Everything is validated before anything is written."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step={step!r} is not valid; it must be an integer >= 0")
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise CheckpointError(f"keep={keep!r} is not valid; it must be an integer >= 1")
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step,
                "model_config": _checked_json(model_config, "model_config"),
                "train_state": _checked_json(train_state, "train_state")}
    if staged is None and model is None:
        raise CheckpointError("a checkpoint needs the model's weights: give the model or a staged "
                              "directory of its shards")
    tensor_files = {RNG_FILE: _rng_state()}
    if model is not None:
        state = model.state_dict() if isinstance(model, nn.Module) else model
        tensor_files[MODEL_FILE] = _cpu_tensors(state, "model.state_dict()")
    if memory is not None:
        tensor_files[MEMORY_FILE] = _cpu_tensors(memory, "memory")
    json_files = {}
    if optimizer is not None:
        tensor_files[OPTIMIZER_TENSORS], json_files[OPTIMIZER_JSON] = _split_optimizer_state(
            optimizer.state_dict())
    copies = _tokenizer_files(Path(tokenizer_dir)) if tokenizer_dir is not None else {}

    checkpoints = Path(run_dir) / CHECKPOINTS
    final = checkpoints / f"step-{step:08d}"
    temp = staging_dir(run_dir, step, os.getpid()) if staged is None else Path(staged)
    present = ([path.relative_to(temp).as_posix() for path in sorted((temp / SHARDED_DIR).rglob("*"))
                if path.is_file()] if staged is not None else [])
    try:
        _write_step_dir(temp, manifest, tensor_files, json_files, copies, present)
    except Exception as e:  # a full disk (OSError, or safetensors' own error): leave nothing
        shutil.rmtree(temp, ignore_errors=True)  # behind; the previous checkpoint stands
        raise CheckpointError(f"could not write the checkpoint of step {step} in {checkpoints}: "
                              f"{_write_failure(e)}; the previous checkpoint is intact") from None
    _install(checkpoints, temp, final)
    _prune(checkpoints, final.name, keep)
    return final


def staging_dir(run_dir: Path | str, step: int, writer: int) -> Path:
    """The empty hidden directory where the checkpoint of `step` is written before
    `save_checkpoint` installs it; `writer`: the process id of the one process that writes the
    run (process 0 of an FSDP run, whose other processes write their shards there too)."""
    checkpoints = Path(run_dir) / CHECKPOINTS
    checkpoints.mkdir(parents=True, exist_ok=True)
    _finish_interrupted_install(checkpoints)
    temp = checkpoints / f".step-{step:08d}.tmp-{writer}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    return temp


def load_checkpoint(path: Path | str) -> Checkpoint:
    """path: a run dir (uses checkpoints/latest), its checkpoints/ dir, or a step dir. Verifies the
    format, the version and every file's sha256 before returning."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a blockstate checkpoint (expected a directory)")
    step_dir = path
    if not (path / MANIFEST).exists():
        if (path / CHECKPOINTS).is_dir():
            run_dir = path
        elif path.name == CHECKPOINTS or (path / LATEST).exists():
            run_dir = path.parent
        else:
            raise CheckpointError(f"{path} is not a blockstate checkpoint (no {MANIFEST}, and no "
                                  f"{CHECKPOINTS}/ directory of a run)")
        step_dir = latest_checkpoint(run_dir)
        if step_dir is None:
            raise CheckpointError(f"no checkpoint at {path}: {run_dir / CHECKPOINTS} has no complete "
                                  f"checkpoint (no {LATEST}); pass a step directory to load one explicitly")
    manifest = _read_manifest(step_dir)
    _verify_files(step_dir, manifest["files"])
    try:  # in the current format (a version 1 checkpoint's flat config converted)
        model_config = ModelConfig.from_dict(manifest["model_config"]).to_dict()
    except ValueError as e:
        raise CheckpointError(f"checkpoint {step_dir} has an invalid model config: {e}") from None
    return Checkpoint(path=step_dir, step=manifest["step"], model_config=model_config,
                      train_state=manifest["train_state"], files=manifest["files"])


def load_latest_intact(run_dir: Path | str, warn: Any = None) -> Checkpoint | None:
    """The newest checkpoint of `run_dir` that loads and verifies: `latest`, or, when it is missing
    or corrupt, the newest intact older step directory; `warn(message)` is told what was skipped.
    None when the run has no step directory at all; CheckpointError (naming each directory and
    why) when it has some and none loads."""
    checkpoints = Path(run_dir) / CHECKPOINTS
    if not checkpoints.is_dir():
        return None
    _finish_interrupted_install(checkpoints)
    steps = sorted((d for d in checkpoints.iterdir() if _STEP_DIR.fullmatch(d.name) and d.is_dir()),
                   key=lambda d: int(d.name.removeprefix("step-")), reverse=True)
    try:
        latest = latest_checkpoint(run_dir)
    except CheckpointError:
        latest = None
    if latest is not None:
        steps = [latest] + [d for d in steps if d != latest]
    failures = []
    for step_dir in steps:
        try:
            return load_checkpoint(step_dir)
        except CheckpointError as e:
            failures.append(f"{step_dir.name}: {e}")
            if warn is not None:
                warn(f"warning: skipping checkpoint {step_dir.name}: {e}")
    if failures:  # never treated as "no checkpoint": a caller would start over and prune them
        raise CheckpointError(f"no checkpoint of {run_dir} loads ({'; '.join(failures)}); nothing was "
                              f"changed. Restore the files, or pass --overwrite to start the run over")
    return None


def remove_temporary(run_dir: Path | str) -> None:
    """Remove what interrupted saves left in run_dir/checkpoints (completing an interrupted install
    first). Only for the one process that writes the run."""
    checkpoints = Path(run_dir) / CHECKPOINTS
    if not checkpoints.is_dir():
        return
    _finish_interrupted_install(checkpoints)
    _remove_stale(checkpoints, lenient=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The step dir that run_dir/checkpoints/latest names; None when the run has no complete
    checkpoint."""
    checkpoints = Path(run_dir) / CHECKPOINTS
    name = _read_latest(checkpoints)
    if name is None:
        return None
    path = checkpoints / name
    temp = _TEMP_DIR.fullmatch(name)
    if temp and not path.is_dir():  # a re-save died after renaming its temporary dir into place
        path = checkpoints / temp.group(1)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{checkpoints / LATEST} names {name!r}, but {path} is not a complete "
                              f"checkpoint; pass a step directory to load one explicitly")
    return path


# ---------------------------------------------------------------- writing
def _write_step_dir(directory: Path, manifest: dict[str, Any], tensor_files: dict[str, dict],
                    json_files: dict[str, str], copies: dict[str, Path],
                    present: list[str]) -> None:
    """Write every file into `directory`, then checkpoint.json with the sha256 of these and of the
    files already `present` there, all durably."""
    for name, tensors in tensor_files.items():
        save_file(tensors, directory / name, metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
    for name, text in json_files.items():
        (directory / name).write_text(text, encoding="utf-8")
    for name, source in copies.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, directory / name)
    files = {}
    for name in [*tensor_files, *json_files, *copies, *present]:
        fsync_file(directory / name)
        files[name] = sha256_file(directory / name)
    (directory / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2), encoding="utf-8")
    fsync_file(directory / MANIFEST)
    for subdir in sorted({(directory / name).parent for name in files}, reverse=True):
        fsync_dir(subdir)


def _write_failure(error: Exception) -> str:
    """One readable phrase for why a checkpoint file could not be written."""
    if isinstance(error, OSError):
        return str(error.strerror or error)
    text = str(error)
    if "code: 28" in text or "StorageFull" in text:  # safetensors wraps the OS error in its own
        return "No space left on device"
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _install(checkpoints: Path, temp: Path, final: Path) -> None:
    """Rename the complete `temp` to `final`, replacing an existing `final`, with `latest` naming a
    complete checkpoint at every instant (`latest_checkpoint` maps a vanished temp name to `final`)."""
    if final.exists():
        _write_latest(checkpoints, temp.name)  # `latest` may name the `final` about to be replaced
        _discard(final)
    os.rename(temp, final)
    fsync_dir(checkpoints)
    _write_latest(checkpoints, final.name)


def _finish_interrupted_install(checkpoints: Path) -> None:
    """If `latest` names a temporary dir, a re-save died mid-install: complete it."""
    name = _read_latest(checkpoints)
    temp = _TEMP_DIR.fullmatch(name) if name is not None else None
    if temp and (checkpoints / name).is_dir():
        _install(checkpoints, checkpoints / name, checkpoints / temp.group(1))


def _prune(checkpoints: Path, latest: str, keep: int) -> None:
    """Keep `latest` and the keep - 1 newest other step dirs; remove leftovers of interrupted saves."""
    others = sorted((d for d in checkpoints.iterdir()
                     if _STEP_DIR.fullmatch(d.name) and d.is_dir() and d.name != latest),
                    key=lambda d: int(d.name.removeprefix("step-")), reverse=True)
    for stale in others[keep - 1:]:
        _discard(stale)
    _remove_stale(checkpoints)


def _remove_stale(checkpoints: Path, lenient: bool = False) -> None:
    """Remove the temporary and half-discarded entries interrupted saves leave behind (with
    `lenient`, an entry that cannot be removed is left in place)."""
    for entry in checkpoints.iterdir():
        if _STALE.fullmatch(entry.name):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=lenient)
            else:
                entry.unlink(missing_ok=lenient)


def _discard(directory: Path) -> None:
    """Remove a step dir: first renamed out of the step-* names, so it vanishes in one step."""
    trash = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(directory, trash)
    shutil.rmtree(trash)


def _write_latest(checkpoints: Path, name: str) -> None:
    atomic_write(checkpoints / LATEST, name + "\n", durable=True)


def _read_latest(checkpoints: Path) -> str | None:
    path = checkpoints / LATEST
    if not path.is_file():
        return None
    name = path.read_text(encoding="utf-8").strip()
    if not (_STEP_DIR.fullmatch(name) or _TEMP_DIR.fullmatch(name)):
        raise CheckpointError(f"{path} names {name!r}, which is not a checkpoint directory name "
                              f"(step-NNNNNNNN); delete {path} or write a step directory's name in it")
    return name


# ---------------------------------------------------------------- state -> tensors and JSON
def _cpu_tensors(state: dict[str, Any], what: str) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors of `state`; tensors sharing memory (tied weights) become copies,
    which safetensors requires."""
    tensors, storages = {}, set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{what}[{key!r}] is a {type(value).__name__}, not a tensor; only "
                                  f"tensors can be saved there")
        tensor = value.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    return tensors


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of `state` under f"{param_index}.{name}", and the JSON of everything else."""
    tensors, entries = {}, {}
    for index, param_state in state_dict["state"].items():
        if not isinstance(index, int) or isinstance(index, bool):
            raise CheckpointError(f"optimizer state key {index!r} is not a parameter index; only "
                                  f"optimizers whose state is keyed by parameter index can be saved")
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                entries.setdefault(str(index), {})[name] = value
    text = _json_text({"state": entries, "param_groups": state_dict["param_groups"]},
                      "optimizer.state_dict()")
    return _cpu_tensors(tensors, "optimizer.state_dict()"), text


def _rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        states.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _json_text(value: Any, what: str) -> str:
    def reject(item: Any) -> None:
        raise CheckpointError(f"{what} holds a {type(item).__name__} ({_short(item)}); it may hold only "
                              f"JSON values: dicts, lists, strings, numbers, booleans and None")

    try:
        return json.dumps(value, indent=2, default=reject)
    except TypeError as e:  # e.g. a dict key that is a tuple
        raise CheckpointError(f"{what} is not JSON-serializable: {e}") from None


def _checked_json(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} must be a dict, got {type(value).__name__}")
    _json_text(value, what)
    return value


def _tokenizer_files(directory: Path) -> dict[str, Path]:
    """Checkpoint-relative names of the tokenizer's files -> their sources."""
    if not directory.is_dir():
        raise CheckpointError(f"tokenizer_dir {directory} is not a directory")
    files = {f"{TOKENIZER_DIR}/{source.relative_to(directory).as_posix()}": source
             for source in sorted(directory.rglob("*")) if source.is_file()}
    if not files:
        raise CheckpointError(f"tokenizer_dir {directory} holds no files")
    return files


# ---------------------------------------------------------------- reading
def _read_manifest(step_dir: Path) -> dict[str, Any]:
    path = step_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{step_dir} is not a blockstate checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{step_dir} is not a blockstate checkpoint ({MANIFEST} is not valid "
                              f"JSON: {e})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{step_dir} is not a blockstate checkpoint ({MANIFEST} holds a "
                              f"{type(manifest).__name__}, not an object)")
    found = manifest.get("format")
    if found != FORMAT:
        raise CheckpointError(f"{step_dir} is not a blockstate checkpoint ({MANIFEST} has "
                              f"format={found!r}, expected {FORMAT!r})")
    if manifest.get("version") not in READ_VERSIONS:
        raise CheckpointError(f"checkpoint {step_dir} has format version {manifest.get('version')!r}; "
                              f"this blockstate reads versions {READ_VERSIONS[0]}-{READ_VERSIONS[-1]}: "
                              f"upgrade blockstate to load it")
    for key, kind in (("step", int), ("model_config", dict), ("train_state", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"checkpoint file {path} is corrupted: {key!r} is missing or not "
                                  f"a {kind.__name__}")
    if MODEL_FILE not in manifest["files"] and not any(
            str(name).startswith(SHARDED_DIR + "/") for name in manifest["files"]):
        raise CheckpointError(f"checkpoint file {path} is corrupted: it lists no {MODEL_FILE} and "
                              f"no {SHARDED_DIR}/")
    return manifest


def _verify_files(step_dir: Path, files: dict[str, Any]) -> None:
    """Every listed file exists inside `step_dir`, has its recorded sha256, and parses."""
    for name, expected in files.items():
        path = step_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"checkpoint file {step_dir / MANIFEST} is corrupted: it lists "
                                  f"{name!r}, which lies outside the checkpoint")
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (listed in {step_dir / MANIFEST})")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"checkpoint file {path} is corrupted: its sha256 {actual[:16]}... "
                                  f"differs from the recorded {str(expected)[:16]}...")
        if name.endswith(".safetensors"):
            try:
                with safe_open(path, "pt") as f:
                    f.keys()
            except SafetensorError as e:
                raise CheckpointError(f"checkpoint file {path} is corrupted: {e}") from None


def _like(value: Any, live: Any) -> Any:
    return tuple(value) if isinstance(value, list) and isinstance(live, tuple) else value


def _preview(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "CheckpointError", "latest_checkpoint",
           "load_checkpoint", "load_weights_strictly", "save_checkpoint", "staging_dir"]
