"""Model configuration: the architecture's shared hyper-parameters and one typed sub-config per
component (`blockstate.components`), validated up front, serializable to and from JSON.

    ModelConfig(d_model=256, n_layers=6, ...,
                arch=<"arch" component: bst | transformer-xl | brt | gss-hybrid | samba>,
                ssm=<"ssm" component: s4 | s4d | unstruct | explicit | ssd>,
                context=<"context" component: sh | mh | mf>)

As a dict (`to_dict`, the format checkpoints and exports save, `CONFIG_FORMAT`) each component is
an object with a "kind" and that kind's fields, e.g. `{"ssm": {"kind": "s4d", "state_size": 16,
"init": "inv", ...}}`. Overrides (`with_overrides`, presets, the command line's `--set`) name a
field by its path (`ssm.state_size`, `context.direct`, `ssm.decay.kind`) or, for a component, give
its kind alone (`ssm="s4d"`). The flat field names of format 1 (`ssm_kernel`, `ssd_decay`, ...;
`LEGACY_FIELDS`) are still read, so configs saved before the nesting load unchanged.

Defaults follow `paper.md` (Fathi et al. 2023, section 3 and appendix) where the paper specifies a
value; choices the paper leaves open are documented next to the field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .components import (
    Component,
    ConfigError,
    check_value_type,
    choice,
    component_class,
    create,
    from_dict,
    kinds,
    positive,
)

CONFIG_FORMAT = 2        # 1: flat fields (LEGACY_FIELDS); 2: nested components
COMPONENT_FIELDS = ("arch", "ssm", "context")  # the ModelConfig fields that hold components
SELF_ATTENTION_MODES = ("block", "sliding", "full")
SSM_METHODS = ("auto", "fft", "chunked")
CONTEXT_NORMS = ("none", "rms")
CONTEXT_ACTIVATIONS = ("gelu", "none")

# The paper's 12-layer model puts BST layers at layers 1, 7 and 9 (0-based 0, 6, 8).
PAPER_DEPTH = 12
PAPER_BST_LAYERS = (0, 6, 8)


def scale_bst_layers(n_layers: int, reference: tuple[int, ...] = PAPER_BST_LAYERS,
                     reference_depth: int = PAPER_DEPTH) -> tuple[int, ...]:
    """Place layers at the same relative depths as `reference`; layer 0 stays if it is there."""
    placed = {min(n_layers - 1, round(i * n_layers / reference_depth)) for i in reference}
    if 0 in reference:
        placed.add(0)
    return tuple(sorted(placed))


def check_field_types(obj: Any) -> None:
    """`check_value_type` for every field of the dataclass instance `obj`."""
    for f in dataclasses.fields(obj):
        check_value_type(f.name, getattr(obj, f.name), str(f.type))


# ---------------------------------------------------------------------- component groups
@dataclass
class ArchOptions(Component):
    """Which layers of the model are not plain block-attention layers, and what they are (the
    `bst_layers` positions; `build_layer` makes layer `index`)."""

    carries_memory: ClassVar[bool] = False  # carries memory from one training sequence to the next
    block_parallel: ClassVar[bool] = False  # blocks depend on earlier ones only through SSMs
    has_ssm: ClassVar[bool] = False         # its layers at `bst_layers` run an SSM

    def memory_span(self, model: ModelConfig) -> int:
        """Positions of attention memory before each block (0 for archs that carry none)."""
        return 0

    @classmethod
    def default_layers(cls, n_layers: int) -> tuple[int, ...] | None:
        """Where presets put its layers at a depth (None: at BST's positions, `bst_layers`)."""
        return None

    def ssm_width(self, model: ModelConfig) -> int | None:
        """The SSM width when `ssm.width_divisor` is unset (None: the context variant's)."""
        return None

    def constant_attention(self, model: ModelConfig) -> bool:
        """Whether its attention caches stay bounded in the context length."""
        return model.self_attention != "full"

    def build_layer(self, model: ModelConfig, index: int) -> Any:
        raise NotImplementedError


@dataclass
class SSMOptions(Component):
    """An SSM: the kernel kind's own fields and what every SSM shares. The SSM runs on a
    down-projection of width d_model // width_divisor (paper: D/4 for SH and MH, D/8 for MF; None
    picks that default, and for arch "samba" the Mamba layers' expansion to 2D)."""

    width_divisor: int | None = None
    chunk_size: int = 64            # chunk length T of chunked computation

    constant_state: ClassVar[bool] = True  # its generation state does not grow with the context

    def check(self) -> None:
        super().check()
        if self.width_divisor is not None:
            positive(f"{self.path}.width_divisor", self.width_divisor)
        positive(f"{self.path}.chunk_size", self.chunk_size)

    def build_ssm(self, model: ModelConfig, channels: int, width: int) -> Any:
        """The SSM sublayer for `channels` filters over `width` channels."""
        raise NotImplementedError


@dataclass
class ContextOptions(Component):
    """How SSM outputs become context states (the BST layer's context variant). The activation
    on the SSM outputs, and "rms" to RMS-normalize them (learned gain) with a unit-scale lift, so
    that context keys/values start at the scale of self-attention's; "none" chains three
    Normal(0, init_std) maps instead."""

    activation: str = "gelu"
    norm: str = "none"

    width_divisor: ClassVar[int] = 4  # the SSM width D / divisor when ssm.width_divisor is unset
    summarizes_blocks: ClassVar[bool] = False  # reads summaries of earlier blocks (not positions)
    module: ClassVar[Any] = None      # the ContextStates subclass `build` makes

    def check(self) -> None:
        super().check()
        choice(f"{self.path}.activation", self.activation, CONTEXT_ACTIVATIONS)
        choice(f"{self.path}.norm", self.norm, CONTEXT_NORMS)

    def channels(self, model: ModelConfig) -> int:
        """C: SSM filters per SSM width channel."""
        return 1

    @property
    def direct_read(self) -> bool:
        """Whether the layer also reads the context outputs into the residual stream."""
        return False

    def build(self, model: ModelConfig) -> Any:
        return self.module(model)


@dataclass
class DecayOptions(Component):
    """The decay of the selective SSM (`ssm` kind "ssd")."""

    paired: ClassVar[bool] = False  # pairs state dimensions into rotating complex modes

    @property
    def path(self) -> str:
        return "ssm.decay"

    @property
    def still_modes_or_zero(self) -> int:
        return getattr(self, "still_modes", 0)


def _default(group: str, kind: str):
    return field(default_factory=lambda: create(group, kind))


@dataclass
class ModelConfig:
    """Hyper-parameters of a Block-State Transformer language model (or of a baseline).

    Notation of the paper: D = `d_model`, H = `n_heads`, W = `block_size`, N = `ssm.state_size`,
    S = `context.states` (MF), L = `max_seq_len` (training length).
    """

    vocab_size: int = 256
    d_model: int = 256              # D: residual stream width
    n_layers: int = 6
    n_heads: int = 4                # H
    head_dim: int | None = None     # defaults to d_model // n_heads; the -L models use 12 x 128
    d_ff: int | None = None         # ReLU MLP width; defaults to 4 * d_model
    block_size: int = 128           # W: tokens per block
    max_seq_len: int = 1024         # training length; unstructured kernels are defined up to it
    # Indices (0-based) of BST layers (for the baselines: of their GSS, recurrent or Mamba layers);
    # the others are attention layers. None places them like the paper's (0, 6, 8) of 12, scaled.
    bst_layers: tuple[int, ...] | None = None
    # Self-attention inside a block sees the block only ("block", as in the paper's listing) or the
    # current and the previous block ("sliding", the Block-Recurrent Transformer's window); "full"
    # is ordinary causal attention over the whole sequence (the Transformer baseline).
    self_attention: str = "block"
    rel_pos_buckets: int = 32       # T5-style relative position bias of self-attention
    rel_pos_max_distance: int = 128
    qk_norm: bool = True            # L2-normalized queries/keys with a learned per-head scale
    dropout: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # The output head shares the embedding's weights (the paper's and GPT-2's choice); False gives
    # it a weight of its own (vocab_size x d_model more parameters). Tied, a value token's output
    # row is also its input embedding, so a value token's prediction and its reading are one vector.
    tie_embeddings: bool = True
    arch: ArchOptions = _default("arch", "bst")        # the layers at `bst_layers`
    ssm: SSMOptions = _default("ssm", "s4")            # their SSM
    context: ContextOptions = _default("context", "sh")  # BST's context states

    def __post_init__(self) -> None:
        if isinstance(self.bst_layers, list):
            self.bst_layers = tuple(self.bst_layers)
        for name in COMPONENT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                value = {"kind": value}
            setattr(self, name, from_dict(name, value))
        self.validate()

    # ---------------------------------------------------------------- derived values
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_d_ff(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def resolved_bst_layers(self) -> tuple[int, ...]:
        if self.bst_layers is not None:
            return self.bst_layers
        return scale_bst_layers(self.n_layers)

    @property
    def carries_memory(self) -> bool:
        """Whether the model carries memory from one training sequence to the next."""
        return self.arch.carries_memory

    @property
    def resolved_memory_length(self) -> int:
        """Positions of attention memory before each block (0 for models that carry none)."""
        return self.arch.memory_span(self)

    @property
    def ssm_width(self) -> int:
        if self.ssm.width_divisor is None:
            width = self.arch.ssm_width(self)
            if width is not None:
                return width
        divisor = self.ssm.width_divisor or self.context.width_divisor
        return max(1, self.d_model // divisor)

    @property
    def ssm_channels(self) -> int:
        """C: number of SSM filters per SSM width channel (1 for SH, H for MH, S for MF)."""
        return self.context.channels(self)

    @property
    def constant_inference_state(self) -> bool:
        """Whether generation keeps a cache whose size does not grow with the context: false with
        full self-attention (its keys/values grow) and with SSM kernels whose streamed convolution
        keeps the input history (unstructured, explicit); true otherwise (sliding or block
        attention windows, S4/S4D/selective states, recurrent states, bounded memories)."""
        if not self.arch.constant_attention(self):
            return False
        has_ssm = self.arch.has_ssm and bool(self.resolved_bst_layers)
        return not (has_ssm and not self.ssm.constant_state)

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        for f in dataclasses.fields(self):
            if f.name not in COMPONENT_FIELDS:
                check_value_type(f.name, getattr(self, f.name), str(f.type))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "block_size", "max_seq_len",
                     "rel_pos_buckets", "rel_pos_max_distance"):
            positive(name, getattr(self, name))
        for name in ("head_dim", "d_ff"):
            if getattr(self, name) is not None:
                positive(name, getattr(self, name))
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}; choose n_heads "
                f"among the divisors of d_model or set head_dim explicitly")
        choice("self_attention", self.self_attention, SELF_ATTENTION_MODES)
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError(f"norm_eps={self.norm_eps} and init_std={self.init_std} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if self.bst_layers is not None:
            for i in self.bst_layers:
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_layers:
                    raise ConfigError(
                        f"bst_layers={list(self.bst_layers)} contains {i!r}; layer indices must be "
                        f"integers in 0..{self.n_layers - 1} (n_layers={self.n_layers})")
            if len(set(self.bst_layers)) != len(self.bst_layers):
                raise ConfigError(f"bst_layers={list(self.bst_layers)} contains duplicates")
        for name in COMPONENT_FIELDS:
            getattr(self, name).validate(self)

    # ---------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        """The nested dict of format `CONFIG_FORMAT` (components as {"kind": ..., fields})."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (value.to_dict() if isinstance(value, Component)
                           else list(value) if isinstance(value, tuple) else value)
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """A config from its dict: nested (format 2, `to_dict`) or flat (format 1, read with
        `LEGACY_FIELDS`; fields of other kinds than the ones chosen are ignored, as format 1
        stored every field of every kind)."""
        if not isinstance(data, dict):
            raise ConfigError("a model config must be an object of field names to values")
        if is_flat(data):
            return cls.from_dict(merge([nest(data, lenient=True)]))
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; known fields: "
                              f"{', '.join(cls.field_names())}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"model config is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError("model config JSON must be an object of field names to values")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with top-level fields replaced (components as instances, dicts or kinds)."""
        return dataclasses.replace(self, **changes)

    def with_overrides(self, **overrides: Any) -> ModelConfig:
        """A copy with `overrides` applied: top-level fields, field paths (`**{"ssm.state_size":
        64}`), components as dicts merged into the current ones (`ssm={"state_size": 64}`) or as
        kinds (`ssm="s4d"`; the current fields that the new kind has carry over), or format 1's
        flat names."""
        return ModelConfig.from_dict(merge([nest(self.to_dict(), lenient=True), nest(overrides)]))


# ---------------------------------------------------------------------- overrides and format 1
# Format 1's flat field names -> their path in the nested config.
LEGACY_FIELDS: dict[str, tuple[str, ...]] = {
    "arch": ("arch", "kind"), "context_variant": ("context", "kind"),
    "ssm_kernel": ("ssm", "kind"), "ssm_state_size": ("ssm", "state_size"),
    "num_context_states": ("context", "states"), "recurrent_states": ("arch", "recurrent_states"),
    "memory_length": ("arch", "memory_length"), "gss_expansion": ("arch", "expansion"),
    "ssm_width_divisor": ("ssm", "width_divisor"), "context_activation": ("context", "activation"),
    "context_norm": ("context", "norm"), "context_direct": ("context", "direct"),
    "ssm_method": ("ssm", "method"), "ssm_chunk_size": ("ssm", "chunk_size"),
    "s4d_init": ("ssm", "init"), "ssd_heads": ("ssm", "heads"), "ssd_decay": ("ssm", "decay", "kind"),
    "ssd_bc_norm": ("ssm", "bc_norm"), "ssd_still_modes": ("ssm", "decay", "still_modes"),
    "dt_min": ("ssm", "dt_min"), "dt_max": ("ssm", "dt_max"),
    "unstruct_decay": ("ssm", "decay_rate"), "unstruct_hidden": ("ssm", "hidden"),
    "unstruct_frequencies": ("ssm", "frequencies"), "explicit_squash": ("ssm", "squash"),
    "explicit_smooth": ("ssm", "smooth"),
}
_FLAT_ONLY = set(LEGACY_FIELDS) - {"arch"}


def is_flat(data: dict[str, Any]) -> bool:
    """Whether `data` is a format-1 (flat) config dict."""
    return bool(_FLAT_ONLY & set(data)) or isinstance(data.get("arch"), str) and not any(
        isinstance(data.get(name), dict) for name in COMPONENT_FIELDS)


def nest(overrides: dict[str, Any], lenient: bool = False) -> dict[str, Any]:
    """Overrides in any accepted spelling -> a nested dict of changes (`merge` applies it), a
    component given by its kind alone becoming {"kind": ...}. With `lenient` the layer is marked
    (`_lenient`): `merge` then drops its fields that the final kinds lack (format 1 and size
    defaults name fields of every kind) instead of refusing them."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ConfigError(f"model config override {key!r}: names must be strings")
        path = LEGACY_FIELDS[key] if key in _FLAT_ONLY else tuple(key.split("."))
        if isinstance(value, Component):
            value = value.to_dict()
        elif isinstance(value, tuple):
            value = list(value)
        if path[0] in COMPONENT_FIELDS and len(path) == 1:
            if isinstance(value, str):
                value = {"kind": value}
            elif not isinstance(value, dict):
                raise ConfigError(f"{key}={value!r} is not valid; give a kind "
                                  f"({', '.join(kinds(key))}) or an object of fields")
        for name, item in paths({path[-1]: value}).items():
            _set(out, [*path[:-1], *name.split(".")], item)
    if lenient:
        out["_lenient"] = True
    return out


def paths(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict (`nest`, `to_dict`) as {"ssm.state_size": 64, "ssm.kind": "s4d", ...}."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if key == "_lenient":
            continue
        if isinstance(value, dict) and value:
            out.update(paths(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _set(target: dict[str, Any], path: list[str], value: Any) -> None:
    for i, part in enumerate(path[:-1]):
        child = target.get(part)
        if isinstance(child, str):       # a component given by its kind, now with fields
            child = {"kind": child}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"model config override {'.'.join(path)!r}: "
                              f"{'.'.join(path[:i + 1])} is not a component")
        target[part] = child
        target = child
    target[path[-1]] = value


def merge(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Nested change dicts (`nest`) applied in order -> one nested config dict. Fields carry over
    when a later layer changes a component's kind; at the end, a field that the final kind lacks
    is dropped if only lenient layers set it and refused (naming it) otherwise."""
    merged: dict[str, Any] = {}
    strict: set[str] = set()
    for layer in layers:
        for path, value in paths(layer).items():
            _set(merged, path.split("."), value)
            if not layer.get("_lenient"):
                strict.add(path)
    for name in COMPONENT_FIELDS:
        if name in merged:
            merged[name] = _resolve(name, merged[name], name, strict, _default_kind(name))
    return merged


def _resolve(group: str, data: Any, where: str, strict: set[str], default: str) -> dict[str, Any]:
    if not isinstance(data, str | dict):
        raise ConfigError(f"{where}={data!r} is not valid; give a kind ({', '.join(kinds(group))}) "
                          f"or an object of fields")
    data = {"kind": data} if isinstance(data, str) else dict(data)
    cls = component_class(group, data.get("kind", default), where)
    names, nested = set(cls.field_names()), _nested_kinds(cls)
    out: dict[str, Any] = {"kind": cls.kind}
    for key, value in data.items():
        if key == "kind":
            continue
        if key not in names:
            field_path = f"{where}.{key}"
            if any(p == field_path or p.startswith(field_path + ".") for p in strict):
                raise ConfigError(f"{where} kind {cls.kind!r} has no field {key!r}; its fields: "
                                  f"{', '.join(cls.field_names()) or '(none)'}")
            continue
        if key in nested:
            value = _resolve(key, value, f"{where}.{key}", strict, nested[key])
        out[key] = value
    return out


def _default_kind(group: str) -> str:
    return next(f for f in dataclasses.fields(ModelConfig) if f.name == group).default_factory().kind


def _nested_kinds(cls: type[Component]) -> dict[str, str]:
    """The fields of `cls` that hold components -> the kind of their default."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if isinstance(default, Component):
                out[f.name] = default.kind
    return out


__all__ = ["CONFIG_FORMAT", "LEGACY_FIELDS", "ArchOptions", "ConfigError", "ContextOptions",
           "DecayOptions", "ModelConfig", "SSMOptions", "is_flat", "merge", "nest", "paths",
           "scale_bst_layers"]
