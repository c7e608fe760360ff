"""`BlockStateConfig`: a `ModelConfig` as a `transformers` config (see `blockstate.hf`).

This module is also written into every export as `configuration_blockstate.py` (its relative
imports rewritten to the bundled copies of blockstate's modules), so it imports nothing from
blockstate but through relative imports of model-side modules.
"""

from __future__ import annotations

try:
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as _BaseConfig

from .builtin_components import BUILTIN_COMPONENTS  # noqa: F401 - registers the built-in kinds
from .config import CONFIG_FORMAT, LEGACY_FIELDS, ModelConfig

MODEL_TYPE = "blockstate"
_FIELDS = ModelConfig.field_names()


class BlockStateConfig(_BaseConfig):
    """A `ModelConfig` as a `transformers` config: every field is an attribute (and a key of
    config.json; the components `arch`, `ssm` and `context` as objects with a "kind"), validated
    by `ModelConfig`. The flat fields of format 1 are read too."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        names = set(_FIELDS) | set(LEGACY_FIELDS)
        fields = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
        model_config = ModelConfig.from_dict(fields)                      # validates
        for name, value in model_config.to_dict().items():
            setattr(self, name, value)
        if fields:  # the attributes are now in the nested format
            kwargs["blockstate_format"] = max(CONFIG_FORMAT, kwargs.get("blockstate_format", 1))
        kwargs.setdefault("tie_word_embeddings", model_config.tie_embeddings)
        super().__init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({name: getattr(self, name) for name in _FIELDS})
