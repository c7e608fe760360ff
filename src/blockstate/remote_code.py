"""The Python files an export carries so that plain `transformers` loads it with
`trust_remote_code=True`, blockstate not installed.

`transformers` copies (or downloads) a remote-code file together with the files it imports
relatively, found by a regular expression over lines `from .NAME import ...` where NAME.py sits in
the same folder; sub-packages and `from . import x` are not followed. So the export is flat:

    configuration_blockstate.py   blockstate/hf_config.py     (BlockStateConfig)
    modeling_blockstate.py        blockstate/hf_modeling.py   (BlockStateForCausalLM, the cache)
    blockstate_<module>.py        every blockstate module those import, directly or lazily, e.g.
                                  blockstate_model.py, blockstate_layers_bst.py (layers/bst.py),
                                  blockstate_ssm.py (ssm/__init__.py)

each a verbatim copy of blockstate's source with only its import statements rewritten: relative
imports name the flat files; the lazy imports of modules that need more than the model (saving,
loading, tokenizers: `NOT_BUNDLED`) raise ImportError saying to install blockstate; absolute
imports of optional packages (mamba-ssm's CUDA kernels) go through importlib, since
`transformers` refuses a file whose plain imports are not installed. `bundle()` checks the result
with the same regular expression `transformers` uses.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ENTRY_MODULES = {"hf_config": "configuration_blockstate", "hf_modeling": "modeling_blockstate"}
NOT_BUNDLED = {"pretrained"}  # BlockStateLM.save_pretrained/from_pretrained: blockstate itself
# transformers and its own dependencies: installed wherever remote code runs
REQUIRED = ({"torch", "transformers", "numpy", "safetensors", "huggingface_hub", "tokenizers",
             "__future__"} | set(sys.stdlib_module_names))
_TRANSFORMERS_RELATIVE = re.compile(r"^\s*from\s+\.(\S+)\s+import", flags=re.MULTILINE)


class BundleError(RuntimeError):
    """blockstate's source uses an import form the flat export cannot carry."""


def flat_name(module: str) -> str:
    """The export's file stem for a blockstate module given relative to the package
    ("layers.bst" -> "blockstate_layers_bst")."""
    return ENTRY_MODULES.get(module) or "blockstate_" + module.replace(".", "_")


def _source_path(module: str) -> Path:
    path = PACKAGE_DIR.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _exists(module: str) -> bool:
    return _source_path(module).is_file()


def _target(module: str, node: ast.ImportFrom) -> str:
    """The package-relative module a relative import in `module` names."""
    is_package = _source_path(module).name == "__init__.py"
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
    if node.level - 1 > len(module.split(".")):
        raise BundleError(f"blockstate/{module}: an import leaves the package")
    return ".".join(parts + ([node.module] if node.module else []))


def _plain_imports(tree: ast.AST):
    """Import statements outside try blocks (those `transformers` checks are installed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Try):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _rewrite(module: str) -> tuple[str, set[str]]:
    """The export's text of `module` and the modules it imports relatively."""
    text = _source_path(module).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    needed: set[str] = set()
    edits: list[tuple[int, int, str]] = []       # (first line, last line, replacement), 0-based
    for node in _plain_imports(ast.parse(text)):
        first, last = node.lineno - 1, node.end_lineno - 1
        indent = lines[first][:node.col_offset]
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.module is None:
                raise BundleError(f"blockstate/{module}: `from . import` is not carried by "
                                  f"transformers' remote code; import from the module")
            target = _target(module, node)
            if target in NOT_BUNDLED or not _exists(target):
                message = (f"blockstate.{target} is not part of this export of a blockstate model; "
                           f"pip install blockstate for it")
                edits.append((first, last, f"{indent}raise ImportError({message!r})\n"))
                continue
            needed.add(target)
            head = lines[first]
            new = re.sub(r"from\s+\.+[\w.]*", f"from .{flat_name(target)}", head[node.col_offset:],
                         count=1)
            edits.append((first, first, head[:node.col_offset] + new))
            continue
        names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        optional = [n for n in names if n and n.split(".")[0] not in REQUIRED]
        if not optional:
            continue
        if not (isinstance(node, ast.ImportFrom) and first == last and len(node.names) == 1):
            raise BundleError(f"blockstate/{module}:{node.lineno}: import an optional package as "
                              f"`from PACKAGE import NAME` on one line")
        alias = node.names[0]
        edits.append((first, last, f"{indent}{alias.asname or alias.name} = __import__("
                      f"'importlib').import_module({node.module!r}).{alias.name}\n"))
    for first, last, replacement in sorted(edits, reverse=True):
        lines[first:last + 1] = [replacement] + ["\n"] * (last - first)   # line numbers kept
    header = (f"# blockstate/{_source_path(module).relative_to(PACKAGE_DIR).as_posix()}, "
              f"bundled with an exported model (imports rewritten; see blockstate.remote_code)\n")
    return header + "".join(lines), needed


def bundle() -> dict[str, str]:
    """File name -> text of every Python file an export carries."""
    files: dict[str, str] = {}
    todo, done = list(ENTRY_MODULES), set()
    while todo:
        module = todo.pop()
        if module in done:
            continue
        done.add(module)
        text, needed = _rewrite(module)
        files[flat_name(module) + ".py"] = text
        todo.extend(needed - done)
    for name, text in files.items():           # what transformers will look for
        for imported in _TRANSFORMERS_RELATIVE.findall(text):
            if f"{imported}.py" not in files:
                raise BundleError(f"{name} seems to import .{imported} (a line matching "
                                  f"transformers' pattern `from .X import`), which the export "
                                  f"lacks")
    return dict(sorted(files.items()))


def write_bundle(directory: str | Path) -> list[str]:
    """Write the files of `bundle()` into `directory`; returns their names."""
    from .fileio import atomic_write

    files = bundle()
    for name, text in files.items():
        atomic_write(Path(directory) / name, text)
    return list(files)


__all__ = ["BundleError", "bundle", "flat_name", "write_bundle"]
