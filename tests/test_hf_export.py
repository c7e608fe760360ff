"""Exports on the Hub's terms: plain transformers loads them with trust_remote_code=True without
blockstate, older exports still load, Hub repo ids and push_to_hub (offline)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import blockstate
from blockstate import build_model
from blockstate.data import ByteTokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "export_v0.1"   # written by blockstate 0.1.0's main

# Runs in a fresh virtual environment (`fresh_venv`) in which blockstate is not installed: what
# transformers loads comes from the export alone.
ISOLATED = textwrap.dedent("""
    import importlib.util, json, sys
    assert importlib.util.find_spec("blockstate") is None, "blockstate is importable here"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    results = {}
    for argument in sys.argv[1:]:
        name, source = argument.split("=", 1)        # a directory, or a repo id in the Hub cache
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
        ids = tokenizer(["def f(x):", "return x"], return_tensors="pt", padding=True,
                        padding_side="left")
        out = model.generate(**ids, max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        short = ids.input_ids[1:, ids.attention_mask[1].argmax():]
        torch.save(model(short).logits, name + ".pt")
        results[name] = {"class": type(model).__module__ + "." + type(model).__name__,
                              "input_ids": ids.input_ids.tolist(), "out": out.tolist(),
                              "text": tokenizer.decode(ids.input_ids[1], skip_special_tokens=True)}
    assert not [m for m in sys.modules if m == "blockstate" or m.startswith("blockstate.")]
    print(json.dumps(results))
""")


def fresh_venv(root: Path) -> Path:
    """A new virtual environment at `root` without blockstate, whose only packages are torch,
    transformers and what they import, taken from this environment's site-packages (added as a
    plain path: the .pth files there, among them blockstate's editable install, are not read).
    Returns its python."""
    import venv

    import transformers

    venv.EnvBuilder(with_pip=False).create(root)
    (site,) = root.glob("lib/python*/site-packages")
    packages = {str(Path(module.__file__).parents[1]) for module in (torch, transformers)}
    (site / "dependencies.pth").write_text("\n".join(sorted(packages)) + "\n")
    return root / "bin" / "python"


def isolated_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1",
               TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    return env


def fake_hub_snapshot(hf_home: Path, repo_id: str, export: Path) -> None:
    """Put `export` into the Hub cache under `hf_home` as repo_id's main revision, the way
    huggingface_hub leaves a download (read offline with HF_HUB_OFFLINE=1)."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(export, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_plain_transformers_loads_the_export_without_blockstate(tmp_path):
    """In a fresh virtual environment without blockstate: from a directory and, through the Hub
    code path (files resolved from the Hub cache, offline), from a repo id."""
    pytest.importorskip("transformers")
    models = {}
    for name in ("bst-sh-ssd", "brt"):        # ssd: the optional mamba-ssm import is carried
        torch.manual_seed(0)
        models[name] = build_model(name, "tiny", vocab_size=259, init_std=0.1).eval()
        models[name].save_pretrained(tmp_path / name, ByteTokenizer())
    fake_hub_snapshot(tmp_path / "hf-home", "someone/brt-tiny", tmp_path / "brt")
    sources = [f"bst-sh-ssd={tmp_path / 'bst-sh-ssd'}", "brt=someone/brt-tiny"]
    python = fresh_venv(tmp_path / "fresh-venv")
    run = subprocess.run([str(python), "-c", ISOLATED, *sources], capture_output=True,
                         text=True, env=isolated_env(tmp_path), cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert "someone" in results["brt"]["class"] and "0123456789abcdef" in results["brt"]["class"]
    for name, model in models.items():
        result = results[name]
        assert result["class"].startswith("transformers_modules.")
        assert result["class"].endswith("modeling_blockstate.BlockStateForCausalLM")
        short, long = b"return x", b"def f(x):"
        pad = len(long) - len(short)
        assert result["input_ids"] == [list(long), [256] * pad + list(short)]   # left padding
        assert result["text"] == "return x"
        expected = [model.generate([list(long)], 6, temperature=0)[0],
                    model.generate([list(short)], 6, temperature=0)[0]]
        assert result["out"][0] == expected[0]
        assert result["out"][1][pad:] == expected[1]
        logits = torch.load(tmp_path / f"{name}.pt")
        assert torch.equal(logits, model(torch.tensor([list(short)])))


def test_export_layout_card_and_generation_config(tmp_path):
    model = build_model("bst-sh-s4", "tiny", vocab_size=259)
    model.save_pretrained(tmp_path / "m", ByteTokenizer(),
                          card={"model": "bst-sh-s4", "size": "tiny", "data": "python-stdlib",
                                "tokens": 123456, "validation bpb": 1.2345})
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "configuration_blockstate.py",
            "modeling_blockstate.py", "blockstate_model.py", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json", "blockstate_tokenizer.json",
            "README.md"} <= files
    assert "tokenizer" not in files                       # no second tokenizer.json
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_blockstate.BlockStateConfig",
                                  "AutoModelForCausalLM": "modeling_blockstate.BlockStateForCausalLM"}
    assert json.loads((tmp_path / "m" / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    generation = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"],
            generation["pad_token_id"]) == (257, 258, 256)
    card = (tmp_path / "m" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    for text in ("bst-sh-s4", "tiny", "python-stdlib", "123456", "1.234", "trust_remote_code=True",
                 f"{model.num_parameters():,} parameters"):
        assert text in card, text
    again, tokenizer = blockstate.load(tmp_path / "m")
    assert isinstance(tokenizer, ByteTokenizer)
    tokens = torch.randint(0, 259, (1, 20))
    assert torch.equal(again(tokens), model.eval()(tokens))


def test_bundle_carries_only_flat_relative_imports():
    from blockstate.remote_code import bundle

    files = bundle()
    assert "modeling_blockstate.py" in files and "blockstate_ssm_selective.py" in files
    assert not any(name.startswith("blockstate_data") for name in files)   # no tokenizer code
    text = files["blockstate_model.py"]
    assert "from .blockstate_builtin_components import" in text and "from .pretrained" not in text
    assert "from .blockstate_layers_bst import" in files["blockstate_builtin_components.py"]
    selective = files["blockstate_ssm_selective.py"]
    assert "= __import__('importlib').import_module('mamba_ssm." in selective
    for name, source in files.items():
        compile(source, name, "exec")


def test_old_exports_still_load():
    """An export written before the remote code (tokenizer/tokenizer.json) loads as before."""
    model, tokenizer = blockstate.load(FIXTURE)
    assert isinstance(tokenizer, ByteTokenizer)
    last = model(torch.tensor([[10, 20, 30, 40, 50]]))[0, -1, :4]
    torch.testing.assert_close(last, torch.tensor([-0.07829547, 0.02799209, 0.01377762,
                                                   0.08638986]))
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blockstate.hf import BlockStateTokenizer  # registers the Auto classes

    hf = AutoModelForCausalLM.from_pretrained(FIXTURE)
    assert torch.equal(hf(torch.tensor([[10, 20, 30, 40, 50]])).logits[0, -1, :4], last)
    slow = BlockStateTokenizer.from_pretrained(FIXTURE)
    assert slow("héllo")["input_ids"] == list("héllo".encode())
    auto = AutoTokenizer.from_pretrained(FIXTURE)           # no tokenizer_config.json: registered
    assert isinstance(auto, BlockStateTokenizer)
    assert auto("héllo")["input_ids"] == list("héllo".encode())


def test_from_pretrained_takes_a_hub_repo_id(tmp_path, monkeypatch):
    import huggingface_hub

    model = build_model("bst-sh-s4", "tiny", vocab_size=259).eval()
    model.save_pretrained(tmp_path / "snapshot", ByteTokenizer())
    asked = []

    def snapshot_download(repo_id, revision=None, token=None, **kwargs):
        asked.append((repo_id, revision))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    loaded = blockstate.BlockStateLM.from_pretrained("someone/bst-tiny", revision="v1")
    again, tokenizer = blockstate.load("someone/bst-tiny")
    assert asked == [("someone/bst-tiny", "v1"), ("someone/bst-tiny", None)]
    tokens = torch.randint(0, 259, (1, 12))
    assert torch.equal(loaded(tokens), model(tokens)) and torch.equal(again(tokens), model(tokens))
    assert isinstance(tokenizer, ByteTokenizer)

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(blockstate.checkpoint.CheckpointError, match="could not be downloaded"):
        blockstate.BlockStateLM.from_pretrained("someone/missing")


def test_push_to_hub_uploads_an_export(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
            names = sorted(p.name for p in Path(folder_path).iterdir())
            calls.append(("upload", repo_id, commit_message, names))
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = build_model("bst-sh-s4", "tiny", vocab_size=259)
    assert model.push_to_hub("me/bst", ByteTokenizer(), private=True, token="t") == "commit-info"
    assert calls[:2] == [("token", "t"), ("create", "me/bst", True, True)]
    kind, repo, message, names = calls[2]
    assert (kind, repo, message) == ("upload", "me/bst", "Upload blockstate model")
    assert {"config.json", "modeling_blockstate.py", "tokenizer.json", "README.md"} <= set(names)


def test_cli_export_writes_the_run_into_the_card_and_pushes(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from blockstate import loading
    from blockstate.checkpoint import Checkpoint
    from blockstate.cli import main

    run = tmp_path / "run"
    step_dir = run / "checkpoints" / "step-00000040"
    step_dir.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"step": 40, "validation": {"bpb": 2.5}}))
    train = {"model": "bst-mf-s4", "size": "tiny", "data": "python-stdlib", "tokenizer": "byte",
             "max_tokens": 5000}
    checkpoint = Checkpoint(step_dir, 40, {}, {"step": 40, "tokens": 4096, "elapsed": 12.5,
                                               "train_config": train})
    model = build_model("bst-mf-s4", "tiny", vocab_size=259)
    monkeypatch.setattr(loading, "load_with_checkpoint",
                        lambda path, device="cpu": (model, ByteTokenizer(), checkpoint))
    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            uploads.append(("create", repo_id, kwargs.get("private")))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append(("upload", repo_id, folder_path))
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "export"
    assert main(["export", str(run), str(out), "--push-to-hub", "me/bst-mf", "--private"]) == 0
    assert uploads == [("create", "me/bst-mf", True), ("upload", "me/bst-mf", str(out))]
    card = (out / "README.md").read_text()
    for text in ("# bst-mf-s4", "size `tiny`", "| data | python-stdlib |", "| tokens | 4096 |",
                 "| max_tokens | 5000 |", "| validation bpb | 2.5 |", "| steps | 40 |"):
        assert text in card, text
    assert "uploaded to https://huggingface.co/me/bst-mf" in capsys.readouterr().out


@pytest.mark.slow
def test_user_guide_python_examples_run(tmp_path):
    """docs/huggingface.md's ```python blocks run (```py blocks need the Hub), in a subprocess
    whose transformers module cache is under tmp_path."""
    import re

    pytest.importorskip("transformers")
    guide = (Path(__file__).parents[1] / "docs" / "huggingface.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    assert blocks
    env = {**isolated_env(tmp_path), "PYTHONPATH": str(Path(blockstate.__file__).parents[1])}
    for block in blocks:
        run = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
