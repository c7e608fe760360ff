import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blockstate
from blockstate import checkpoint as ckpt
from blockstate.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from blockstate.fileio import sha256_file


def make_model(**overrides):
    return blockstate.build_model("bst-sh-s4", "tiny", **overrides)


def make_training(seed=0):
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return model, optimizer


def train_step(model, optimizer, batch):
    optimizer.zero_grad()
    logits = model(batch[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    optimizer.step()


def batches(n):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 33), generator=generator) for _ in range(n)]


def save(run_dir, step, model=None, **kwargs):
    model = model if model is not None else make_model()
    return save_checkpoint(run_dir, step, model, model.config.to_dict(), {"tokens_seen": step * 64},
                           **kwargs)


def step_dirs(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def test_round_trip_resumes_exactly(tmp_path):
    model, optimizer = make_training()
    data = batches(3)
    for batch in data[:2]:
        train_step(model, optimizer, batch)
    train_state = {"tokens_seen": 128, "data": {"shard": 3, "offset": 4096}}
    path = save_checkpoint(tmp_path, 2, model, model.config.to_dict(), train_state, optimizer)
    assert path == tmp_path / "checkpoints" / "step-00000002"

    resumed, resumed_optimizer = make_training(seed=1)
    loaded = load_checkpoint(tmp_path)
    assert loaded.path == path and loaded.step == 2 and loaded.train_state == train_state
    assert blockstate.ModelConfig.from_dict(loaded.model_config) == model.config
    loaded.load_model(resumed)
    loaded.load_optimizer(resumed_optimizer)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    saved, restored = optimizer.state_dict(), resumed_optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    for index, entries in saved["state"].items():
        for name, value in entries.items():
            assert type(value) is type(restored["state"][index][name]), name
            assert torch.equal(value, restored["state"][index][name]), (index, name)

    train_step(model, optimizer, data[2])
    train_step(resumed, resumed_optimizer, data[2])
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_file_layout_and_manifest(tmp_path):
    model, optimizer = make_training()
    path = save(tmp_path, 7, model, optimizer=optimizer)
    manifest = json.loads((path / "checkpoint.json").read_text())
    assert manifest["format"] == FORMAT and manifest["version"] == FORMAT_VERSION
    assert manifest["step"] == 7 and manifest["model_config"] == model.config.to_dict()
    assert sorted(manifest["files"]) == ["model.safetensors", "optimizer.json", "optimizer.safetensors",
                                         "rng.safetensors"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000007"


def test_rng_restored(tmp_path):
    save(tmp_path, 1)
    after_save = torch.rand(8)
    torch.manual_seed(123)
    load_checkpoint(tmp_path).restore_rng()
    assert torch.equal(torch.rand(8), after_save)


def test_tokenizer_files_copied(tmp_path):
    tokenizer = tmp_path / "tok"
    (tokenizer / "extra").mkdir(parents=True)
    (tokenizer / "tokenizer.model").write_bytes(bytes(range(256)))
    (tokenizer / "extra" / "vocab.json").write_text('{"a": 1}')
    save(tmp_path / "run", 1, tokenizer_dir=tokenizer)
    copied = load_checkpoint(tmp_path / "run").tokenizer_dir
    assert (copied / "tokenizer.model").read_bytes() == bytes(range(256))
    assert (copied / "extra" / "vocab.json").read_text() == '{"a": 1}'
    save(tmp_path / "bare", 1)
    assert load_checkpoint(tmp_path / "bare").tokenizer_dir is None


def test_keep_prunes_older_and_latest_points_at_newest(tmp_path):
    model = make_model()
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, keep=2)
    assert step_dirs(tmp_path) == ["step-00000003", "step-00000004"]
    newest = tmp_path / "checkpoints" / "step-00000004"
    assert latest_checkpoint(tmp_path) == newest
    for path in (tmp_path, tmp_path / "checkpoints", newest):
        assert load_checkpoint(path).step == 4
    assert load_checkpoint(str(tmp_path / "checkpoints" / "step-00000003")).step == 3
    save(tmp_path, 2, model, keep=1)  # `latest` is the one kept, even though it is not the highest
    assert step_dirs(tmp_path) == ["step-00000002"]


def test_resave_of_same_step_replaces_it(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path, 5, model, {}, {"attempt": 1})
    save_checkpoint(tmp_path, 5, model, {}, {"attempt": 2})
    assert load_checkpoint(tmp_path).train_state == {"attempt": 2}
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000005"]


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = make_training()
    save(tmp_path, 1, model, optimizer=optimizer)
    fsync_file = ckpt.fsync_file

    def dies_on_optimizer_json(path):
        if path.name == "optimizer.json":
            raise KeyboardInterrupt("killed")
        fsync_file(path)

    monkeypatch.setattr(ckpt, "fsync_file", dies_on_optimizer_json)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, optimizer=optimizer)
    monkeypatch.undo()
    temps = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".step-00000002.tmp-")]
    assert len(temps) == 1 and (temps[0] / "model.safetensors").exists()
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    load_checkpoint(tmp_path).load_optimizer(optimizer)

    save(tmp_path, 3, model)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000001", "step-00000003"]


def test_crash_before_first_latest_leaves_no_latest(tmp_path, monkeypatch):
    def dies(*args):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt, "_write_latest", dies)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 1)
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("dies_in", ["rename into place", "final write of latest"])
def test_crash_mid_resave_keeps_a_complete_latest(tmp_path, monkeypatch, dies_in):
    model = make_model()
    save_checkpoint(tmp_path, 1, model, {}, {"attempt": 1})
    rename, replace = os.rename, os.replace

    def rename_dies_into_place(source, target):
        if os.path.basename(target) == "step-00000001":
            raise KeyboardInterrupt("killed")
        rename(source, target)

    def replace_dies_on_latest(source, target):
        if Path(source).read_text().strip() == "step-00000001":
            raise KeyboardInterrupt("killed")
        replace(source, target)

    if dies_in == "rename into place":
        monkeypatch.setattr(os, "rename", rename_dies_into_place)
    else:
        monkeypatch.setattr(os, "replace", replace_dies_on_latest)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 1, model, {}, {"attempt": 2})
    monkeypatch.undo()
    # `latest` names the new checkpoint's temporary dir: still there, or already renamed into place
    assert (tmp_path / "checkpoints" / "latest").read_text().startswith(".step-00000001.tmp-")
    assert load_checkpoint(tmp_path).train_state == {"attempt": 2}

    save_checkpoint(tmp_path, 2, model, {}, {"attempt": 3})  # completes the interrupted re-save first
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000001", "step-00000002"]
    assert load_checkpoint(tmp_path / "checkpoints" / "step-00000001").train_state == {"attempt": 2}


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_weights_are_detected(tmp_path, damage):
    path = save(tmp_path, 1) / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupted"):
        load_checkpoint(tmp_path)


def test_unparsable_safetensors_is_detected(tmp_path):
    path = save(tmp_path, 1)
    (path / "rng.safetensors").write_bytes(b"not a safetensors file")
    manifest = json.loads((path / "checkpoint.json").read_text())
    manifest["files"]["rng.safetensors"] = sha256_file(path / "rng.safetensors")
    (path / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"rng\.safetensors is corrupted"):
        load_checkpoint(path)


def test_missing_file_and_unsupported_version(tmp_path):
    path = save(tmp_path, 1)
    manifest = json.loads((path / "checkpoint.json").read_text())
    (path / "checkpoint.json").write_text(json.dumps({**manifest, "version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}; this blockstate "
                                              f"reads versions 1-{FORMAT_VERSION}: upgrade"):
        load_checkpoint(path)
    (path / "checkpoint.json").write_text(json.dumps(manifest))
    (path / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"rng\.safetensors is missing"):
        load_checkpoint(path)


def test_foreign_directories_are_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a blockstate checkpoint"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoint.json").write_text(json.dumps({"format": "pt", "weights": []}))
    with pytest.raises(CheckpointError, match="not a blockstate checkpoint"):
        load_checkpoint(tmp_path / "other")
    (tmp_path / "other" / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a blockstate checkpoint"):
        load_checkpoint(tmp_path / "other")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("../../etc")
    with pytest.raises(CheckpointError, match="not a checkpoint directory name"):
        latest_checkpoint(tmp_path / "run")


def test_tied_weights_round_trip(tmp_path):
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    save_checkpoint(tmp_path, 1, tied, {}, {})
    fresh = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    load_checkpoint(tmp_path).load_model(fresh)
    assert torch.equal(fresh[0].weight, tied[0].weight) and torch.equal(fresh[1].weight, tied[0].weight)


def test_weights_of_another_size_are_rejected(tmp_path):
    save(tmp_path, 1)
    loaded = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"embedding\.weight has shape \(256, 64\) in the checkpoint "
                                              r"but \(256, 32\)"):
        loaded.load_model(make_model(d_model=32))
    with pytest.raises(CheckpointError, match=r"missing keys \[layers\.2\."):
        loaded.load_model(make_model(n_layers=3))


def test_missing_optimizer_and_bad_arguments(tmp_path):
    model = make_model()
    save(tmp_path, 1, model)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path).load_optimizer(optimizer)
    with pytest.raises(CheckpointError, match="train_state holds a Tensor"):
        save_checkpoint(tmp_path, 2, model, {}, {"loss": torch.tensor(1.0)})
    with pytest.raises(CheckpointError, match="step=-1"):
        save_checkpoint(tmp_path, -1, model, {}, {})
    with pytest.raises(CheckpointError, match="tokenizer_dir"):
        save_checkpoint(tmp_path, 2, model, {}, {}, tokenizer_dir=tmp_path / "absent")
    assert step_dirs(tmp_path) == ["step-00000001"]  # nothing was written by the rejected saves


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    """The one atomic-write helper: bytes, text or a writer function; a writer that fails leaves
    the previous file intact and no temporary behind."""
    from blockstate.fileio import atomic_write

    target = tmp_path / "data.json"
    atomic_write(target, "old")
    atomic_write(target, b"new", durable=True)
    assert target.read_text() == "new"

    def broken(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]
