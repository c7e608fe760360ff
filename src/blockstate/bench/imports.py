"""Import time (`blockstate bench imports`): a fresh interpreter per statement, against `import torch`.

    blockstate bench imports --out docs/benchmarks/imports
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..reporting import machine_info, markdown_table
from .report import write_outputs

IMPORTS = {"torch": "import torch", "blockstate": "import blockstate",
           "blockstate + model": "import blockstate; blockstate.build_model('bst-sh-s4', 'tiny')",
           "blockstate.cli": "import blockstate.cli"}


def run_imports(out: Path | None, repeats: int = 7, command: str = "",
                log: Callable[[str], None] = print, imports: dict[str, str] | None = None) -> dict:
    """Wall time of a fresh interpreter running each statement of IMPORTS (median of `repeats`
    runs, interleaved), against `python -c pass`; the cost of importing blockstate is the
    difference to importing torch."""
    import subprocess

    statements = {"python": "pass", **(IMPORTS if imports is None else imports)}
    times: dict[str, list[float]] = {name: [] for name in statements}
    for _ in range(repeats):
        for name, statement in statements.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], check=True)
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    report = {"kind": "imports", "command": command, "machine": machine_info(torch.device("cpu")),
              "repeats": repeats, "statements": statements, "seconds": times, "median": medians,
              "blockstate_over_torch_s": medians["blockstate"] - medians["torch"]}
    for name, seconds in medians.items():
        log(f"  {name}: {seconds:.3f} s")
    if out is not None:
        write_outputs(out, report, False, imports_markdown)
    return report


def imports_markdown(report: dict) -> str:
    rows = [[name, f"`{report['statements'][name]}`", f"{seconds:.3f}",
             f"{seconds - report['median']['torch']:+.3f}"] for name, seconds in report["median"].items()]
    return "\n".join([
        "# Import time", "", f"Command: `{report['command']}`", "",
        f"A fresh interpreter per run, median of {report['repeats']} interleaved runs; load average "
        f"at start {', '.join(f'{x:.2f}' for x in report['machine']['load_average_at_start'])}.", "",
        markdown_table(["what", "statement", "seconds", "vs import torch"], rows), ""])


__all__ = ["IMPORTS", "imports_markdown", "run_imports"]
