"""Typed component configs and their registry.

A model config (`blockstate.config.ModelConfig`) holds the architecture's shared hyper-parameters
and one typed sub-config per replaceable part, a *component*:

    group      what it configures                      built-in kinds
    "arch"     which layers are not attention layers   bst, transformer-xl, brt, gss-hybrid, samba
    "ssm"      the SSM of BST, GSS and Mamba layers    s4, s4d, unstruct, explicit, ssd
    "context"  how SSM outputs become context states   sh, mh, mf
    "decay"    the selective SSM's decay (of "ssd")    head, state, complex, rotary

A component is a dataclass that owns its fields, checks them (`validate`, which also sees the
whole model config for cross-field rules) and builds its module. Registering one is a decorator:

    @register("ssm", "mine")
    @dataclass
    class MyKernel(KernelOptions):
        width_ratio: float = 0.5
        def build_kernel(self, model, channels, width): ...

after which `{"kind": "mine", "width_ratio": 0.25}` is a valid `ssm` of any model config, in
presets, `--set ssm.kind=mine`, checkpoints and exports. Nothing else needs editing. The
built-in components register when `blockstate` is imported (`builtin_components`).

This module imports no torch: configs are read (e.g. by `transformers` loading an export) before
any model is built.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

GROUPS = ("arch", "ssm", "context", "decay")
_REGISTRY: dict[str, dict[str, type[Component]]] = {group: {} for group in GROUPS}


class ConfigError(ValueError):
    """A model config or one of its components is invalid (the message names the field)."""


# ---------------------------------------------------------------------- value checks
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,),
                                       "bool": (bool,), "None": (type(None),)}


def check_value_type(name: str, value: Any, wanted: str) -> None:
    """Raise ValueError unless `value` has the annotated type `wanted` (int, float, str, bool, None,
    tuple[...] / list[...] / dict[...] and unions of them; bool is not accepted as a number) and,
    if a float, is finite. Other annotations (components) are checked by their owner."""
    allowed: list[type] = []
    for part in (p.strip() for p in wanted.split("|")):
        base = part.split("[", 1)[0]
        allowed += {"tuple": [tuple, list], "list": [list, tuple], "dict": [dict]}.get(
            base, list(_TYPES.get(base, (object,))))
    numeric = isinstance(value, bool) and bool not in allowed
    if numeric or not isinstance(value, tuple(allowed)):
        raise ConfigError(f"{name}={value!r} is not valid; it must be of type {wanted}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not valid; it must be a finite number")


def positive(name: str, value: Any) -> None:
    """Raise unless `value` is an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} is not valid; it must be an integer >= 1")


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; allowed values: {', '.join(allowed)}")


# ---------------------------------------------------------------------- components
@dataclasses.dataclass
class Component:
    """Base of every component config. Subclasses are dataclasses registered with `register`;
    their fields are plain values (int, float, str, bool, None, tuples) or other components."""

    group: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
            elif isinstance(value, dict | str) and f.name in GROUPS:  # a nested component
                value = {"kind": value} if isinstance(value, str) else value
                setattr(self, f.name, from_dict(f.name, value, f"{self.path}.{f.name}"))
        self.check()

    @property
    def path(self) -> str:
        return self.group

    def check(self) -> None:
        """Field checks that need only this component (types here; subclasses add ranges). A
        nested component checked itself when it was made."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, Component):
                check_value_type(f"{self.path}.{f.name}", value, str(f.type))

    def validate(self, model: Any) -> None:
        """Checks against the whole model config (`model`, a ModelConfig); none by default."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (value.to_dict() if isinstance(value, Component)
                           else list(value) if isinstance(value, tuple) else value)
        return out

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> Component:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return self.kind


def register(group: str, kind: str):
    """Class decorator: make the component dataclass `cls` the kind `kind` of `group`."""
    choice("group", group, GROUPS)

    def decorate(cls: type[Component]) -> type[Component]:
        if not (isinstance(cls, type) and issubclass(cls, Component)):
            raise TypeError(f"register({group!r}, {kind!r}): {cls!r} is not a Component subclass")
        if kind in _REGISTRY[group] and _REGISTRY[group][kind] is not cls:
            previous = _REGISTRY[group][kind]
            if (previous.__module__, previous.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"{group} kind {kind!r} is already registered "
                                 f"({previous.__module__}.{previous.__qualname__})")
        cls.group, cls.kind = group, kind
        _REGISTRY[group][kind] = cls
        return cls

    return decorate


def unregister(group: str, kind: str) -> None:
    """Remove a registered kind (for tests that register their own)."""
    _REGISTRY[group].pop(kind, None)


def kinds(group: str) -> tuple[str, ...]:
    """The registered kinds of `group`, in registration order."""
    choice("group", group, GROUPS)
    return tuple(_REGISTRY[group])


def component_class(group: str, kind: Any, where: str | None = None) -> type[Component]:
    registered = _REGISTRY[group]
    if kind not in registered:
        raise ConfigError(f"{where or group}.kind={kind!r} is not valid; registered {group} kinds: "
                          f"{', '.join(registered)}")
    return registered[kind]


def create(group: str, kind: str, **fields: Any) -> Component:
    """An instance of `group`'s kind `kind` with `fields` (the others at their defaults)."""
    return from_dict(group, {"kind": kind, **fields})


def from_dict(group: str, data: Any, where: str | None = None) -> Component:
    """The component that the dict `data` ({"kind": ..., field: value, ...}) describes; a
    component instance is returned as it is (after a group check)."""
    where = where or group
    if isinstance(data, Component):
        if data.group != group:
            raise ConfigError(f"{where}: a {data.group} component ({data.kind!r}) where a {group} "
                              f"component belongs")
        return data
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError(f"{where}={data!r} is not valid; it must be an object with a 'kind' "
                          f"(one of: {', '.join(kinds(group))}) and that kind's fields")
    cls = component_class(group, data["kind"], where)
    fields = {k: v for k, v in data.items() if k != "kind"}
    unknown = sorted(set(fields) - set(cls.field_names()))
    if unknown:
        raise ConfigError(f"{where} kind {cls.kind!r} has no field {unknown[0]!r}; its fields: "
                          f"{', '.join(cls.field_names()) or '(none)'}")
    return cls(**fields)  # its messages name fields by the component's `path`


__all__ = ["GROUPS", "Component", "ConfigError", "check_value_type", "component_class", "create",
           "from_dict", "kinds", "register", "unregister"]
