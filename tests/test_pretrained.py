"""Saving and loading models in the Hugging Face directory layout (no transformers needed)."""

import json

import pytest
import torch

import blockstate
from blockstate import BlockStateLM, build_model
from blockstate.checkpoint import CheckpointError
from blockstate.data import ByteTokenizer


@pytest.mark.parametrize("name", blockstate.list_models())
def test_save_and_load_pretrained_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, "tiny", vocab_size=259).eval()
    model.save_pretrained(tmp_path / "m", ByteTokenizer())
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "blockstate" and config["d_model"] == model.config.d_model
    loaded = BlockStateLM.from_pretrained(tmp_path / "m")
    tokens = torch.randint(0, 259, (2, 40))
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded(tokens), model(tokens))
    again, tokenizer = blockstate.load(tmp_path / "m")
    assert isinstance(tokenizer, ByteTokenizer) and torch.equal(again(tokens), model(tokens))


def test_bad_pretrained_directories_are_named(tmp_path):
    model = build_model("bst-sh-s4", "tiny")
    with pytest.raises(ValueError, match="vocab_size=256"):
        model.save_pretrained(tmp_path / "m", ByteTokenizer())     # 259 tokens
    model.save_pretrained(tmp_path / "m")
    assert blockstate.load(tmp_path / "m")[1] is None              # saved without a tokenizer
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    with pytest.raises(CheckpointError, match="config.json is missing"):
        BlockStateLM.from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a blockstate model config"):
        BlockStateLM.from_pretrained(tmp_path / "m")
    config_path.write_text(json.dumps({**config, "d_model": 96}))
    with pytest.raises(CheckpointError, match="does not fit"):
        BlockStateLM.from_pretrained(tmp_path / "m")
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        BlockStateLM.from_pretrained(tmp_path / "m")
    config_path.write_text(json.dumps(config))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        BlockStateLM.from_pretrained(tmp_path / "m")


def test_an_export_of_a_newer_format_is_refused_in_one_line_and_kept(tmp_path):
    from blockstate.pretrained import CONFIG_FILE, EXPORT_FORMAT

    build_model("bst-sh-s4", "tiny", vocab_size=64).save_pretrained(tmp_path / "export")
    path = tmp_path / "export" / CONFIG_FILE
    data = json.loads(path.read_text())
    assert data["blockstate_format"] == EXPORT_FORMAT
    path.write_text(json.dumps({**data, "blockstate_format": EXPORT_FORMAT + 1}))
    before = path.read_text()
    with pytest.raises(CheckpointError, match="upgrade blockstate") as error:
        blockstate.load(tmp_path / "export")
    assert "\n" not in str(error.value) and path.read_text() == before
