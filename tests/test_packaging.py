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


def _imports_of_the_package() -> dict[str, set[str]]:
    """blockstate's modules -> the blockstate modules each imports, at the top or inside a
    function, read from the source."""
    import ast

    package = ROOT / "src"
    paths = {".".join(p.relative_to(package).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (package / "blockstate").rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = here[:len(here) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {t for t in (target, *(f"{target}.{a.name}" for a in node.names)) if t in paths}
        graph[name] = found - {name}
    return graph


def test_no_import_circles():
    """No module of blockstate imports, directly or through others, a module that imports it
    back (lazy imports inside functions included)."""
    graph = _imports_of_the_package()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return seen

    circles = sorted(name for name in graph if name in reachable(name))
    assert not circles, f"modules on an import circle: {circles}"
    assert "blockstate.model" in graph["blockstate"]   # the reader sees the package's imports


def test_version_is_pyproject_version():
    from blockstate import __version__

    assert __version__ == _project()["version"]


def test_no_function_in_src_is_longer_than_100_lines():
    """Every function (or method) of the package is at most 100 lines, counted with ast from its
    `def` to its last line."""
    import ast

    package = ROOT / "src"
    long = {}
    for path in (package / "blockstate").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    long[path.relative_to(package).as_posix(), node.name] = lines
    offenders = {f"{path}:{name} ({lines} lines)" for (path, name), lines in long.items()}
    assert not offenders, f"functions over 100 lines: {sorted(offenders)}"
