"""Every module's ``__all__``, private ones included, says what the module offers.

A private module's ``__all__`` is its contract with the rest of the package: what other
modules may import from it. It drifts silently (a name imported elsewhere but never
listed, a listed name long gone), so this checks both directions from the sources.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import apimart_async

ROOT = Path(apimart_async.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imported_from_each_module() -> dict[str, set[str]]:
    """For each module of the package: the names other modules import from it."""
    wanted: dict[str, set[str]] = {}
    for name, path in SOURCES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            # Dunders (``__version__``) are the module's by convention, listed or not.
            names = (a.name for a in node.names if not a.name.startswith("__"))
            wanted.setdefault(target, set()).update(names)
    return wanted


IMPORTED = _imported_from_each_module()


@pytest.mark.parametrize("name", [n for n in SOURCES if n.rpartition(".")[2].startswith("_")])
def test_private_all_lists_what_others_import_and_nothing_missing(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    taken = {n for n in IMPORTED.get(name, set()) if f"{name}.{n}" not in SOURCES}
    if exported is None:
        # No list: then nothing of it may be imported elsewhere but submodules.
        assert name.endswith("__main__") or not taken, f"{name} has no __all__ but gives {taken}"
        return
    assert len(exported) == len(set(exported)), f"{name}.__all__ repeats a name"
    assert [n for n in exported if not hasattr(module, n)] == [], f"{name}.__all__ lists ghosts"
    assert sorted(taken - set(exported)) == [], f"imported from {name} but not in its __all__"
