"""A trained model as a self-contained directory in the Hugging Face layout:

    config.json         "model_type": "blockstate", "architectures", and every ModelConfig field
    model.safetensors   the weights (a tied output head is the embedding, not stored twice)
    tokenizer/          the tokenizer's files (`blockstate.data.load_tokenizer` reads them)

`BlockStateLM.save_pretrained(directory, tokenizer)` writes it, `BlockStateLM.from_pretrained(
directory)` reads it back, `blockstate.load(directory)` returns model and tokenizer, and
`blockstate export RUN DIR` turns a training run into one. With the optional `blockstate[hf]` extra,
`transformers.AutoModelForCausalLM.from_pretrained(directory)` loads the same directory (see
`blockstate.hf`). The tokenizer lives in a subdirectory because its `tokenizer.json` is not the
`tokenizers` library's format of that name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load_weights_strictly
from .config import ModelConfig
from .fileio import atomic_write

MODEL_TYPE = "blockstate"
ARCHITECTURE = "BlockStateForCausalLM"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def is_pretrained_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def save_pretrained(model, directory: str | Path, tokenizer=None) -> Path:
    """Write `model` (and `tokenizer`) into `directory`; config.json is written last, so a
    directory with a config.json is complete. Returns the directory."""
    from safetensors.torch import save_file

    from . import __version__

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    if tokenizer is not None and tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model was built "
                         f"for vocab_size={model.config.vocab_size}")
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE,
                  lambda path: save_file(state, str(path), metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "torch_dtype": dtype,
              "blockstate_version": __version__, **model.config.to_dict()}
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(directory / CONFIG_FILE, text)
    return directory


def read_config(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig of a pretrained directory, and the other keys of its config.json."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a saved blockstate model: {CONFIG_FILE} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        found = data.get("model_type") if isinstance(data, dict) else None
        raise CheckpointError(f"{path} is not a blockstate model config (model_type={found!r}, "
                              f"expected {MODEL_TYPE!r})")
    fields = set(ModelConfig.field_names())
    try:
        config = ModelConfig.from_dict({k: v for k, v in data.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, {k: v for k, v in data.items() if k not in fields}


def load_pretrained(directory: str | Path, device: torch.device | str = "cpu"):
    """The model saved in `directory`, in eval mode on `device`. Nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import BlockStateLM

    config, _ = read_config(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has a {CONFIG_FILE} but no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is corrupt or not a safetensors file: {e}") from None
    prefix = "model."  # written by transformers' save_pretrained of blockstate.hf's model
    if state and all(name.startswith(prefix) for name in state):
        state = {name[len(prefix):]: t for name, t in state.items()}
    model = BlockStateLM(config)
    load_weights_strictly(model, state, str(weights), "the file does not belong to this config.json")
    return model.to(device).eval()


def load_pretrained_tokenizer(directory: str | Path):
    """The tokenizer saved beside a pretrained model, or None when there is none."""
    from .data import load_tokenizer

    path = Path(directory) / TOKENIZER_DIR
    return load_tokenizer(path) if path.is_dir() else None


__all__ = ["ARCHITECTURE", "MODEL_TYPE", "is_pretrained_dir", "load_pretrained",
           "load_pretrained_tokenizer", "read_config", "save_pretrained"]
