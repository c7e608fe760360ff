import re
import subprocess
import sys
from pathlib import Path

import pytest

from blockstate.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_models_reports_parameters_and_throughput(capsys):
    """`blockstate bench models` (which replaced `blockstate demo`) on one preset, printing only."""
    assert main(["bench", "models", "--models", "bst-sh-s4", "--size", "tiny", "--steps", "1",
                 "--batch", "2", "--length", "64"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "bst-sh-s4:" in ln][0]
    from blockstate.registry import count_parameters

    assert count_parameters("bst-sh-s4", "tiny") == 153_224 and "(0.15M parameters" in line
    assert re.search(r"bst-sh-s4: \d+ tokens/s", line)


def test_models_table(capsys):
    assert main(["models", "--sizes", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "bst-mf-unstruct" in out and "tiny" in out


def test_bad_arguments_exit_cleanly(capsys):
    assert main(["bench", "models", "--size", "tiny", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # `demo` was folded into `bench models`
        main(["demo"])


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "blockstate.cli", "--version"], check=True,
                         capture_output=True, text=True).stdout
    assert out.startswith("blockstate ")


@pytest.mark.parametrize("page", ["README.md", "docs/generation.md", "docs/python_api.md"])
def test_readme_python_examples_run(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{page} has no python example"
    for block in blocks:
        exec(compile(block, page, "exec"), {})
