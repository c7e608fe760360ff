"""`eager`: keep a function out of `torch.compile` graphs without importing the compiler stack.

`torch.compiler.disable` imports `torch._dynamo` when it is applied, which at module level costs
about a second on every `import blockstate`. This wrapper calls the function directly unless a
compilation is tracing it, and only then (the compiler being loaded anyway) hands it to
`torch.compiler.disable`, so the compiled graph breaks around it as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper
