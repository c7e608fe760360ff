"""pyproject.toml's requirements (issue 38, item 6): the extras users install, floors that the
test environment satisfies, upper bounds where blockstate uses private parts of a package, and a
setup that installs what the test-suite covers."""

import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
requirements = pytest.importorskip("packaging.requirements")

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _names(specs: list[str]) -> set[str]:
    return {requirements.Requirement(s).name.replace("_", "-") for s in specs}


def test_extras_are_separate_and_all_holds_every_feature():
    extras = _project()["optional-dependencies"]
    assert {"dev", "hf", "lm-eval", "tensorboard", "wandb", "plot", "yaml", "all"} <= set(extras)
    # dev: test and lint tools only (and matplotlib, which `eval --plot`'s test needs)
    assert _names(extras["dev"]) == {"pytest", "hypothesis", "ruff", "matplotlib"}
    (everything,) = extras["all"]
    assert set(requirements.Requirement(everything).extras) == set(extras) - {"dev", "all"}


def test_private_apis_are_bounded_above_and_every_floor_is_installed_here():
    project = _project()
    extras = project["optional-dependencies"]
    specs = [*project["dependencies"], *(s for name, group in extras.items() if name != "all"
                                         for s in group)]
    checked = 0
    for text in specs:
        requirement = requirements.Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        if requirement.name in ("transformers", "lm_eval"):  # blockstate.hf, blockstate.harness
            assert any(spec.operator == "<" for spec in requirement.specifier), text
        installed = metadata.version(requirement.name)  # setup.sh installs every extra's packages
        assert requirement.specifier.contains(installed, prereleases=True), (text, installed)
        checked += 1
    assert checked >= 8


def test_setup_installs_the_extras_the_test_suite_covers():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "dev,hf,lm-eval,tensorboard,wandb" in setup and "pinned CPU build" not in setup
    assert "torch.cuda.is_available()" in setup  # says which build it installed
