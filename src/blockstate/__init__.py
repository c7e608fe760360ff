"""blockstate: the Block-State Transformer (Fathi et al. 2023) in PyTorch."""

from .config import ModelConfig
from .model import BlockStateLM
from .registry import build_model, list_models, list_sizes, model_config

__version__ = "0.1.0"

__all__ = [
    "BlockStateLM", "ModelConfig", "build_model", "list_models", "list_sizes", "model_config",
    "__version__",
]
