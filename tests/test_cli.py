import json
import re
import subprocess
import sys
from pathlib import Path

from blockstate.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_reports_parameters_and_throughput(capsys):
    assert main(["demo", "--size", "tiny", "--steps", "2", "--batch", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    from blockstate.registry import count_parameters

    assert report["parameters"] == count_parameters("bst-sh-s4", "tiny") == 153_224
    assert 0 < report["tokens_per_s"] < float("inf")
    assert report["length"] == 128 and report["batch"] == 2


def test_models_table(capsys):
    assert main(["models", "--sizes", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "bst-mf-unstruct" in out and "tiny" in out


def test_bad_arguments_exit_cleanly(capsys):
    assert main(["demo", "--size", "tiny", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "blockstate.cli", "--version"], check=True,
                         capture_output=True, text=True).stdout
    assert out.startswith("blockstate ")


def test_readme_python_examples_run():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
