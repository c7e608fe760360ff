"""blockstate: the Block-State Transformer (Fathi et al. 2023) in PyTorch."""

from ._version import __version__
from .config import ModelConfig
from .model import BlockStateLM
from .registry import Preset, build_model, list_models, list_sizes, model_config, presets


def load(path, device="cpu"):
    """(model in eval mode, tokenizer) of a trained run: a run directory (its newest intact
    checkpoint) or a checkpoint step directory; see `blockstate.loading`."""
    from .loading import load as _load

    return _load(path, device)


__all__ = [
    "BlockStateLM", "ModelConfig", "Preset", "build_model", "list_models", "list_sizes", "load",
    "model_config", "presets", "__version__",
]
