"""Start-up costs, each in a fresh interpreter: what a CLI, a serverless function or a
web app's first request pays before any steady state (issue 15).

Probes (one fresh interpreter each, one JSON object printed):

* ``import-baseline``: ``import httpx; from pydantic import BaseModel``, what any
  program built on those two pays anyway;
* ``import-apimart``: ``import apimart_async``; also which optional or heavy packages
  the import pulled in (it should add none to the baseline's);
* ``import-client``: ``from apimart_async import AsyncApimart``, what a program that
  uses the client imports (the package loads most names on first use: PEP 562);
* ``import-eager``: ``import apimart_async`` and then every module of the package that
  its import used to load before it was lazy (all but ``_aiohttp``, ``webhooks``, the
  CLI and the fake): the import as it would cost if nothing were deferred (in a fresh
  interpreter: it includes httpx and pydantic's ``BaseModel``, which the lazy import
  does not load either);
* ``schemas``: after importing the models, building every pydantic schema the package
  defers to first use (``model_rebuild(force=True)`` on each of its models): what the
  import would cost more if the schemas were built at class creation;
* ``first-call`` (``python -m benchmarks.startup first-call [--eager]``):
  ``AsyncApimart`` against the in-process fake (``FakeApimart(latency=zero)
  .transport()``): client creation, then the first ``generate`` (upload of PNG bytes,
  submit, one poll) against the second and third, and how many deferred schemas the
  first one built. The fake and httpx's in-process path are warmed first with raw
  httpx requests, so the first call pays only our client's first-use work (against
  the real service, the server's first request costs the client nothing). With
  ``--eager`` the modules of ``import-eager`` are imported (and timed) right before
  the client is created, as the package's import used to load them: that reading is
  what deferring *saved* a program that goes on to use the client (the fake has
  loaded httpx by then), and the difference between the two modes' creation + first
  call is what the lazy client *pays back* of it. The target: paid back <= saved.

Every figure is CPU time (``time.process_time``, all threads) around the statement
alone, interpreter start-up excluded: on a shared machine, wall time of a 200 ms
import swings by several hundred ms with the load, CPU time far less. Wall time
(``perf_counter``) is reported beside it. The import and schema probes run as
``python -c`` with nothing but ``time`` imported first, so an import pays for
everything it needs. Bytecode is cached as for an installed package (a pip install
compiles it): the probes run with ``PYTHONPYCACHEPREFIX`` set to a temporary folder
(and ``PYTHONDONTWRITEBYTECODE`` unset), after one unmeasured round that fills it;
otherwise every probe would compile the package's sources, tens of milliseconds no
installed copy pays. The scenario (``startup``) runs the probes interleaved, N times
each, and reports the minimum (the least disturbed run) and the median.

``python -m benchmarks.startup [--quick] [-v] [--json PATH]`` runs this scenario alone
(the same as ``python -m benchmarks --only startup``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .report import Scenario
    from .runs import Sizes

__all__ = [
    "HEAVY",
    "IMPORT_PROBES",
    "eager_modules",
    "first_call",
    "import_command",
    "main",
    "startup",
]

IMPORT_TARGET = 0.020  # issue 15: import apimart_async <= baseline + 20 ms
# Packages ``import apimart_async`` must not load (first needed later, if at all).
HEAVY = ("aiohttp", "rich", "uvicorn", "opentelemetry", "trio", "stamina", "tenacity", "asyncio")
# Modules of the package its import never loaded, lazy or not: the optional transport,
# the webhook receiver, the CLI and the fake.
_NEVER_EAGER = frozenset({"__init__", "__main__", "_aiohttp", "webhooks", "cli", "testing"})

IMPORT_PROBES = {
    "import-baseline": "import httpx\nfrom pydantic import BaseModel",
    "import-apimart": "import apimart_async",
    "import-client": "from apimart_async import AsyncApimart",
    "import-eager": None,  # built from the package's files: see eager_modules()
}

_IMPORT_TEMPLATE = """\
import time
_c0, _t0 = time.process_time(), time.perf_counter()
{statement}
_t1, _c1 = time.perf_counter(), time.process_time()
import json, sys
_heavy = {heavy!r}
_file = getattr(sys.modules.get("apimart_async"), "__file__", None)
print(json.dumps({{"cpu": _c1 - _c0, "wall": _t1 - _t0, "file": _file,
    "heavy": sorted(m for m in _heavy if m in sys.modules),
    "modules": sum(m.startswith("apimart_async") for m in sys.modules)}}))
"""

_SCHEMAS = """\
import json, time
import apimart_async, apimart_async.models, apimart_async.types
from pydantic import BaseModel

def _walk(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _walk(sub)

models = {c for c in _walk(BaseModel) if c.__module__.startswith("apimart_async")}
deferred = [c for c in models if not c.__pydantic_complete__]
c0, t0 = time.process_time(), time.perf_counter()
for model in deferred:
    model.model_rebuild(force=True)
t1, c1 = time.perf_counter(), time.process_time()
print(json.dumps({"cpu": c1 - c0, "wall": t1 - t0, "models": len(models),
    "deferred": len(deferred), "unbuilt_after": sum(not c.__pydantic_complete__ for c in models),
    "file": apimart_async.__file__}))
"""


def eager_modules() -> list[str]:
    """Every module ``import apimart_async`` loaded before its names became lazy."""
    from .runs import REPO

    package = REPO / "apimart_async"
    names = sorted(p.stem for p in package.glob("*.py") if p.stem not in _NEVER_EAGER)
    return [f"apimart_async.{name}" for name in names]


def import_command(probe: str) -> list[str]:
    """The command line of an import or schema probe (``python -c ...``)."""
    if probe == "schemas":
        return [sys.executable, "-c", _SCHEMAS]
    statement = IMPORT_PROBES[probe]
    if statement is None:  # import-eager
        statement = "\n".join(["import apimart_async", *(f"import {m}" for m in eager_modules())])
    code = _IMPORT_TEMPLATE.format(statement=statement, heavy=HEAVY)
    return [sys.executable, "-c", code]


# -- the first-call probe (its own process) ----------------------------------------------


def _unbuilt(models: list[type[Any]]) -> int:
    """How many of *models* have not built their schema yet (deferred to first use)."""
    return sum(not m.__pydantic_complete__ for m in models)


def _package_models() -> list[type[Any]]:
    from pydantic import BaseModel

    found: set[type[Any]] = set()
    stack: list[type[Any]] = [BaseModel]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return [m for m in found if m.__module__.startswith("apimart_async")]


def _timed() -> Callable[[], dict[str, float]]:
    """Start a CPU + wall reading; the returned function gives both elapsed."""
    c0, t0 = time.process_time(), time.perf_counter()
    return lambda: {"cpu": time.process_time() - c0, "wall": time.perf_counter() - t0}


def first_call(*, eager: bool = False) -> dict[str, Any]:
    """Client creation and the first three ``generate`` calls of a fresh process.

    Only what a program using the client imports is imported before the timings
    (``AsyncApimart``, ``PollPolicy``, the fake); with *eager*, also every module the
    package's import used to load (``eager_modules``).
    """
    import importlib

    import anyio
    import httpx

    import apimart_async
    from apimart_async import AsyncApimart, PollPolicy
    from apimart_async.testing import FakeApimart, Latency

    from .images import png

    model = "gemini-3-pro-image-preview"  # raw.MODEL (raw.py would import aiohttp)
    fake = FakeApimart(latency=Latency.zero())
    # The first poll at once: the fake's zero-latency task is complete by then, so no
    # call sleeps and the timings compare work, not schedule.
    prompt = PollPolicy(first_default=0.0, first_min=0.0, first_fraction=0.0, jitter=0.0)

    async def run() -> dict[str, Any]:
        # Warm the fake and httpx with raw requests (not our client): their first-use
        # work would not exist against the real service.
        base = "https://api.apimart.ai"
        headers = {"Authorization": "Bearer test"}
        async with httpx.AsyncClient(transport=fake.transport(), headers=headers) as raw:
            files = {"file": ("w.png", png(999_999), "image/png")}
            up = (await raw.post(f"{base}/v1/uploads/images", files=files)).json()
            body = {"model": model, "prompt": "warm", "image_urls": [up["url"]]}
            sub = (await raw.post(f"{base}/v1/images/generations", json=body)).json()
            await raw.get(f"{base}/v1/tasks/{sub['data'][0]['task_id']}")
        # --eager: the modules the import used to load, at the very point where the lazy
        # client starts loading them itself, so this reading is exactly what deferring
        # them saved a program that goes on to create a client.
        stop = _timed()
        for name in eager_modules() if eager else ():
            importlib.import_module(name)
        eager_import = stop()
        loaded_before = sum(m.startswith("apimart_async.") for m in sys.modules)
        stop = _timed()
        client = AsyncApimart(api_key="test", transport=fake.transport(), poll=prompt)
        created = stop()
        calls: list[dict[str, float]] = []
        unbuilt_after_first = 0
        async with client:
            for i in range(3):
                request = {"model": model, "prompt": f"call {i}", "image_urls": [png(i)]}
                stop = _timed()
                task = await client.generate(request)
                calls.append(stop())
                if task.status.value != "completed":
                    raise RuntimeError(f"call {i}: task {task.id} is {task.status}")
                if i == 0:
                    # The models exist now (lazily imported ones too): which are built.
                    unbuilt_after_first = _unbuilt(_package_models())
        return {
            "eager": eager,
            "eager_import": eager_import,
            "create": created,
            "calls": calls,
            "models": len(_package_models()),
            "unbuilt_after_first": unbuilt_after_first,
            "modules_before": loaded_before,
            "file": apimart_async.__file__,
        }

    return anyio.run(run)


# -- the scenario (in the runner's process) ----------------------------------------------
# Its imports are inside the functions: ``python -m benchmarks.startup first-call`` loads
# this module too, and must not pre-import what the client would import itself.


def _probe_env(pycache: str) -> dict[str, str]:
    """The probes' environment: bytecode cached under *pycache*, as an install has it."""
    import os

    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def _probe(cmd: list[str], env: Mapping[str, str]) -> dict[str, Any]:
    """Run one probe in a fresh interpreter from the repository root; its JSON."""
    from .runs import run_json

    return run_json(cmd, "startup probe", timeout=300, env=env)[1]


class _Figures:
    """Min and median of one figure across runs, as table cells (milliseconds)."""

    def __init__(self, readings: list[dict[str, float]]) -> None:
        import statistics

        cpu = [r["cpu"] for r in readings]
        wall = [r["wall"] for r in readings]
        self.cpu_min = min(cpu) if cpu else None
        self.cpu_median = statistics.median(cpu) if cpu else None
        self.wall_min = min(wall) if wall else None

    def cells(self) -> list[str]:
        return [_ms(self.cpu_min), _ms(self.cpu_median), _ms(self.wall_min)]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f}"


def _minus(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {"cpu": a["cpu"] - b["cpu"], "wall": a["wall"] - b["wall"]}


def _first_use(run: dict[str, Any]) -> dict[str, float]:
    """What one first-call run's client paid once: creation + (first - second call)."""
    create, first, second = run["create"], run["calls"][0], run["calls"][1]
    return {
        "cpu": create["cpu"] + first["cpu"] - second["cpu"],
        "wall": create["wall"] + first["wall"] - second["wall"],
    }


def _gap(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def startup(sizes: Sizes, verbose: bool) -> Scenario:
    """Import time against httpx + pydantic, and what the first call pays back."""
    import tempfile

    from .report import Scenario, Target
    from .runs import REPO

    reps, first_reps = sizes.startup_reps, sizes.first_call_reps
    sc = Scenario(
        "startup",
        f"3. Start-up: fresh interpreters, CPU time, {reps} interleaved runs of each import "
        f"probe, {first_reps} first-call runs of each mode",
        ["figure", "CPU min ms", "CPU median ms", "wall min ms", "note"],
        settings={"reps": reps, "first_call_reps": first_reps, "bytecode": "cached"},
    )
    probes = (*IMPORT_PROBES, "schemas")
    first_cmd = [sys.executable, "-m", "benchmarks.startup", "first-call"]
    modes = {"first-call": first_cmd, "first-call-eager": [*first_cmd, "--eager"]}
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="apimart-startup-pyc-") as pycache:
        env = _probe_env(pycache)
        for probe in probes:  # unmeasured: compiles every module into the cache
            _probe(import_command(probe), env)
        _probe(modes["first-call-eager"], env)
        for _ in range(reps):  # interleaved: a noisy moment hits every probe alike
            for probe in probes:
                runs.setdefault(probe, []).append(_probe(import_command(probe), env))
        for _ in range(first_reps):
            for mode, cmd in modes.items():
                runs.setdefault(mode, []).append(_probe(cmd, env))
    ok: dict[str, list[dict[str, Any]]] = {}
    for probe, results in runs.items():
        sc.runs.extend({"probe": probe, **r} for r in results)
        ok[probe] = [r for r in results if not r.get("failed")]
        if len(ok[probe]) < len(results):
            sc.notes.append(f"{probe}: {len(results) - len(ok[probe])} runs FAILED (see JSON)")
        files = {r["file"] for r in ok[probe] if r.get("file")}
        foreign = {f for f in files if not f.startswith(str(REPO))}
        if foreign:
            sc.notes.append(f"{probe} measured another copy of apimart_async: {sorted(foreign)}")
    if verbose:
        for probe in probes:
            print(f"    {probe} CPU ms: {[round(1000 * r['cpu'], 1) for r in ok[probe]]}")
        for mode in modes:
            paid = [round(1000 * _first_use(r)["cpu"], 1) for r in ok[mode]]
            print(f"    {mode} creation + first-use CPU ms: {paid}")

    base = _Figures(ok["import-baseline"])
    ours = _Figures(ok["import-apimart"])
    client = _Figures(ok["import-client"])
    eager = _Figures(ok["import-eager"])

    def per_round(probe: str, other: str) -> _Figures:  # run i of each: interleaved
        return _Figures([_minus(a, b) for a, b in zip(ok[probe], ok[other], strict=False)])

    schemas = _Figures(ok["schemas"])
    lazy_runs, eager_runs = ok["first-call"], ok["first-call-eager"]
    heavy = {m for r in ok["import-apimart"] + ok["import-client"] for m in r["heavy"]}
    heavy -= {m for r in ok["import-baseline"] for m in r["heavy"]}
    built = [r["models"] - r["unbuilt_after_first"] for r in lazy_runs]
    deferred = ok["schemas"][0]["deferred"] if ok["schemas"] else "?"
    import_gap = _gap(ours.cpu_min, base.cpu_min)
    client_gap = _gap(client.cpu_min, base.cpu_min)
    fresh_saved = per_round("import-eager", "import-client")
    fresh_saved_min = _gap(eager.cpu_min, client.cpu_min)
    saved = _Figures([r["eager_import"] for r in eager_runs])
    paid_lazy = _Figures([_first_use(r) for r in lazy_runs])
    paid_eager = _Figures([_first_use(r) for r in eager_runs])
    payback = _gap(paid_lazy.cpu_min, paid_eager.cpu_min)
    payback_median = _gap(paid_lazy.cpu_median, paid_eager.cpu_median)
    modules = {p: max((r.get("modules", 0) for r in ok[p]), default=0) for p in IMPORT_PROBES}

    def lazy_first(key: str, i: int | None = None) -> list[str]:
        readings = [r[key] if i is None else r[key][i] for r in lazy_runs]
        return _Figures(readings).cells()

    sc.rows += [
        ["import httpx; from pydantic import BaseModel", *base.cells(), "the baseline"],
        [
            "import apimart_async",
            *ours.cells(),
            f"{modules['import-apimart']} of its modules; optional packages it adds: "
            + (", ".join(sorted(heavy)) or "none"),
        ],
        [
            "  difference (min - min)",
            _ms(import_gap),
            _ms(per_round("import-apimart", "import-baseline").cpu_median),
            "-",
            f"target <= +{1000 * IMPORT_TARGET:.0f} ms; median is of per-round differences",
        ],
        [
            "from apimart_async import AsyncApimart",
            *client.cells(),
            f"{modules['import-client']} of its modules: what a program using the client imports",
        ],
        [
            "  difference (min - min)",
            _ms(client_gap),
            _ms(per_round("import-client", "import-baseline").cpu_median),
            "-",
            f"target <= +{1000 * IMPORT_TARGET:.0f} ms",
        ],
        [
            "import of every module, as before it was lazy",
            *eager.cells(),
            f"{modules['import-eager']} modules (all but _aiohttp, webhooks, cli, testing)",
        ],
        [
            "  eager - AsyncApimart import",
            _ms(fresh_saved_min),
            _ms(fresh_saved.cpu_median),
            "-",
            "includes httpx and pydantic.BaseModel, which the fake loads in the rows below",
        ],
        [
            "every deferred pydantic schema, built eagerly",
            *schemas.cells(),
            f"{deferred} models: what deferring their schemas saves (not in the rows above)",
        ],
        [
            "AsyncApimart(...), first in a process",
            *lazy_first("create"),
            "loads the job engine and the result models; looks up OpenTelemetry",
        ],
        ["first generate (in-process fake)", *lazy_first("calls", 0), "loads the request models"],
        ["second generate", *lazy_first("calls", 1), ""],
        ["third generate", *lazy_first("calls", 2), ""],
        [
            "  creation + (first - second): paid once",
            *paid_lazy.cells(),
            (
                f"per run; the first call built {min(built, default=0)}-"
                f"{max(built, default=0)} of "
                f"{lazy_runs[0]['models'] if lazy_runs else '?'} schemas"
            ),
        ],
        [
            "  the same with every module imported first",
            *paid_eager.cells(),
            "first-call --eager: as when the import loaded everything",
        ],
        [
            "  saved by deferring: the eager modules' import",
            *saved.cells(),
            "timed in first-call --eager, where the lazy client starts loading them",
        ],
        [
            "  paid back (lazy - eager)",
            _ms(payback),
            _ms(payback_median),
            "-",
            "target <= saved by deferring (min each)",
        ],
    ]
    for name, gap in (
        ("import apimart_async", import_gap),
        ("from apimart_async import AsyncApimart", client_gap),
    ):
        sc.targets.append(
            Target(
                f"{name} - import httpx + pydantic.BaseModel (CPU, min of runs)",
                None if gap is None else 1000 * gap,
                1000 * IMPORT_TARGET,
                unit=" ms",
            )
        )
    sc.targets.append(
        Target(
            "first client + call's extra work (lazy - eager) vs what deferring saved the import",
            None if payback is None else 1000 * payback,
            1000 * saved.cpu_min if saved.cpu_min is not None else 0.0,
            unit=" ms",
            note="CPU, min of runs each",
        )
    )
    sc.notes.append(
        "the fake and httpx are warmed with raw requests before the first generate, so it "
        "pays only our client's first-use work; bytecode is cached, as installed"
    )
    return sc


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.startup first-call [--eager]``: run that probe, print its
    JSON; other arguments (``--quick``, ``-v``, ``--json``) run the whole scenario."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["first-call"]:
        if args[1:] not in ([], ["--eager"]):
            print("usage: python -m benchmarks.startup first-call [--eager]", file=sys.stderr)
            return 2
        sys.stdout.write(json.dumps(first_call(eager=args[1:] == ["--eager"])) + "\n")
        return 0
    from .runner import main as run_scenarios

    return run_scenarios(["--only", "startup", *args])


if __name__ == "__main__":
    raise SystemExit(main())
