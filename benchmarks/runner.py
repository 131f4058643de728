"""``python -m benchmarks [--quick] [--only ...] [--json PATH]``: run, print, save.

For every scenario the runner starts a fresh fake server process with that scenario's
latency profile, then runs each implementation in its own worker process (see
worker.py), interleaving repetitions (rep 1 of every implementation, then rep 2, ...)
so a noisy neighbour on the shared machine hits all implementations alike. Where noise
matters the median of the repetitions is reported, with the spread.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fakeserver import FakeServer
from .images import write_big_png
from .report import Scenario, Target, print_scenario, write_json
from .worker import DEFAULT_POOL

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["FULL", "QUICK", "Sizes", "main"]

MB = 1024 * 1024
DEFAULT_JSON = Path(__file__).parent / "results" / "latest.json"
SCENARIOS = ("overhead", "polling", "memory", "uploads", "e2e")
MEMORY_QUICK = ("aiohttp", "httpx", "apimart")
HTTPX_MEMORY_CAP = 2000


@dataclass(frozen=True)
class Sizes:
    """How big each scenario runs (the issue's sizes, or ``--quick`` ones)."""

    overhead_pipelines: int
    overhead_concurrency: tuple[int, ...]
    overhead_reps: int
    polling_pipelines: int
    polling_concurrency: int
    polling_scale: float
    memory_inflight: int
    memory_pool: int
    shared_jobs: int
    e2e_pipelines: int
    e2e_concurrency: int
    e2e_reps: int


FULL = Sizes(
    overhead_pipelines=2000,
    overhead_concurrency=(10, 200, 1000),
    overhead_reps=3,
    polling_pipelines=1000,
    polling_concurrency=100,
    polling_scale=0.05,
    memory_inflight=10_000,
    memory_pool=100,
    shared_jobs=1000,
    e2e_pipelines=2000,
    e2e_concurrency=200,
    e2e_reps=3,
)
QUICK = Sizes(
    overhead_pipelines=500,
    overhead_concurrency=(10, 200, 1000),
    overhead_reps=1,
    polling_pipelines=500,
    polling_concurrency=100,
    polling_scale=0.05,
    memory_inflight=2000,
    memory_pool=100,
    shared_jobs=200,
    e2e_pipelines=500,
    e2e_concurrency=200,
    e2e_reps=3,
)

OVERHEAD_IMPLS = (
    "aiohttp",
    "httpx",
    "httpx-aiohttp",
    "apimart",
    "apimart-httpx",
    "apimart-calls",
    "apimart-shared",
)
# Context rows at the top concurrency with a pool as large as it (suffix of the key).
BIG_POOL = "+bigpool"
BIG_POOL_IMPLS = ("aiohttp", "apimart")
LABELS = {
    "aiohttp": "raw aiohttp",
    "httpx": "raw httpx",
    "httpx-aiohttp": "raw httpx+httpx-aiohttp",
    "apimart": "apimart",
    "apimart-httpx": "apimart httpx-transport",
    "apimart-calls": "apimart explicit calls",
    "apimart-shared": "apimart SHARED image*",
    "apimart-fixed": "apimart fixed 2s polls",
}


# -- running workers ------------------------------------------------------------------


class Runner:
    """Runs worker processes against one fake and keeps every result."""

    def __init__(self, fake: FakeServer, scenario: Scenario, *, verbose: bool) -> None:
        self.fake = fake
        self.scenario = scenario
        self.verbose = verbose

    def run(self, impl: str, **options: Any) -> dict[str, Any]:
        """One worker process; its JSON plus the fake's CPU during it and the command."""
        cmd = [sys.executable, "-m", "benchmarks.worker", "--impl", impl]
        cmd += ["--base-url", self.fake.url, "--api-key", self.fake.api_key]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                cmd.append(flag)
            elif value is not None and value is not False:
                cmd += [flag, str(value)]
        fake_cpu0 = self.fake.cpu_seconds()
        started = time.monotonic()
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=1800,
            cwd=Path(__file__).resolve().parent.parent,
            check=False,
        )
        fake_cpu = self.fake.cpu_seconds() - fake_cpu0
        result: dict[str, Any] = {"impl": impl, **options}
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            result["failed"] = True
            result["stderr"] = proc.stderr[-3000:]
            print(f"  ! {impl} failed (exit {proc.returncode}):\n{proc.stderr[-1500:]}")
        else:
            result.update(json.loads(lines[-1]))
            if proc.stderr.strip():
                result["stderr"] = proc.stderr[-1000:]
        result["fake_cpu_s"] = fake_cpu
        result["process_s"] = time.monotonic() - started
        result["command"] = shlex.join(cmd)
        if not self.fake.alive():
            raise RuntimeError(f"the fake server died:\n{self.fake.log()}")
        self.scenario.runs.append(result)
        if self.verbose:
            brief = {k: result.get(k) for k in ("impl", "concurrency", "cpu_s", "wall_s", "errors")}
            print(f"    {brief}", flush=True)
        return result


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose *key* is the median (lower median for an even count)."""
    good = [r for r in runs if not r.get("failed")]
    if not good:
        return runs[0]
    good.sort(key=lambda r: r[key])
    return good[(len(good) - 1) // 2]


def spread(runs: list[dict[str, Any]], key: str) -> str:
    """(max - min) / median of *key* across repetitions, as a percentage."""
    values = [r[key] for r in runs if not r.get("failed")]
    if len(values) < 2:
        return "-"
    return f"{100 * (max(values) - min(values)) / statistics.median(values):.0f}%"


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.3f}"


def per_pipe(run: dict[str, Any], key: str) -> float | None:
    if run.get("failed") or not run.get("completed"):
        return None
    value: float = run[key] / run["completed"]
    return value


def fake_requests(run: dict[str, Any]) -> str:
    fake = run.get("fake") or {}
    done = run.get("completed") or run.get("pipelines")
    if not fake or not done:
        return "-"
    return f"{fake.get('requests_total', 0) / done:.2f}"


def check_complete(scenario: Scenario, run: dict[str, Any]) -> None:
    if run.get("failed"):
        scenario.notes.append(f"{run['impl']} run FAILED; see JSON for its stderr")
    elif run.get("errors") or run.get("completed") != run.get("pipelines"):
        scenario.notes.append(
            f"{run['impl']} @{run.get('concurrency')}: {run.get('completed')} of "
            f"{run.get('pipelines')} completed, {run.get('errors')} errors"
        )


# -- scenarios ------------------------------------------------------------------------


def overhead(sizes: Sizes, verbose: bool) -> Scenario:
    """Client CPU per pipeline with tasks that are done at the first poll."""
    n = sizes.overhead_pipelines
    sc = Scenario(
        "overhead",
        f"1. Overhead: {n} pipelines, zero task latency, CPU per pipeline "
        f"(median of {sizes.overhead_reps})",
        [
            "client",
            "conc",
            "CPU ms/pipe",
            "spread",
            "vs aiohttp",
            "vs httpx",
            "GC ms/pipe",
            "wall s",
            "pipes/s",
            "peak RSS MB",
            "sockets",
            "req/pipe",
            "fake CPU ms/pipe",
        ],
        settings={"pipelines": n, "concurrency": sizes.overhead_concurrency, "latency": "zero"},
    )
    impls = OVERHEAD_IMPLS
    if importlib.util.find_spec("httpx_aiohttp") is None:
        impls = tuple(i for i in impls if i != "httpx-aiohttp")
        sc.notes.append("httpx-aiohttp is not installed: its context row is left out")
    with FakeServer(latency="zero") as fake:
        sc.settings["fake_command"] = shlex.join(fake.command())
        runner = Runner(fake, sc, verbose=verbose)
        results: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for conc in sizes.overhead_concurrency:
            for _ in range(sizes.overhead_reps):
                for impl in impls:
                    run = runner.run(impl, pipelines=n, concurrency=conc, poll="prompt")
                    results.setdefault((impl, conc), []).append(run)
        # Context: a pool as large as the concurrency, for the raw loop and for us.
        top = max(sizes.overhead_concurrency)
        for _ in range(sizes.overhead_reps):
            for impl in BIG_POOL_IMPLS:
                run = runner.run(impl, pipelines=n, concurrency=top, poll="prompt", pool=top)
                results.setdefault((impl + BIG_POOL, top), []).append(run)
        cost: dict[tuple[str, int], float | None] = {}
        for conc in sizes.overhead_concurrency:
            row_impls = impls
            if conc == top:
                row_impls = (*impls, *(i + BIG_POOL for i in BIG_POOL_IMPLS))
            for impl in row_impls:
                runs = results[(impl, conc)]
                best = median_run(runs, "cpu_s")
                check_complete(sc, best)
                cost[(impl, conc)] = per_pipe(best, "cpu_s")
            for impl in row_impls:
                runs = results[(impl, conc)]
                best = median_run(runs, "cpu_s")
                c = cost[(impl, conc)]
                big = impl.endswith(BIG_POOL)
                sc.rows.append(
                    [
                        LABELS[impl.removesuffix(BIG_POOL)] + (f" pool={conc}" if big else ""),
                        str(conc),
                        ms(c),
                        spread(runs, "cpu_s"),
                        ratio(c, cost[("aiohttp" + (BIG_POOL if big else ""), conc)]),
                        "-" if big else ratio(c, cost[("httpx", conc)]),
                        ms(best.get("gc_s", 0.0) / n),
                        f"{best.get('wall_s', 0):.2f}",
                        f"{best.get('completed', 0) / max(best.get('wall_s', 1), 1e-9):.0f}",
                        f"{best.get('rss_peak', 0) / MB:.1f}",
                        str(best.get("sockets_peak", "-")),
                        fake_requests(best),
                        ms(best["fake_cpu_s"] / n),
                    ]
                )
    sc.notes.append(
        "* SHARED: every pipeline names the same image bytes, so the client uploads it once "
        "(dedup in effect): not like-for-like, shown for what dedup saves"
    )
    sc.notes.append(
        f"every client's pool is min(concurrency, {DEFAULT_POOL}) (aiohttp's, httpx's and our "
        f"default); the 'pool={max(sizes.overhead_concurrency)}' rows give every "
        "pipeline its own connection: opening them, not the client, is what grows"
    )
    sc.notes.append(
        "sockets = peak open sockets sampled every 0.25 s (short runs may miss the peak); "
        "an aiohttp pool opens a connection only when none is idle, so it tracks requests "
        "in flight"
    )
    for (impl, conc), runs in results.items():
        run = median_run(runs, "cpu_s")
        want = min(conc, n, run.get("pool") or conc)
        if impl in ("apimart", "apimart-shared") and run.get("sockets_peak", want) < want / 2:
            sc.notes.append(
                f"{LABELS[impl]} @ {conc}: at most {run['sockets_peak']} sockets open, so "
                f"far fewer than {want} requests were ever in flight (generate_many did not "
                "reach the requested concurrency or the pool)"
            )
    concs = sizes.overhead_concurrency
    for conc in concs:
        ours, base = cost[("apimart", conc)], cost[("aiohttp", conc)]
        sc.targets.append(
            Target(
                f"apimart_async CPU/pipeline vs raw aiohttp @ concurrency {conc}",
                None if ours is None or not base else ours / base,
                2.0,
                unit="x",
            )
        )
    lo, hi = cost[("apimart", concs[0])], cost[("apimart", concs[-1])]
    sc.targets.append(
        Target(
            f"apimart_async CPU/pipeline @ {concs[-1]} vs @ {concs[0]} (no super-linear growth)",
            None if lo is None or hi is None else hi / lo,
            1.3,
            unit="x",
        )
    )
    return sc


def polling(sizes: Sizes, verbose: bool) -> Scenario:
    """Task queries per pipeline and detection lag on realistic task durations."""
    n, scale = sizes.polling_pipelines, sizes.polling_scale
    sc = Scenario(
        "polling",
        f"2. Polling efficiency: {n} pipelines at concurrency {sizes.polling_concurrency}, "
        f"realistic latency x{scale:g} (median task {15 * scale * 1000:.0f} ms)",
        [
            "client / schedule",
            "polls/pipe mean",
            "p95",
            "max",
            "lag mean ms",
            "lag p95 ms",
            "task mean ms",
            "lag/dur (of means)",
            "mean(lag/dur)",
            "p95(lag/dur)",
            "wall s",
            "CPU ms/pipe",
        ],
        settings={
            "pipelines": n,
            "concurrency": sizes.polling_concurrency,
            "latency": "realistic",
            "time_scale": scale,
            "fixed_interval_s": 2.0 * scale,
        },
    )
    with FakeServer(latency="realistic", time_scale=scale) as fake:
        sc.settings["fake_command"] = shlex.join(fake.command())
        runner = Runner(fake, sc, verbose=verbose)
        # Our schedule with the default poll budget scaled like the clock (50/s real).
        common = {"pipelines": n, "concurrency": sizes.polling_concurrency, "lags": True}
        ours = runner.run(
            "apimart", poll="adaptive", poll_scale=scale, poll_rate=50.0 / scale, **common
        )
        fixed = runner.run("apimart-fixed", interval=2.0 * scale, **common)
    for run in (ours, fixed):
        check_complete(sc, run)
        lags = run.get("lags") or {}
        if not lags.get("matched"):
            sc.rows.append([LABELS[run["impl"]], *["-"] * (len(sc.columns) - 1)])
            continue
        sc.rows.append(
            [
                "apimart_async adaptive" if run is ours else LABELS["apimart-fixed"],
                f"{lags['polls_mean']:.2f}",
                f"{lags['polls_p95']:.0f}",
                f"{lags['polls_max']:.0f}",
                ms(lags["lag_mean_s"]),
                ms(lags["lag_p95_s"]),
                ms(lags["duration_mean_s"]),
                f"{100 * lags['lag_over_duration_of_means']:.1f}%",
                f"{100 * lags['lag_over_duration_mean']:.1f}%",
                f"{100 * lags['lag_over_duration_p95']:.1f}%",
                f"{run.get('wall_s', 0):.2f}",
                ms(per_pipe(run, "cpu_s")),
            ]
        )
        if lags.get("returned_before_detected") or lags.get("lag_min_s", 0) < 0:
            sc.notes.append(f"{run['impl']}: clock check failed (a return before detection)")
    lags = ours.get("lags") or {}
    sc.targets.append(Target("task queries per pipeline (mean)", lags.get("polls_mean"), 3.0))
    sc.targets.append(
        Target(
            "mean detection lag / task duration (mean of per-task ratios)",
            None if "lag_over_duration_mean" not in lags else 100 * lags["lag_over_duration_mean"],
            10.0,
            unit="%",
        )
    )
    sc.notes.append(
        "lag = worker's time.monotonic() when generate_many yielded the outcome - the "
        "fake's completes_at (time.monotonic() in the fake; one system-wide clock); "
        "polls per task are the fake's own counts"
    )
    return sc


def memory(sizes: Sizes, verbose: bool) -> Scenario:
    """RSS per pipeline held waiting, and open sockets against the pool size."""
    n, pool = sizes.memory_inflight, sizes.memory_pool
    sc = Scenario(
        "memory",
        f"3. Memory: {n} pipelines in flight at once (tasks held pending), pool {pool}",
        [
            "client",
            "RSS growth MB",
            "KB/pipeline",
            "vs aiohttp",
            "vs httpx",
            "sockets held",
            "idle sockets",
            "pool",
            "to barrier s",
            "CPU ms/pipe",
        ],
        settings={"inflight": n, "latency": "fixed:3600", "pool": pool},
    )
    impls = ("aiohttp", "httpx", "apimart", "apimart-httpx") if n > 2000 else MEMORY_QUICK
    per: dict[str, float | None] = {}
    results: dict[str, dict[str, Any]] = {}
    with FakeServer(latency="fixed:3600", time_scale=1.0) as fake:
        sc.settings["fake_command"] = shlex.join(fake.command())
        runner = Runner(fake, sc, verbose=verbose)
        for impl in impls:
            # httpx's pool scans its waiters on every release: 10,000 waiting requests
            # take many minutes, so the raw httpx loop runs at 2,000 (per-pipeline
            # figures hardly depend on the count; the row says so).
            count = min(n, HTTPX_MEMORY_CAP) if impl == "httpx" else n
            run = runner.run(
                impl,
                mode="inflight",
                pipelines=count,
                concurrency=count,
                pool=pool,
                limits="default",
                poll="idle",
                interval=3600,
            )
            results[impl] = run
            ok = not run.get("failed") and run.get("reached_barrier")
            per[impl] = run["rss_growth_per_pipeline"] if ok else None
            if not run.get("failed") and not run.get("reached_barrier"):
                sc.notes.append(f"{impl}: only {run.get('waiting')} of {n} reached the barrier")
    for impl in impls:
        run = results[impl]
        kb = per[impl]
        label = LABELS[impl]
        if run.get("pipelines") != n:
            label += f" (at {run.get('pipelines')})"
        sc.rows.append(
            [
                label,
                "-" if run.get("failed") else f"{run['rss_growth'] / MB:.1f}",
                "-" if kb is None else f"{kb / 1024:.2f}",
                ratio(kb, per["aiohttp"]),
                ratio(kb, per["httpx"]),
                str(run.get("sockets_held", "-")),
                str(run.get("sockets_idle", "-")),
                str(run.get("pool", "-")),
                f"{run.get('wall_s', 0):.1f}",
                "-" if run.get("failed") else ms(run["cpu_s"] / run["pipelines"]),
            ]
        )
    ours, base = per["apimart"], per["aiohttp"]
    sc.targets.append(
        Target(
            "apimart_async RSS growth per in-flight pipeline vs raw aiohttp",
            None if ours is None or not base else ours / base,
            1.5,
            unit="x",
        )
    )
    run = results["apimart"]
    if not run.get("failed"):
        extra = run["sockets_held"] - run["sockets_idle"]
        sc.targets.append(
            Target(
                "apimart_async open sockets beyond the event loop's own, vs its pool size",
                float(extra),
                float(run["pool"]),
                note=f"{run['sockets_held']} held - {run['sockets_idle']} idle",
            )
        )
    sc.notes.append(
        "growth = RSS (statm) once every pipeline has made its first poll and sleeps - RSS "
        "after warm-up; images (2 KB each) are generated before the baseline"
    )
    return sc


def uploads(sizes: Sizes, verbose: bool) -> Scenario:
    """A 20 MB upload's peak RSS, and dedup of one image shared by many jobs."""
    sc = Scenario(
        "uploads",
        "4. Uploads: a 20 MB PNG from disk (peak RSS above baseline); "
        f"{sizes.shared_jobs} jobs sharing one image",
        ["client", "case", "peak RSS delta MB", "file MB", "uploads (fake)", "wall s", "CPU s"],
    )
    with tempfile.TemporaryDirectory() as tmp, FakeServer(latency="zero") as fake:
        sc.settings["fake_command"] = shlex.join(fake.command())
        path = write_big_png(Path(tmp) / "big.png")
        runner = Runner(fake, sc, verbose=verbose)
        big: dict[str, dict[str, Any]] = {}
        for impl in ("apimart", "aiohttp", "httpx"):
            run = runner.run(impl, mode="upload", file=str(path), concurrency=1)
            big[impl] = run
            sc.rows.append(
                [
                    LABELS[impl],
                    "20 MB upload",
                    "-" if run.get("failed") else f"{run['peak_delta'] / MB:.2f}",
                    "-" if run.get("failed") else f"{run['file_bytes'] / MB:.2f}",
                    str((run.get("fake") or {}).get("uploads", "-")),
                    f"{run.get('wall_s', 0):.2f}",
                    f"{run.get('cpu_s', 0):.3f}",
                ]
            )
        jobs = sizes.shared_jobs
        shared = runner.run("apimart-shared", pipelines=jobs, concurrency=100, poll="prompt")
        check_complete(sc, shared)
        sc.rows.append(
            [
                LABELS["apimart-shared"],
                f"{jobs} jobs, 1 image",
                "-",
                "-",
                str((shared.get("fake") or {}).get("uploads", "-")),
                f"{shared.get('wall_s', 0):.2f}",
                f"{shared.get('cpu_s', 0):.3f}",
            ]
        )
    run = big["apimart"]
    sc.targets.append(
        Target(
            "20 MB upload: peak RSS above the client's baseline",
            None if run.get("failed") else run["peak_delta"] / MB,
            4.0,
            unit=" MB",
        )
    )
    uploads_seen = (shared.get("fake") or {}).get("uploads")
    complete = shared.get("completed") == jobs
    sc.targets.append(
        Target(
            f"{jobs} jobs sharing one reference image: uploads seen by the fake",
            float(uploads_seen) if uploads_seen is not None and complete else None,
            1.0,
            op="==",
            note=f"{shared.get('completed')} of {jobs} jobs completed",
        )
    )
    sc.notes.append(
        "peak = VmHWM after resetting it (clear_refs) at the start of the upload; baseline "
        "= RSS after the client was created and warmed up with a small upload"
    )
    return sc


def e2e(sizes: Sizes, verbose: bool) -> Scenario:
    """Wall-clock throughput with the fake on the same two cores."""
    n, conc = sizes.e2e_pipelines, sizes.e2e_concurrency
    sc = Scenario(
        "e2e",
        f"5. End to end: {n} pipelines at concurrency {conc}, zero task latency, "
        f"pipelines/s (median of {sizes.e2e_reps})",
        [
            "client",
            "pipes/s",
            "spread",
            "vs aiohttp",
            "vs httpx",
            "wall s",
            "CPU ms/pipe",
            "fake CPU ms/pipe",
            "req/pipe",
        ],
        settings={"pipelines": n, "concurrency": conc, "latency": "zero"},
    )
    impls = ("aiohttp", "httpx", "apimart", "apimart-httpx")
    results: dict[str, list[dict[str, Any]]] = {}
    with FakeServer(latency="zero") as fake:
        sc.settings["fake_command"] = shlex.join(fake.command())
        runner = Runner(fake, sc, verbose=verbose)
        for _ in range(sizes.e2e_reps):
            for impl in impls:
                run = runner.run(impl, pipelines=n, concurrency=conc, poll="prompt")
                if not run.get("failed"):
                    run["rate"] = run["completed"] / run["wall_s"]
                results.setdefault(impl, []).append(run)
    rate: dict[str, float | None] = {}
    best: dict[str, dict[str, Any]] = {}
    for impl in impls:
        best[impl] = median_run(results[impl], "rate")
        check_complete(sc, best[impl])
        rate[impl] = best[impl].get("rate")
    for impl in impls:
        run = best[impl]
        sc.rows.append(
            [
                LABELS[impl],
                "-" if rate[impl] is None else f"{rate[impl]:.0f}",
                spread(results[impl], "rate"),
                ratio(rate[impl], rate["aiohttp"]),
                ratio(rate[impl], rate["httpx"]),
                f"{run.get('wall_s', 0):.2f}",
                ms(per_pipe(run, "cpu_s")),
                ms(run["fake_cpu_s"] / n),
                fake_requests(run),
            ]
        )
    ours, base = rate["apimart"], rate["aiohttp"]
    sc.targets.append(
        Target(
            "apimart_async pipelines/s vs raw aiohttp",
            None if ours is None or not base else ours / base,
            0.8,
            op=">=",
            unit="x",
        )
    )
    sc.notes.append("the fake shares the 2 cores: wall throughput is bounded by client + fake CPU")
    return sc


RUNNERS: dict[str, Callable[[Sizes, bool], Scenario]] = {
    "overhead": overhead,
    "polling": polling,
    "memory": memory,
    "uploads": uploads,
    "e2e": e2e,
}


def client_fingerprint() -> str:
    """A short hash of apimart_async's sources, so a result names the code it measured
    (teammates may be editing the client while a long run is going)."""
    root = Path(__file__).resolve().parent.parent / "apimart_async"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="apimart_async against raw httpx and raw aiohttp (see benchmarks/README.md)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: each scenario < 1 min")
    p.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    p.add_argument("--reps", type=int, help="override the repetitions of overhead and e2e")
    p.add_argument("--pipelines", type=int, help="override overhead/e2e pipeline counts")
    p.add_argument("-v", "--verbose", action="store_true", help="print each worker's result")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.reps:
        sizes = replace(sizes, overhead_reps=args.reps, e2e_reps=args.reps)
    if args.pipelines:
        sizes = replace(sizes, overhead_pipelines=args.pipelines, e2e_pipelines=args.pipelines)
    command = shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])
    print(f"$ {command}")
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; sizes: {'quick' if args.quick else 'full'}; "
        f"apimart_async sources {client_fingerprint()}"
    )
    payload: dict[str, Any] = {
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "sizes": asdict(sizes),
        "scenarios": {},
    }
    failed = 0
    for name in SCENARIOS:
        if name not in args.only:
            continue
        t0 = time.monotonic()
        before = client_fingerprint()
        scenario = RUNNERS[name](sizes, args.verbose)
        scenario.elapsed_s = time.monotonic() - t0
        after = client_fingerprint()
        scenario.settings["client_sources"] = before
        if after != before:
            scenario.notes.append(
                f"apimart_async's sources CHANGED during this scenario ({before} -> {after}): "
                "its rows may mix two versions of the client; run it again"
            )
        print_scenario(scenario)
        failed += sum(not t.passed for t in scenario.targets)
        payload["scenarios"][name] = scenario.as_dict()
        write_json(args.json, payload)  # after every scenario: a crash keeps the rest
    payload["loadavg_end"] = os.getloadavg()
    write_json(args.json, payload)
    total = sum(len(s["targets"]) for s in payload["scenarios"].values())
    print(f"\n{total - failed} of {total} targets met; results in {args.json}")
    return 0
