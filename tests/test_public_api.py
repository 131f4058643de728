"""The public surface is deliberate: every public module's ``__all__`` is exact."""

from __future__ import annotations

import importlib
import types

import pytest

import apimart_async

PUBLIC_MODULES = [
    "apimart_async",
    "apimart_async.models",
    "apimart_async.types",
    "apimart_async.testing",
    "apimart_async.webhooks",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_lists_exactly_the_public_names(name: str) -> None:
    """__all__ names exist, are unique, and every public non-module name is listed."""
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported))
    for item in exported:
        assert hasattr(module, item), f"{name}.__all__ lists missing {item!r}"
    public = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and not isinstance(value, types.ModuleType)
        and getattr(value, "__module__", name).startswith("apimart_async")
        # Root classes imported by a submodule for its own use are not its exports.
        and (name == "apimart_async" or getattr(value, "__module__", "") != "apimart_async")
        and attr not in {"annotations", "TYPE_CHECKING"}
    }
    assert public <= set(exported) | {"__version__"}, sorted(public - set(exported))


def test_root_exports_the_error_tree_and_client() -> None:
    """The clients, config objects and every error class import from the root."""
    import apimart_async as am

    assert issubclass(am.APITimeoutError, am.APIConnectionError)
    assert issubclass(am.APITimeoutError, TimeoutError)
    assert issubclass(am.TaskTimeoutError, am.TaskError) and issubclass(
        am.TaskTimeoutError, TimeoutError
    )
    assert issubclass(am.UnknownModelError, am.InvalidRequestError)
    assert issubclass(am.InvalidImageError, ValueError)
    assert not issubclass(am.InvalidRequestError, am.ApimartError)
    assert am.AsyncApimart.__module__ == "apimart_async"
    assert am.Apimart.__module__ == "apimart_async"
    assert "Apimart" in am.__all__ and "AsyncApimart" in am.__all__
    assert isinstance(am.__version__, str)


def test_import_has_no_side_effects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing creates no client, starts no thread and reads no environment."""
    import sys
    import threading

    monkeypatch.setenv("APIMART_API_KEY", "should-not-be-read-at-import")
    for mod in [m for m in sys.modules if m.startswith("apimart_async")]:
        monkeypatch.delitem(sys.modules, mod)
    threads = set(threading.enumerate())
    module = importlib.import_module("apimart_async")
    clients = {"AsyncApimart", "Apimart"}
    assert not any(type(v).__name__ in clients for v in vars(module).values())
    assert set(threading.enumerate()) == threads


def test_the_cli_uses_only_the_public_api() -> None:
    """``apimart_async/cli`` imports no private module of the package (``apimart_async._x``)."""
    import ast
    from pathlib import Path

    cli = Path(apimart_async.__file__).parent / "cli"
    private: list[str] = []
    for path in sorted(cli.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [f"{'.' * node.level}{node.module or ''}"]
                if node.level == 1 or (node.module or "").startswith("apimart_async.cli"):
                    continue  # the CLI's own modules
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.lstrip(".").split(".")
                if (name.startswith("..") or parts[0] == "apimart_async") and any(
                    p.startswith("_") for p in parts[1 if parts[0] == "apimart_async" else 0 :]
                ):
                    private.append(f"{path.name}: {name}")
    assert private == []


def test_importing_the_package_imports_nothing_optional() -> None:
    """``import apimart_async`` adds no optional or heavy module to what httpx and
    pydantic bring: aiohttp, rich, uvicorn, OpenTelemetry, trio, stamina (first
    needed at a retry) and asyncio are imported when first used, not before."""
    import subprocess
    import sys

    code = (
        "import sys, httpx; from pydantic import BaseModel\n"
        "before = set(sys.modules)\n"
        "import apimart_async, apimart_async.models, apimart_async.types\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    added = {name.split(".")[0] for name in done.stdout.split()}
    heavy = {
        "aiohttp",
        "rich",
        "uvicorn",
        "opentelemetry",
        "trio",
        "stamina",
        "tenacity",
        "asyncio",
    }
    assert added & heavy == set(), sorted(added & heavy)
    assert "apimart_async" in added  # the check saw the import happen
