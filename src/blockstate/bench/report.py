"""The benchmark's output files: `<out>.json`, `<out>.md` and a plot `<out>.png`, each suite
rendering its own report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..fileio import atomic_write


def write_outputs(out: Path, report: dict, plot: bool, render: Callable[[dict], str],
                  draw: Callable[[dict, Path], None] | None = None) -> None:
    """Write `<out>.json` (atomically), `<out>.md` from `render(report)` and, with `plot` and
    `draw`, the plot `draw(report, <out>.png)` (skipped without matplotlib)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), json.dumps(report, indent=1))
    atomic_write(out.with_suffix(".md"), render(report))
    if plot and draw is not None and report["results"]:
        try:
            draw(report, out.with_suffix(".png"))
        except ImportError:
            pass
