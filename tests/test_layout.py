"""The package layout: the method below, its applications on top, and no import pointing up.

Imports are read from the source with :mod:`ast` (lazy imports inside functions included), so a
new upward import fails here whether or not any test happens to run it.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import upfeat

PKG = Path(upfeat.__file__).parent

# Lower rank = lower layer; a module may import its own rank or below. The longest prefix wins.
RANKS = {
    "upfeat": 0,  # the package root, private helpers, io, checkpoint, viz, jitter, lr
    "upfeat.ops": 1,
    "upfeat.backbones": 2,
    "upfeat.upsamplers": 3, "upfeat.downsamplers": 3, "upfeat.losses": 3,
    "upfeat.inference": 4,  # planning, tiled execution, feature files: generic over a model
    "upfeat.model": 5,
    "upfeat.inference.batch": 6, "upfeat.train": 6,
    "upfeat.eval": 7,
    "upfeat.apps": 8, "upfeat.__main__": 8,
}


def _rank(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANKS:
            return RANKS[".".join(parts[:n])]
    raise AssertionError(f"{module} is not in the layout table")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _is_module(name: str) -> bool:
    p = PKG.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _imports() -> list[tuple[str, str]]:
    """``(importer, imported)`` for every upfeat-internal import in the package's source."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        me = _module_name(path)
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(me, a.name) for a in node.names if a.name.split(".")[0] == "upfeat"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "upfeat":
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
                found += [(me, t) for t in subs] or [(me, target)]
    return found


def test_the_imports_are_read():  # the scan itself sees the imports it is meant to police
    pairs = set(_imports())
    assert ("upfeat.apps.cli", "upfeat.inference.batch") in pairs  # a lazy import in a function
    assert ("upfeat.model", "upfeat.backbones") in pairs              # `from . import backbones`
    assert ("upfeat.__main__", "upfeat.apps.cli") in pairs


def test_no_module_imports_one_above_it():
    upward = [f"{a} (layer {_rank(a)}) imports {b} (layer {_rank(b)})"
              for a, b in _imports() if _rank(b) > _rank(a)]
    assert not upward, "\n".join(upward)


def test_the_apps_are_imported_by_nothing_in_the_library():
    users = sorted({a for a, b in _imports() if b.startswith("upfeat.apps")
                    and not a.startswith("upfeat.apps") and a != "upfeat.__main__"})
    assert not users, users


def test_the_command_line_loads_no_torch_until_a_command_runs():
    """``upfeat --help`` / ``upfeat upsample --help`` stay fast (~1 s, torch alone takes ~4 s
    here): the CLI module and everything it imports at start-up are torch-free."""
    code = ("import sys, upfeat.apps.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'numpy', 'PIL', 'gradio'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    helped = subprocess.run([sys.executable, "-m", "upfeat", "upsample", "--help"],
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "--max-memory" in helped.stdout, helped.stderr
