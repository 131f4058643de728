"""Start-up costs, each in a fresh interpreter: what a CLI, a serverless function or a
web app's first request pays before any steady state (issue 15).

Probes (one fresh interpreter each, one JSON object printed):

* ``import-baseline``: ``import httpx; from pydantic import BaseModel``, what any
  program built on those two pays anyway;
* ``import-apimart``: ``import apimart_async``; also which optional or heavy packages
  the import pulled in (it should add none to the baseline's);
* ``schemas``: after ``import apimart_async``, building every pydantic schema the
  package defers to first use (``model_rebuild(force=True)`` on each of its models):
  what the import would cost more if nothing were deferred, i.e. what deferral saved;
* ``first-call`` (``python -m benchmarks.startup first-call``): ``AsyncApimart``
  against the in-process fake (``FakeApimart(latency=zero).transport()``): client
  creation, then the first ``generate`` (upload of PNG bytes, submit, one poll)
  against the second and third, and how many deferred schemas the first one built.
  The fake and httpx's in-process path are warmed first with raw httpx requests, so
  the first call pays only our client's first-use work (against the real service,
  the server's first request costs the client nothing).

Every figure is CPU time (``time.process_time``, all threads) around the statement
alone, interpreter start-up excluded: on a shared machine, wall time of a 200 ms
import swings by several hundred ms with the load, CPU time far less. Wall time
(``perf_counter``) is reported beside it. The import and schema probes run as
``python -c`` with nothing but ``time`` imported first, so an import pays for
everything it needs. The scenario (``startup``) runs them interleaved, N times each,
and reports the minimum (the least disturbed run) and the median.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from .report import Scenario
    from .runs import Sizes

__all__ = ["HEAVY", "IMPORT_PROBES", "first_call", "import_command", "main", "startup"]

IMPORT_TARGET = 0.020  # issue 15: import apimart_async <= baseline + 20 ms
# Packages ``import apimart_async`` must not load (first needed later, if at all).
HEAVY = ("aiohttp", "rich", "uvicorn", "opentelemetry", "trio", "stamina", "tenacity", "asyncio")

IMPORT_PROBES = {
    "import-baseline": "import httpx\nfrom pydantic import BaseModel",
    "import-apimart": "import apimart_async",
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
    "heavy": sorted(m for m in _heavy if m in sys.modules)}}))
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


def import_command(probe: str) -> list[str]:
    """The command line of an import or schema probe (``python -c ...``)."""
    if probe == "schemas":
        return [sys.executable, "-c", _SCHEMAS]
    code = _IMPORT_TEMPLATE.format(statement=IMPORT_PROBES[probe], heavy=HEAVY)
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


def first_call() -> dict[str, Any]:
    """Client creation and the first three ``generate`` calls of a fresh process."""
    import anyio
    import httpx

    import apimart_async
    import apimart_async.models
    import apimart_async.types
    from apimart_async import AsyncApimart, PollPolicy
    from apimart_async.testing import FakeApimart, Latency

    from .images import png

    model = "gemini-3-pro-image-preview"  # raw.MODEL (raw.py would import aiohttp)
    models = _package_models()
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
        unbuilt_before = _unbuilt(models)
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
                    unbuilt_after_first = _unbuilt(models)
        return {
            "create": created,
            "calls": calls,
            "models": len(models),
            "unbuilt_before": unbuilt_before,
            "unbuilt_after_first": unbuilt_after_first,
            "file": apimart_async.__file__,
        }

    return anyio.run(run)


# -- the scenario (in the runner's process) ----------------------------------------------
# Its imports are inside the functions: ``python -m benchmarks.startup first-call`` loads
# this module too, and must not pre-import what the client would import itself.


def _probe(cmd: list[str]) -> dict[str, Any]:
    """Run one probe in a fresh interpreter from the repository root; its JSON."""
    import subprocess

    from .runs import REPO

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  ! startup probe failed (exit {proc.returncode}):\n{proc.stderr[-1500:]}")
        return {"failed": True, "stderr": proc.stderr[-3000:]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


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


def startup(sizes: Sizes, verbose: bool) -> Scenario:
    """Import time against httpx + pydantic, and what the first call pays back."""
    from .report import Scenario, Target
    from .runs import REPO

    reps, first_reps = sizes.startup_reps, sizes.first_call_reps
    sc = Scenario(
        "startup",
        f"3. Start-up: fresh interpreters, CPU time, {reps} interleaved runs of each import "
        f"probe, {first_reps} first-call runs",
        ["figure", "CPU min ms", "CPU median ms", "wall min ms", "note"],
        settings={"reps": reps, "first_call_reps": first_reps},
    )
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(reps):  # interleaved: a noisy moment hits every probe alike
        for probe in (*IMPORT_PROBES, "schemas"):
            runs.setdefault(probe, []).append(_probe(import_command(probe)))
    first_cmd = [sys.executable, "-m", "benchmarks.startup", "first-call"]
    runs["first-call"] = [_probe(first_cmd) for _ in range(first_reps)]
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
        for probe in (*IMPORT_PROBES, "schemas"):
            print(f"    {probe} CPU ms: {[round(1000 * r['cpu'], 1) for r in ok[probe]]}")

    base = _Figures(ok["import-baseline"])
    ours = _Figures(ok["import-apimart"])
    pairs = zip(ok["import-apimart"], ok["import-baseline"], strict=False)
    diff = _Figures([_minus(a, b) for a, b in pairs])  # run i of each: interleaved
    schemas = _Figures(ok["schemas"])
    first = ok["first-call"]
    heavy = {m for r in ok["import-apimart"] for m in r["heavy"]}
    heavy -= {m for r in ok["import-baseline"] for m in r["heavy"]}
    built = [r["models"] - r["unbuilt_after_first"] for r in first]
    deferred = ok["schemas"][0]["deferred"] if ok["schemas"] else "?"
    first_use = _Figures([_minus(r["calls"][0], r["calls"][1]) for r in first])
    import_gap = (
        None if ours.cpu_min is None or base.cpu_min is None else ours.cpu_min - base.cpu_min
    )
    sc.rows += [
        ["import httpx; from pydantic import BaseModel", *base.cells(), "the baseline"],
        [
            "import apimart_async",
            *ours.cells(),
            "optional packages it adds: " + (", ".join(sorted(heavy)) or "none"),
        ],
        [
            "  difference (min - min)",
            _ms(import_gap),
            _ms(diff.cpu_median),
            "-",
            f"target <= +{1000 * IMPORT_TARGET:.0f} ms; median is of per-round differences",
        ],
        [
            "every deferred pydantic schema, built eagerly",
            *schemas.cells(),
            f"{deferred} models: what deferring them saved the import",
        ],
        [
            "AsyncApimart(...), first in a process",
            *_Figures([r["create"] for r in first]).cells(),
            "includes looking up OpenTelemetry's providers",
        ],
        ["first generate (in-process fake)", *_Figures([r["calls"][0] for r in first]).cells(), ""],
        ["second generate", *_Figures([r["calls"][1] for r in first]).cells(), ""],
        ["third generate", *_Figures([r["calls"][2] for r in first]).cells(), ""],
        [
            "  first - second: first-use work",
            *first_use.cells(),
            (
                f"per run; the first call built {min(built, default=0)}-"
                f"{max(built, default=0)} of {first[0]['models'] if first else '?'} schemas"
            ),
        ],
    ]
    sc.targets.append(
        Target(
            "import apimart_async - import httpx + pydantic.BaseModel (CPU, min of runs)",
            None if import_gap is None else 1000 * import_gap,
            1000 * IMPORT_TARGET,
            unit=" ms",
        )
    )
    saved = schemas.cpu_min
    sc.targets.append(
        Target(
            "first generate's first-use work (first - second) vs what deferral saved the import",
            None if first_use.cpu_min is None else 1000 * first_use.cpu_min,
            1000 * saved if saved is not None else 0.0,
            unit=" ms",
            note="CPU, min of runs each",
        )
    )
    sc.notes.append(
        "the fake and httpx are warmed with raw requests before the first generate, so it "
        "pays only our client's first-use work; the client's creation is a row of its own"
    )
    return sc


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.startup first-call``: run that probe, print its JSON."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["first-call"]:
        print(
            "usage: python -m benchmarks.startup first-call  (the import probes run as "
            "python -c: see benchmarks.startup.import_command)",
            file=sys.stderr,
        )
        return 2
    sys.stdout.write(json.dumps(first_call()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
