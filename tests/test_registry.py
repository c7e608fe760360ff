"""The preset registry: typed presets, their tags, tag selection, and configs that stay as they were."""

import dataclasses
import json
from pathlib import Path

import pytest

from blockstate import ModelConfig, list_models, list_sizes, model_config, presets
from blockstate import reproduce as rp
from blockstate.registry import PRESETS, TAGS, Preset, get_preset
from blockstate.tasks import runner

# Every preset's config at every size as blockstate wrote it in format 1 (flat fields, commit
# 61562cc, before the components): read through format 1, each must equal today's preset config,
# so nesting the config (and any later refactoring) leaves every preset's model as it was.
FORMAT1_CONFIGS = Path(__file__).parent / "fixtures" / "preset_configs_format1.json"


def test_preset_names_and_configs_are_unchanged():
    saved = json.loads(FORMAT1_CONFIGS.read_text())
    assert list_sizes() == ["tiny", "small", "base", "large"]
    assert sorted(saved) == sorted(f"{name}/{size}" for name in list_models() for size in list_sizes())
    for key, flat in saved.items():
        name, size = key.split("/")
        assert ModelConfig.from_dict(flat) == model_config(name, size), key
        assert ModelConfig.from_dict(model_config(name, size).to_dict()) == model_config(name, size)


def test_presets_are_typed_and_frozen():
    for preset in presets():
        assert isinstance(preset, Preset) and preset is get_preset(preset.name)
        assert preset.description and set(preset.tags) <= set(TAGS)
        with pytest.raises(dataclasses.FrozenInstanceError):
            preset.name = "other"
        with pytest.raises(TypeError):
            preset.overrides["d_model"] = 1   # read-only: a config cannot be changed by accident
    with pytest.raises(ValueError, match="unknown tag"):
        Preset("x", "x", {}, frozenset({"fast"}))


def test_tag_selection():
    assert list_models("paper", "baseline") == ["transformer", "slide", "transformer-xl", "brt",
                                                "gss-hybrid"]
    assert list_models("recommended") == ["bst-recommended"]
    assert [p.name for p in presets("selective", "baseline")] == ["samba"]
    assert list_models("constant-state", "experimental") == list_models("experimental")
    with pytest.raises(ValueError, match="unknown tag.*known tags: paper"):
        list_models("fast")
    with pytest.raises(ValueError, match="unknown model 'bst'; available models: bst-sh-s4"):
        get_preset("bst")


@pytest.mark.parametrize("size", list_sizes())
def test_declared_tags_agree_with_the_configs(size):
    """The tags that a config also shows are declared right at every size."""
    for name, preset in PRESETS.items():
        config = model_config(name, size)
        assert (("constant-state" in preset.tags) == config.constant_inference_state), name
        assert (("selective" in preset.tags) == (config.ssm.kind == "ssd"
                                                 and bool(config.resolved_bst_layers))), name
        assert (("bst" in preset.tags) == (config.arch.kind == "bst"
                                           and bool(config.resolved_bst_layers))), name


def test_every_preset_has_one_standing():
    """Each preset is the paper's, recommended, experimental or a baseline, and BST or a baseline."""
    for preset in presets():
        assert ("bst" in preset.tags) != ("baseline" in preset.tags), preset.name
        standing = preset.tags & {"paper", "recommended", "experimental"}
        assert len(standing) == 1 or not standing and "baseline" in preset.tags, preset.name  # samba


def test_every_preset_is_in_the_suites_its_tags_put_it_in():
    """A preset's tags choose the suites that run it; none may be missing from one."""
    import test_baselines
    import test_generate
    import test_model

    assert set(list_models("paper")) == set(rp.ZOO)          # `blockstate reproduce` runs the paper
    assert set(rp.BST_PRESETS) == set(list_models("paper", "bst"))
    assert set(rp.BASELINES) | set(rp.OTHER_BASELINES) == set(list_models("baseline"))
    assert set(list_models()) == set(rp.KNOWN)                # every preset can be asked for
    assert set(list_models("bst")) == set(runner.BST_PRESETS)  # the task suite keeps their size
    assert set(list_models("constant-state")) == set(test_generate.CONSTANT_STATE)
    assert set(list_models()) == set(test_generate.MODELS) == set(test_model.MODELS)
    assert set(list_models("bst")) == set(test_model.PRESETS)
    assert set(list_models("baseline")) == set(test_baselines.BASELINES)
