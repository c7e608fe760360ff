"""A trained model as a self-contained directory in the Hugging Face layout, loadable by plain
`transformers` (remote code) and ready for the Hub:

    config.json              "model_type": "blockstate", "architectures", "auto_map" (the remote
                             code below) and every ModelConfig field
    model.safetensors        the weights (a tied output head is the embedding, not stored twice)
    configuration_blockstate.py, modeling_blockstate.py, blockstate_*.py
                             the remote code: blockstate's model-side modules, bundled (see
                             `blockstate.remote_code`)
    generation_config.json   bos/eos/pad ids of the tokenizer
    README.md                a model card: preset, size, training data and budget, evaluation
    blockstate_tokenizer.json (+ tokenizer.model for SentencePiece)
                             blockstate's own tokenizer (`blockstate.data.load_tokenizer`)
    tokenizer.json, tokenizer_config.json
                             the same tokenizer in the `tokenizers` library's format
                             (`AutoTokenizer`, no custom code; see `blockstate.tokenizer_export`)

`BlockStateLM.save_pretrained(directory, tokenizer)` writes it, `BlockStateLM.from_pretrained(
directory_or_repo_id)` reads it back, `blockstate.load(directory)` returns model and tokenizer, and
`blockstate export RUN DIR` turns a training run into one. `transformers.AutoModelForCausalLM
.from_pretrained(directory, trust_remote_code=True)` loads it without blockstate installed (see
`blockstate.hf`). Exports written before the remote code existed keep blockstate's tokenizer in
`tokenizer/tokenizer.json`; they still load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError
from .config import LEGACY_FIELDS, ModelConfig
from .fileio import atomic_write

MODEL_TYPE = "blockstate"
ARCHITECTURE = "BlockStateForCausalLM"
CONFIG_FILE = "config.json"
# The layout of config.json that this code writes (exports without the key: 1). 1: the model
# config's flat fields; 2: nested components (config.py's CONFIG_FORMAT). Both are read.
EXPORT_FORMAT = 2
WEIGHTS_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
CARD_FILE = "README.md"
BLOCKSTATE_TOKENIZER_FILE = "blockstate_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_DIR = "tokenizer"          # exports written before the remote code: tokenizer/tokenizer.json
AUTO_MAP = {"AutoConfig": "configuration_blockstate.BlockStateConfig",
            "AutoModelForCausalLM": "modeling_blockstate.BlockStateForCausalLM"}


def is_pretrained_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def save_pretrained(model, directory: str | Path, tokenizer=None,
                    card: dict[str, Any] | None = None) -> Path:
    """Write `model` (and `tokenizer`) into `directory` with the remote code, generation config and
    model card; config.json is written last, so a directory with a config.json is complete.
    `card` adds what the model card says about training (see `model_card`). Returns the
    directory."""
    from safetensors.torch import save_file

    from ._version import __version__
    from .remote_code import write_bundle

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
    generation: dict[str, Any] = {}
    hf_tokenizer = False
    if tokenizer is not None:
        tokenizer.save(directory, config_name=BLOCKSTATE_TOKENIZER_FILE)
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                      "pad_token_id": tokenizer.pad_id}
        hf_tokenizer = _write_hf_tokenizer(tokenizer, directory, model.config.max_seq_len)
    atomic_write(directory / GENERATION_CONFIG_FILE, json.dumps(
        {**generation, "transformers_version": _transformers_version()}, indent=2) + "\n")
    write_bundle(directory)
    atomic_write(directory / CARD_FILE, model_card(model, tokenizer, card, hf_tokenizer))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "auto_map": AUTO_MAP,
              "torch_dtype": dtype, "blockstate_version": __version__,
              "blockstate_format": EXPORT_FORMAT, **generation,
              **model.config.to_dict()}
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(directory / CONFIG_FILE, text)
    return directory


def _transformers_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # noqa: BLE001 - not installed: the field is informative only
        return None


def _write_hf_tokenizer(tokenizer, directory: Path, max_length: int | None) -> bool:
    """tokenizer.json and tokenizer_config.json in the `tokenizers` library's format; False (and
    nothing written) without the `tokenizers` package."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    from .tokenizer_export import tokenizer_config_json, tokenizers_json

    atomic_write(directory / HF_TOKENIZER_FILE, tokenizers_json(tokenizer))
    atomic_write(directory / HF_TOKENIZER_CONFIG_FILE, tokenizer_config_json(tokenizer, max_length))
    return True


def _card_rows(card: dict[str, Any]) -> list[str]:
    rows = []
    for key, value in card.items():
        if value is None or value == {} or value == []:
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict | list):
            value = "`" + json.dumps(value) + "`"
        rows.append(f"| {key} | {value} |")
    return rows


def model_card(model, tokenizer=None, card: dict[str, Any] | None = None,
               hf_tokenizer: bool = True) -> str:
    """README.md of an export: what the model is, how it was trained (from `card`: e.g. the
    training config, steps, tokens, time and the run's validation numbers) and how to load it."""
    config = model.config
    card = dict(card or {})
    preset = card.pop("model", None)
    size = card.pop("size", None)
    name = preset or config.arch.kind
    description = (f"a blockstate `{name}` model" + (f" (size `{size}`)" if size else "")
                   + f": arch `{config.arch.kind}`, {config.n_layers} layers, d_model "
                   f"{config.d_model}, block size {config.block_size}, "
                   f"{model.num_parameters():,} parameters")
    if config.arch.has_ssm and config.resolved_bst_layers:
        description += f", SSM kernel `{config.ssm.kind}`"
    if config.arch.kind == "bst" and config.resolved_bst_layers:
        description += f", context variant `{config.context.kind}`"
    tokenizer_line = ("none saved" if tokenizer is None else
                      f"{tokenizer.kind} ({tokenizer.vocab_size} tokens)")
    evaluation = _card_rows({key: value for key, value in card.items()
                             if key.startswith(("validation", "eval"))})
    training = _card_rows({key: value for key, value in card.items()
                           if not key.startswith(("validation", "eval"))})
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags:", "- blockstate", "- block-state-transformer", "- custom_code", "---", "",
        f"# {name}", "",
        f"This is {description}. The Block-State Transformer (Fathi et al. 2023) combines a "
        f"state-space model with block-wise attention; see https://arxiv.org/abs/2306.09539.",
        "", f"Tokenizer: {tokenizer_line}.", "",
        "## Training", "",
    ]
    if training:
        lines += ["| | |", "|---|---|", *training]
    else:
        lines += ["Not recorded (saved with `save_pretrained` outside a training run)."]
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += ["Measured on the training data's validation split at the end of training:", "",
                  "| | |", "|---|---|", *evaluation]
    else:
        lines += ["Not recorded with this export (`blockstate eval` on the training run measures "
                  "loss and bits per byte)."]
    lines += [
        "", "## How to load", "",
        "With plain `transformers` (the modeling code ships in this repository):", "",
        "```python",
        "from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if tokenizer else ""),
        "model = AutoModelForCausalLM.from_pretrained(PATH_OR_REPO, trust_remote_code=True)",
    ]
    if tokenizer is not None and hf_tokenizer:
        lines += ["tokenizer = AutoTokenizer.from_pretrained(PATH_OR_REPO, trust_remote_code=True)",
                  'ids = tokenizer("def ", return_tensors="pt").input_ids',
                  "print(tokenizer.decode(model.generate(ids, max_new_tokens=50)[0]))"]
    lines += ["```", "", "With blockstate (`pip install blockstate`):", "", "```python",
              "import blockstate",
              "model, tokenizer = blockstate.load(PATH)  # a local directory",
              "model = blockstate.BlockStateLM.from_pretrained(PATH_OR_REPO)", "```", ""]
    return "\n".join(lines)


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
    version = data.get("blockstate_format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= EXPORT_FORMAT:
        raise CheckpointError(f"{path} is in export format {version!r} (written by blockstate "
                              f"{data.get('blockstate_version', '?')}); this blockstate reads "
                              f"formats 1-{EXPORT_FORMAT}: upgrade blockstate to load it")
    fields = set(ModelConfig.field_names()) | (set(LEGACY_FIELDS) if version == 1 else set())
    try:
        config = ModelConfig.from_dict({k: v for k, v in data.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, {k: v for k, v in data.items() if k not in fields}


def looks_like_repo_id(path: str | Path) -> bool:
    """Whether `path`, which is not a local directory, names a Hub repository ("owner/name")."""
    import re

    text = str(path)
    return (not Path(text).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None
            and not text.startswith((".", "/")) and ".." not in text)


def resolve_pretrained(path_or_repo_id: str | Path, revision: str | None = None,
                       token: str | bool | None = None) -> Path:
    """A local directory as is; a Hub repo id ("owner/name") downloaded (or found in the Hub's
    local cache) with `huggingface_hub.snapshot_download`."""
    if not looks_like_repo_id(path_or_repo_id):
        return Path(path_or_repo_id)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise CheckpointError(f"{path_or_repo_id} is not a local directory; loading it from the "
                              f"Hugging Face Hub needs the huggingface_hub package "
                              f"(pip install 'blockstate[hf]')") from e
    try:
        return Path(snapshot_download(str(path_or_repo_id), revision=revision, token=token))
    except Exception as e:  # noqa: BLE001 - network, authentication, missing repository
        raise CheckpointError(f"{path_or_repo_id} is not a local directory, and as a Hugging Face "
                              f"Hub repo id it could not be downloaded: {type(e).__name__}: "
                              f"{e}") from None


def push_to_hub(model, repo_id: str, tokenizer=None, card: dict[str, Any] | None = None,
                private: bool | None = None, token: str | bool | None = None,
                commit_message: str = "Upload blockstate model", directory: str | Path | None = None):
    """Upload the model (and tokenizer) as an export to the Hub repository `repo_id`, created if
    missing: `directory` when it is already an export of them, else a temporary one written by
    `save_pretrained`. Returns `huggingface_hub`'s commit info."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(directory) if directory is not None else save_pretrained(
            model, Path(temporary) / "export", tokenizer, card)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=commit_message)


def read_pretrained(directory: str | Path, revision: str | None = None,
                    token: str | bool | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor], Path]:
    """(config, weights, weights file) of the model saved in `directory` (or a Hub repo id,
    downloaded); `BlockStateLM.from_pretrained` builds the model from them. Nothing is
    unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve_pretrained(directory, revision, token)
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
    return config, state, weights


def load_pretrained_tokenizer(directory: str | Path):
    """The tokenizer saved beside a pretrained model (blockstate_tokenizer.json, or the
    tokenizer/ directory of older exports), or None when there is none."""
    from .data import load_tokenizer

    directory = Path(directory)
    if (directory / BLOCKSTATE_TOKENIZER_FILE).is_file():
        return load_tokenizer(directory, config_name=BLOCKSTATE_TOKENIZER_FILE)
    path = directory / TOKENIZER_DIR
    return load_tokenizer(path) if path.is_dir() else None


__all__ = ["ARCHITECTURE", "AUTO_MAP", "MODEL_TYPE", "is_pretrained_dir", "read_pretrained",
           "load_pretrained_tokenizer", "looks_like_repo_id", "model_card", "push_to_hub",
           "read_config", "resolve_pretrained", "save_pretrained"]
