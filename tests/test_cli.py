import re
import subprocess
import sys
from pathlib import Path

import pytest

from blockstate.cli import main

from reference import word_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # seconds: the whole suite runs it, the fast subset does not
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
    assert "bst-mf-unstruct" in out and "tiny" in out and "paper,bst" in out
    assert main(["models", "--sizes", "tiny", "--tag", "paper,baseline"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["transformer", "slide", "transformer-xl", "brt",
                                                "gss-hybrid"]
    assert main(["models", "--tag", "fast"]) == 2
    assert "unknown tag(s) ['fast']" in capsys.readouterr().err


def test_bad_arguments_exit_cleanly(capsys):
    assert main(["bench", "models", "--size", "tiny", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # `demo` was folded into `bench models`
        main(["demo"])


@pytest.mark.slow  # seconds: the whole suite runs it, the fast subset does not
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


# ---------------------------------------------------------------- help, config files, fine-tuning,
# sampling during training (issue 38, item 5)

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return word_corpus(tmp_path_factory.mktemp("corpus") / "docs", 80)


def _train_argv(corpus: Path, run: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--model", "bst-sh-s4", "--size", "tiny", "--data", str(corpus), "--out",
            str(run), "--seq-len", "64", "--batch-size", "4", "--warmup-steps", "1",
            "--set", "block_size=16", "--set", "dropout=0.1", "--eval-every", "1000",
            "--eval-batches", "1", "--log-every", "1", "--sample-tokens", "0", "--quiet",
            "--cache-dir", str(tmp_path / "cache"), *extra]


def _records(run: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r and "split" not in r}


def _help_entries(text: str) -> dict[str, tuple[str, str]]:
    """argparse help -> {first option string: (group heading, help text)}."""
    entries: dict[str, tuple[str, str]] = {}
    heading, current = "", None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            heading, current = line[:-1], None
        elif re.match(r"^  \S", line) and heading:
            invocation, _, help_text = line.strip().partition("  ")
            current = invocation.split(",")[0].split(" ")[0] if line[2] == "-" else invocation
            entries[current] = (heading, help_text.strip())
        elif line.startswith("    ") and current is not None:
            group, help_text = entries[current]
            entries[current] = (group, f"{help_text} {line.strip()}".strip())
    return entries


def test_train_help_groups_every_option_with_help_and_one_default(capsys):
    import dataclasses

    from blockstate.cli import build_parser
    from blockstate.train_config import FIELD_GROUPS, TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    entries = _help_entries(text)
    headings = [h for h in FIELD_GROUPS]
    assert [h for h in re.findall(r"^(\S[^\n]*):$", text, flags=re.M) if h in headings] == headings
    grouped = [name for names in FIELD_GROUPS.values() for name in names]
    # each field once, and TrainConfig declares its fields group by group in this order
    assert grouped == [f.name for f in dataclasses.fields(TrainConfig)]
    for name in grouped:
        if name != "model_overrides":
            heading, _ = entries["--" + name.replace("_", "-")]
            assert name in FIELD_GROUPS[heading], (name, heading)
    assert entries["--set"][0] == "model" and entries["--resume"][0].startswith("checkpointing")
    assert entries["--max-steps"][0].startswith("budget")
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in train_parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert entries[flag][1], f"{flag} has no help"
        defaults = entries[flag][1].lower().count("default")
        switch = action.required or action.default is False  # --out; store_true, --resume
        assert defaults == (0 if switch else 1), (flag, entries[flag][1])


@pytest.mark.parametrize("command", ["eval", "generate", "tasks", "reproduce", "models", "corpora",
                                     "export", "bench", "bench layers", "bench models",
                                     "bench generation", "bench quality", "bench imports"])
def test_every_command_shows_help_and_its_defaults_once(command, capsys):
    from blockstate.cli import build_parser

    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    entries = _help_entries(capsys.readouterr().out)
    parser = build_parser()
    for word in command.split():
        parser = parser._subparsers._group_actions[0].choices[word]
    for action in parser._actions:
        if action.dest == "help":
            continue
        name = (action.option_strings[0] if action.option_strings else action.metavar
                or ("{" + ",".join(action.choices) + "}" if action.choices else action.dest))
        help_text = entries[name][1]
        assert help_text, f"{command} {name} has no help"
        shown = action.option_strings and not action.required and action.default is not False
        assert help_text.lower().count("default") == (1 if shown else 0), (name, help_text)


def test_module_docstring_names_only_real_commands():
    import blockstate.cli as cli
    from blockstate.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    named = set(re.search(r"`blockstate ([^`]*)`", cli.__doc__).group(1).split()) - {"|"}
    assert named == commands and "demo" not in cli.__doc__


def test_a_runs_train_config_json_trains_the_same_run_again(corpus, tmp_path):
    run, again = tmp_path / "run", tmp_path / "again"
    assert main(_train_argv(corpus, run, tmp_path, "--max-steps", "3")) == 0
    assert main(["train", "--config", str(run / "train_config.json"), "--out", str(again),
                 "--quiet"]) == 0
    assert _losses(again) == _losses(run) and len(_losses(run)) == 3
    # flags still win over the file; a flat JSON file of options is a config too
    flat = tmp_path / "options.json"
    flat.write_text('{"max_steps": 1, "model": "transformer", "size": "tiny", "seq_len": 64}')
    from blockstate.train_config import read_config_file

    assert read_config_file(flat)["model"] == "transformer"
    assert read_config_file(run / "train_config.json")["max_steps"] == 3
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["train", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x"),
                 "--max-steps", "1"]) == 2


def test_init_from_fine_tunes_from_the_weights_and_refuses_another_model(corpus, tmp_path, capsys):
    pretrained, fresh, tuned = tmp_path / "pretrained", tmp_path / "fresh", tmp_path / "tuned"
    assert main(_train_argv(corpus, pretrained, tmp_path, "--max-steps", "12", "--lr", "0.01")) == 0
    assert main(_train_argv(corpus, fresh, tmp_path, "--max-steps", "1")) == 0
    # the model (preset, size, --set) and tokenizer come from the checkpoint
    assert main(["train", "--init-from", str(pretrained), "--data", str(corpus), "--out", str(tuned),
                 "--seq-len", "64", "--batch-size", "4", "--max-steps", "1", "--quiet",
                 "--sample-tokens", "0", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert _losses(tuned)[1] < _losses(fresh)[1] - 0.3
    from blockstate.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(tuned)
    assert checkpoint.step == 1 and checkpoint.model_config == load_checkpoint(pretrained).model_config
    capsys.readouterr()
    assert main(["train", "--init-from", str(pretrained), "--data", str(corpus), "--out",
                 str(tmp_path / "other"), "--set", "n_layers=3", "--max-steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model config does not match" in err and "n_layers=3" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "other").exists()
    # fine-tuning over the run it starts from would remove its own weights: refused
    assert main(["train", "--init-from", str(pretrained), "--data", str(corpus), "--out",
                 str(pretrained), "--overwrite", "--max-steps", "1", "--quiet"]) == 2
    assert "lies inside --out" in capsys.readouterr().err
    assert load_checkpoint(pretrained).step == 12


def test_init_from_in_python_resumes_as_its_own_run(corpus, tmp_path, monkeypatch):
    """From Python: a TrainConfig that describes the checkpoint's model fine-tunes from it (a
    relative path is stored absolute); the fine-tune resumes from its own checkpoints with the
    same config, and a model config that differs is refused."""
    from blockstate.checkpoint import load_checkpoint
    from blockstate.train import TrainConfig, train

    monkeypatch.chdir(tmp_path)
    fields = dict(model="bst-sh-s4", size="tiny", data=str(corpus), seq_len=64, batch_size=4,
                  warmup_steps=1, eval_batches=1, sample_tokens=0, cache_dir=str(tmp_path / "c"),
                  model_overrides={"block_size": 16})
    train(TrainConfig(**fields, max_steps=2), "pre", quiet=True)
    tuned = TrainConfig(**fields, max_steps=1, init_from="pre", lr=3e-4)
    train(tuned, "tuned", quiet=True)
    saved = load_checkpoint(tmp_path / "tuned").train_state["train_config"]
    assert saved["init_from"] == str(tmp_path / "pre")
    assert train(TrainConfig(**{**fields, "model_overrides": {"block_size": 16}}, max_steps=2,
                             init_from="pre", lr=3e-4), "tuned", resume=True, quiet=True)["step"] == 2
    with pytest.raises(ValueError, match="does not match"):
        train(TrainConfig(**{**fields, "model_overrides": {"block_size": 32}}, max_steps=1,
                          init_from="pre"), "other", quiet=True)


def test_output_options_change_on_resume_without_override_and_leave_the_weights(corpus, tmp_path,
                                                                                capsys):
    """Sampling, logging, validation and checkpoint frequency change only what a run writes: a
    resume may change them without --override, and the losses are those of the run without them
    (sampling and validation do not touch training's random numbers; the model has dropout)."""
    plain, run = tmp_path / "plain", tmp_path / "run"
    assert main(_train_argv(corpus, plain, tmp_path, "--max-steps", "4")) == 0
    assert main(_train_argv(corpus, run, tmp_path, "--max-steps", "2", "--save-every", "2")) == 0
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "4", "--quiet",
                 "--sample-every", "1", "--sample-tokens", "6", "--sample-prompt", "alpha beta",
                 "--eval-every", "1", "--save-every", "1"]) == 0
    assert _losses(run) == _losses(plain)
    samples = [r for r in _records(run) if r.get("split") == "sample"]
    assert [r["step"] for r in samples] == [3, 4] and samples[0]["prompt"] == "alpha beta"
    assert all(isinstance(r["continuation"], str) for r in samples)
    # the first part validated at its end (step 2), the resumed part at every step
    assert [r["step"] for r in _records(run) if r.get("split") == "validation"] == [2, 3, 4]
    # `--sample-tokens 0` on resume (the run now samples 6) changes only the output
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "5", "--sample-tokens",
                 "0", "--quiet"]) == 0
    assert [r["step"] for r in _records(run) if r.get("split") == "sample"] == [3, 4]
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--lr", "0.5",
                 "--quiet"]) == 2  # a setting that changes the weights still needs --override
    assert "--override" in capsys.readouterr().err


def test_sample_every_logs_samples_during_training(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [a for a in _train_argv(corpus, run, tmp_path, "--max-steps", "2") if a != "--quiet"]
    assert main(argv + ["--sample-every", "1", "--sample-tokens", "4", "--log-to", "none"]) == 0
    out = capsys.readouterr().out
    assert "step 1: sample: " in out and "step 2: sample: " in out
    first = [r for r in _records(run) if r.get("split") == "sample"][0]
    assert first["prompt"].startswith("document")  # the first validation sequence's start


def test_warmup_longer_than_the_run_warns(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [a for a in _train_argv(corpus, run, tmp_path, "--max-steps", "2") if a != "--quiet"]
    assert main([a if a != "1" or i != argv.index("--warmup-steps") + 1 else "5"
                 for i, a in enumerate(argv)] + ["--log-to", "none"]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "warmup_steps=5" in line]
    assert len(warnings) == 1 and "2 planned steps" in warnings[0]
    assert main(argv + ["--log-to", "none", "--overwrite"]) == 0  # warmup 1 < 2 steps: no warning
    assert "warning: warmup_steps" not in capsys.readouterr().out
