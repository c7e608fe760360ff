"""The preset registry: typed presets, their tags, tag selection, and configs that stay as they were."""

import dataclasses
import hashlib
import json

import pytest

from blockstate import ModelConfig, list_models, list_sizes, model_config, presets
from blockstate import reproduce as rp
from blockstate.registry import PRESETS, TAGS, Preset, get_preset
from blockstate.tasks import runner

# sha256 (first 16 hex digits) of each preset's config fields that differ from ModelConfig's defaults,
# at the sizes tiny, small, base and large, computed before presets became typed (commit 4903edd):
# turning the dicts into `Preset`s, and any later refactoring, must leave every config as it was.
CONFIG_HASHES = {
    "bst-sh-s4": ("15a32652ecb93c07", "1c12edd72f9a0163", "4039e771dbf22490", "e075492cf10a4f30"),
    "bst-mh-s4": ("fcfae18a28ee33b5", "fe97709ad312d287", "6a8ae43c4a3f3bdd", "9f0a7b058e8f47dd"),
    "bst-mf-s4": ("317871de0cab7ed2", "2e1e7a997ee4241e", "9e1324462b5592c1", "1f00840ea667eca5"),
    "bst-sh-s4d": ("bbcb443f2f9be0ca", "5f61069e5fc0748f", "8bdb91aeda3b82a5", "f075700ebc9854a5"),
    "bst-sh-unstruct": ("d6511714315a4cd0", "43d4361973a9950e", "67faad3843ae3d63", "47bff9844ed6c2cc"),
    "bst-mh-unstruct": ("5fbff178aba90b39", "4448070171bff723", "ef502a58492305c8", "ec34f27887f9a934"),
    "bst-mf-unstruct": ("ad0618080f2da9cf", "45eac9de86e271d5", "3b885e49aa575b80", "9bf942a34570c724"),
    "bst-sh-ssd": ("5aaa235024254eab", "39579fcddfe6f4b0", "23b587da8df1050a", "2e4d58e7fb4677d9"),
    "bst-mf-ssd": ("15097a0f66a0cda9", "a08ba395e4a1250b", "014e9171a936a497", "f5dd634c851a1caf"),
    "bst-sh-ssd-rotary": ("f99922a7b366d056", "76dacdbfaf685eb8", "fdda36262a62410c", "bfc91731bf496d9d"),
    "bst-mf-ssd-rotary": ("3ef0cb3c31df2445", "3f7f8737ff20061e", "d4363d23782d7cd7", "9aa49438654e7f95"),
    "bst-recommended": ("fbd3878b0a9b894d", "291c09a8b7066d19", "ac9e15dcb688a7f0", "82530cac8a587981"),
    "transformer": ("a3e890d7ca3bd9e9", "c0d19846f20e8831", "b326fb7709e874c0", "b102b7eb929ea346"),
    "slide": ("af98f5916e65c581", "6b6f110742ca802a", "4eabd6f093c460e7", "0de836355031e033"),
    "transformer-xl": ("b9249051831b5601", "03fa0dbd2cd52120", "81ac5342def50938", "67de31ebee206d09"),
    "brt": ("42036d98e533a6a4", "cc15b0459ccb144d", "a4f44f58aac72d59", "b8fab2037b0cc780"),
    "gss-hybrid": ("e9daec7139db81f3", "d031e7f4cc2e780a", "74189eb45d847b2e", "dc906238b083a2be"),
    "samba": ("e2581724f5cfcbed", "cab0b8ad057f7f2d", "cf89dec390c33349", "3e08dd2e11494a49"),
}


def _config_hash(name: str, size: str) -> str:
    config, defaults = model_config(name, size), ModelConfig()
    changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(defaults, f.name)}
    return hashlib.sha256(json.dumps(changed, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def test_preset_names_and_configs_are_unchanged():
    assert list_models() == list(CONFIG_HASHES)
    assert list_sizes() == ["tiny", "small", "base", "large"]
    for name, hashes in CONFIG_HASHES.items():
        assert tuple(_config_hash(name, size) for size in list_sizes()) == hashes, name


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
        assert (("selective" in preset.tags) == (config.ssm_kernel == "ssd"
                                                 and bool(config.resolved_bst_layers))), name
        assert (("bst" in preset.tags) == (config.arch == "bst"
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
