"""blockstate: the Block-State Transformer (Fathi et al. 2023) in PyTorch."""

from .config import ModelConfig
from .model import BlockStateLM
from .registry import build_model, list_models, list_sizes, model_config

__version__ = "0.1.0"


def load_run(path, device="cpu"):
    """(model in eval mode, tokenizer, checkpoint) of a trained run: a run directory (its newest
    checkpoint) or a checkpoint step directory. Weights are read from safetensors; nothing is
    unpickled."""
    from .evaluate import load_model_and_tokenizer

    return load_model_and_tokenizer(path, device)


__all__ = [
    "BlockStateLM", "ModelConfig", "build_model", "list_models", "list_sizes", "load_run",
    "model_config", "__version__",
]
