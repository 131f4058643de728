"""The public surface is deliberate: every public module's ``__all__`` is exact."""

from __future__ import annotations

import importlib
import importlib.util
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
    for name in module.__all__:  # the lazily loaded names too
        getattr(module, name)
    clients = {"AsyncApimart", "Apimart"}
    assert not any(type(v).__name__ in clients for v in vars(module).values())
    # Only threads that appeared count: an idle worker left by an earlier test may exit
    # meanwhile, which is not the import's doing.
    assert set(threading.enumerate()) - threads == set()


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


def _type_checking_imports() -> dict[str, str]:
    """Name -> module (``._client``) of the root's ``if TYPE_CHECKING:`` imports."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(apimart_async.__file__).read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom), ast.unparse(stmt)
                for alias in stmt.names:
                    found[alias.asname or alias.name] = "." * stmt.level + (stmt.module or "")
    return found


def test_the_lazy_table_all_and_the_type_checking_imports_agree() -> None:
    """Every lazily loaded name is in ``__all__``, imported under ``TYPE_CHECKING`` from
    the module the table loads it from (so type checkers see what users get), and is
    not also bound at import; every other ``__all__`` name is bound at import."""
    lazy: dict[str, str] = apimart_async._LAZY  # pyright: ignore[reportPrivateUsage]
    assert _type_checking_imports() == lazy
    assert set(lazy) <= set(apimart_async.__all__)
    fresh = _fresh_root()
    eager = {name for name in apimart_async.__all__ if name in vars(fresh)}
    assert eager == set(apimart_async.__all__) - set(lazy)
    for name, module in lazy.items():
        source = importlib.import_module(module, "apimart_async")
        assert getattr(fresh, name) is getattr(source, name), name


def _fresh_root() -> types.ModuleType:
    """A second, freshly executed copy of the package root (lazy names not loaded)."""
    spec = importlib.util.spec_from_file_location(
        "apimart_async",
        apimart_async.__file__,
        submodule_search_locations=list(apimart_async.__path__),
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lazy_names_are_listed_by_dir_and_star_import() -> None:
    """``dir()`` and ``from apimart_async import *`` see every public name, loaded or not;
    a name the package does not export is an ``AttributeError``, as for any module."""
    fresh = _fresh_root()
    assert set(apimart_async.__all__) <= set(dir(fresh))
    with pytest.raises(AttributeError, match="has no attribute 'AsyncClient'"):
        fresh.AsyncClient  # noqa: B018
    code = (
        "from apimart_async import *\n"
        "import apimart_async\n"
        "print(sorted(set(apimart_async.__all__) - set(globals())))\n"
        "try:\n"
        "    from apimart_async import Client\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    assert _run(code).splitlines() == ["[]", "ImportError"]


def _run(code: str) -> str:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "first",
    [
        "import apimart_async as am\nfor n in am.__all__: getattr(am, n)",
        (
            "import apimart_async._client, apimart_async._sync, apimart_async.types\n"
            "import apimart_async._pipeline, apimart_async._portal\nimport apimart_async as am"
        ),
    ],
    ids=["through-the-root", "submodules-first"],
)
def test_public_classes_show_as_the_root_however_they_were_loaded(first: str) -> None:
    """Public classes read ``apimart_async.X`` in reprs and tracebacks, as when the
    package loaded them all at import, even when a submodule was imported first and
    the root's lazy look-up never ran."""
    code = (
        f"{first}\n"
        "import importlib\n"
        "def source(n):  # the defining module: not the root's __getattr__\n"
        "    m = am._LAZY.get(n)\n"
        "    return vars(am)[n] if m is None else getattr(importlib.import_module(m, am.__name__), n)\n"
        "names = [n for n in am.__all__ if isinstance(source(n), type)]\n"
        "print(' '.join(f'{n}={source(n).__module__}' for n in names))\n"
    )
    shown = dict(item.split("=") for item in _run(code).split())
    lazy_classes = set(apimart_async._LAZY) - {"NOT_GIVEN", "Event"}  # pyright: ignore[reportPrivateUsage]
    assert lazy_classes <= set(shown)
    assert dict.fromkeys(shown, "apimart_async") == shown


# Modules only the blocking client, generate_many, webhooks, telemetry, downloads or the
# job engine need: ``from apimart_async import AsyncApimart`` must not load them.
LAZY_MODULES = {
    "apimart_async._sync",
    "apimart_async._portal",
    "apimart_async._pipeline",
    "apimart_async._budget",
    "apimart_async._jobs",
    "apimart_async._http",
    "apimart_async._transport",
    "apimart_async._telemetry",
    "apimart_async._download",
    "apimart_async._uploads",
    "apimart_async._pushes",
    "apimart_async.webhooks",
    "apimart_async._webhook_url",
    "apimart_async.models",
    "apimart_async.types",
    "anyio.from_thread",
    "pydantic.main",
}


@pytest.mark.parametrize(
    "statement", ["import apimart_async", "from apimart_async import AsyncApimart"]
)
def test_importing_the_client_defers_what_it_needs_later(statement: str) -> None:
    """The engine, the pydantic models, the blocking client's portal and the webhook
    receiver are loaded on first use (PEP 562 and function-level imports), not by the
    import; an async client's first ``generate`` loads no blocking-client module."""
    code = (
        "import sys\n"
        f"{statement}\n"
        "print(' '.join(sorted(sys.modules)))\n"
        "import anyio\n"
        "from apimart_async import AsyncApimart, PollPolicy\n"
        "from apimart_async.testing import FakeApimart\n"
        "async def main():\n"
        "    fake = FakeApimart(api_key='k')\n"
        "    async with AsyncApimart(api_key='k', transport=fake.transport(),\n"
        "                            poll=PollPolicy().scaled(0.001)) as client:\n"
        "        task = await client.generate(model='imagen-4.0-apimart', prompt='p')\n"
        "    print(task.status.value)\n"
        "anyio.run(main)\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    at_import, status, after_use = _run(code).splitlines()
    assert LAZY_MODULES & set(at_import.split()) == set()
    assert status == "completed"
    used = set(after_use.split())
    assert {"apimart_async._jobs", "apimart_async.models", "apimart_async.types"} <= used
    blocking = {
        "apimart_async._sync",
        "apimart_async._portal",
        "anyio.from_thread",
        "apimart_async._webhook_url",  # no webhook was given
    }
    assert blocking & used == set()
