"""The bundled offline lm-evaluation-harness tasks (blockstate.lm_eval_tasks): the shipped data
files are small, regenerate exactly from this interpreter's standard library, and hold what their
tasks say; the documented command of docs/lm_eval.md runs them end to end on the CPU."""

import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from blockstate.data import DirectoryCorpus, train_sentencepiece
from blockstate.lm_eval_tasks import (
    BPB_FILE,
    CONTEXT_LINES,
    MANIFEST_FILE,
    NEXT_LINE_FILE,
    TASKS_PATH,
    task_rows,
    write_task_data,
)
from blockstate.registry import build_model

ROOT = Path(__file__).resolve().parents[1]


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_PATH / name).read_text(encoding="utf-8").splitlines()]


def test_shipped_task_files_are_small_and_listed_in_the_package_data():
    manifest = json.loads((TASKS_PATH / MANIFEST_FILE).read_text())
    for name in (BPB_FILE, NEXT_LINE_FILE):
        assert (TASKS_PATH / name).stat().st_size < 300_000
        assert len(_rows(name)) == manifest["rows"][name]
    assert manifest["rows"][BPB_FILE] >= 50 and manifest["rows"][NEXT_LINE_FILE] >= 100
    assert sorted(p.name for p in TASKS_PATH.glob("*.yaml")) == ["blockstate_stdlib_bpb.yaml",
                                                                  "blockstate_stdlib_next_line.yaml"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pattern in ("lm_eval_tasks/*.yaml", "lm_eval_tasks/*.jsonl", "lm_eval_tasks/*.json"):
        assert f'"{pattern}"' in pyproject


def test_next_line_items_are_the_true_line_among_same_indentation_lines_of_other_documents():
    documents = {row["name"]: row["text"] for row in _rows(BPB_FILE)}
    for item in _rows(NEXT_LINE_FILE):
        choices, answer = item["choices"], item["answer"]
        target = choices[answer]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert len(item["context"].split("\n")) == CONTEXT_LINES
        indentation = {len(c) - len(c.lstrip()) for c in choices}
        assert len(indentation) == 1
        assert all(len(c.strip()) >= 16 for c in choices)
        text = documents[item["name"]]  # the bits-per-byte slice holds the item when it is early enough
        if item["line"] <= text.count("\n"):
            assert text.split("\n")[item["line"] - 1] == target
            assert text.split("\n")[item["line"] - 1 - CONTEXT_LINES:item["line"] - 1] == \
                item["context"].split("\n")
    answers = [item["answer"] for item in _rows(NEXT_LINE_FILE)]
    assert all(answers.count(k) > len(answers) / 8 for k in range(4))  # the true line is not in one place


def test_task_rows_on_a_small_corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(400):  # about 5% land in the test split
        body = "".join(f"    value_{i}_{j} = compute_{j}(argument_{i})\n" for j in range(40))
        (root / f"module{i:03d}.py").write_text(f"def function_{i}():\n{body}")
    corpus = DirectoryCorpus(root)
    bpb, next_line, names = task_rows(corpus)
    assert names == [doc.name for doc in corpus.documents("test")] and len(names) >= 5
    assert [row["name"] for row in bpb] == names and all(len(row["text"]) <= 2048 for row in bpb)
    assert all(row["text"].endswith("\n") for row in bpb)
    assert len(next_line) == 2 * len(names)
    for item in next_line:
        target = item["choices"][item["answer"]]
        number = item["name"][len("module"):-len(".py")]
        assert f"value_{int(number)}_" in target
        assert all(f"value_{int(number)}_" not in c for c in item["choices"] if c != target)
    assert write_task_data(tmp_path / "a", corpus) == write_task_data(tmp_path / "b", corpus)
    for name in (BPB_FILE, NEXT_LINE_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_shipped_task_files_regenerate_exactly_from_this_interpreters_stdlib(tmp_path):
    manifest = json.loads((TASKS_PATH / MANIFEST_FILE).read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if platform.python_version() != manifest["python_version"] or \
            not all((stdlib / name).is_file() for name in manifest["documents"]):
        pytest.skip(f"the task files come from Python {manifest['python_version']}'s standard library")
    write_task_data(tmp_path)
    for name in (BPB_FILE, NEXT_LINE_FILE, MANIFEST_FILE):
        assert (tmp_path / name).read_bytes() == (TASKS_PATH / name).read_bytes(), name


def _documented(heading: str, language: str) -> str:
    """The first `language` code block under `heading` in docs/lm_eval.md."""
    text = (ROOT / "docs" / "lm_eval.md").read_text()
    section = text[text.index(heading):]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1).strip()


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """An untrained tiny model with a BPE tokenizer, saved as `blockstate export` saves one."""
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    (root / "corpus").mkdir()
    for i, row in enumerate(_rows(BPB_FILE)[:20]):  # any small Python text trains the tokenizer
        (root / "corpus" / f"doc{i:02d}.py").write_text(row["text"])
    tokenizer = train_sentencepiece(DirectoryCorpus(root / "corpus"), 400, root / "tokenizer")
    torch.manual_seed(0)
    build_model("bst-sh-s4", "tiny", vocab_size=tokenizer.vocab_size).save_pretrained(root / "model",
                                                                                    tokenizer)
    return root / "model"


@pytest.mark.slow
def test_the_documented_command_runs_the_bundled_tasks_on_the_cpu(tiny_export, tmp_path):
    pytest.importorskip("lm_eval")
    command = _documented("## The command", "bash")
    assert "--device" not in command and "runs/my-run" in command
    command = command.replace("runs/my-run", str(tiny_export)) + " --limit 6"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "not available on this machine; evaluating on the cpu" in output
    assert "|blockstate_stdlib_bpb " in output and "|blockstate_stdlib_next_line|" in output
    bpb = float(re.search(r"bits_per_byte\s*\|[^|]*\|\s*([0-9.]+)", output).group(1))
    accuracy = float(re.search(r"\|acc\s*\|[^|]*\|\s*([0-9.]+)", output).group(1))
    # an untrained model: about log2(400) bits per token, a token a few bytes
    assert 0.5 < bpb < 12 and 0.0 <= accuracy <= 1.0


@pytest.mark.slow
def test_the_documented_python_example_runs(tiny_export, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = _documented("## From Python", "python")
    assert "simple_evaluate(" in code and "runs/my-run" in code
    code = code.replace("runs/my-run", str(tiny_export))
    code = code.replace("simple_evaluate(", "simple_evaluate(limit=2, ")  # a quick look is enough here
    exec(compile(code, "docs/lm_eval.md", "exec"), {})
    assert 0.5 < float(capsys.readouterr().out.strip().splitlines()[-1]) < 12


def test_the_readme_shows_the_documented_command():
    """The command the slow test above runs is the one the README shows."""
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text(encoding="utf-8")
    assert _documented("## The command", "bash").strip() in readme
