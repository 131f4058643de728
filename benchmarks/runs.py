"""What every scenario shares: the sizes, the worker runner and the table helpers.

Scenarios live in ``runner.py`` (overhead, polling, memory, uploads, end to end),
``tracing.py``, ``startup.py`` and ``webhooks.py``; each takes the ``Sizes`` of the run
and returns a ``report.Scenario``. ``Runner`` starts one ``python -m benchmarks.worker``
process per measurement against a running fake and keeps its JSON.
"""

from __future__ import annotations

import json
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .fakeserver import FakeServer
    from .report import Scenario

__all__ = [
    "FULL",
    "LABELS",
    "MB",
    "QUICK",
    "REPO",
    "Runner",
    "Sizes",
    "check_complete",
    "fake_requests",
    "fraction",
    "free_port",
    "median_run",
    "ms",
    "per_pipe",
    "ratio",
    "requests_per_job",
    "run_json",
    "spread",
]

MB = 1024 * 1024
# Workers and probes run from the repository root, so ``apimart_async`` is this
# checkout's (not whatever an editable install elsewhere points at).
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    """How big each scenario runs (the issues' sizes, or ``--quick`` ones)."""

    overhead_pipelines: int
    overhead_concurrency: tuple[int, ...]
    overhead_reps: int
    # Context rows without targets: in the overhead scenario, other transports, explicit
    # calls and dedup; in the end-to-end one, the raw httpx loop.
    context: bool
    tracing_pipelines: int
    tracing_concurrency: int
    tracing_reps: int
    startup_reps: int
    first_call_reps: int
    polling_pipelines: int
    polling_concurrency: int
    polling_scale: float
    webhooks_pipelines: int
    webhooks_concurrency: int
    webhooks_scale: float
    webhooks_drop: float
    memory_inflight: int
    memory_pool: int
    shared_jobs: int
    e2e_pipelines: int
    e2e_concurrency: int
    e2e_scale: float
    e2e_reps: int


FULL = Sizes(
    overhead_pipelines=2000,
    overhead_concurrency=(10, 200, 1000),
    overhead_reps=3,
    context=True,
    tracing_pipelines=2000,
    tracing_concurrency=200,
    tracing_reps=5,
    startup_reps=20,
    first_call_reps=10,
    polling_pipelines=1000,
    polling_concurrency=100,
    polling_scale=0.05,
    webhooks_pipelines=1000,
    webhooks_concurrency=100,
    webhooks_scale=0.05,
    webhooks_drop=0.01,
    memory_inflight=10_000,
    memory_pool=100,
    shared_jobs=1000,
    e2e_pipelines=2000,
    e2e_concurrency=200,
    e2e_scale=0.05,
    e2e_reps=3,
)
QUICK = replace(
    FULL,
    overhead_pipelines=1000,  # at least the top concurrency, so 1,000 are in flight at once
    overhead_reps=1,
    context=False,
    tracing_pipelines=500,
    startup_reps=10,
    first_call_reps=5,
    polling_pipelines=500,
    memory_inflight=2000,
    shared_jobs=200,
    e2e_pipelines=600,
)

LABELS = {
    "aiohttp": "raw aiohttp",
    "httpx": "raw httpx",
    "httpx-aiohttp": "raw httpx+httpx-aiohttp",
    "apimart": "apimart generate_many",
    "apimart-generate": "apimart generate",
    "apimart-httpx": "apimart httpx-transport",
    "apimart-calls": "apimart explicit calls",
    "apimart-shared": "apimart SHARED image*",
    "apimart-fixed": "apimart fixed 2s polls",
}


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
        proc, parsed = run_json(cmd, impl, timeout=1800)
        fake_cpu = self.fake.cpu_seconds() - fake_cpu0
        result: dict[str, Any] = {"impl": impl, **options, **parsed}
        if not result.get("failed") and proc.stderr.strip():
            result["stderr"] = proc.stderr[-1000:]
        result["fake_cpu_s"] = fake_cpu
        result["process_s"] = time.monotonic() - started
        result["command"] = shlex.join(cmd)
        if not self.fake.alive():
            raise RuntimeError(f"the fake server died:\n{self.fake.log()}")
        self.scenario.runs.append(result)
        if self.verbose:
            keys = ("impl", "concurrency", "pool", "otel", "cpu_s", "wall_s", "errors")
            print(f"    { ({k: result.get(k) for k in keys}) }", flush=True)
        return result


def run_json(
    cmd: list[str], what: str, *, timeout: float, env: Mapping[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run *cmd* from the repository root; the last JSON line it printed, or
    ``{"failed": True, "stderr": ...}`` (and a note on stdout naming *what* failed)."""
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  ! {what} failed (exit {proc.returncode}):\n{proc.stderr[-1500:]}")
        return proc, {"failed": True, "stderr": proc.stderr[-3000:]}
    parsed: dict[str, Any] = json.loads(lines[-1])
    return proc, parsed


def free_port() -> int:
    """A TCP port free on loopback now (for a listener another process must know of
    in advance, such as the webhook receiver the fake delivers to)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


def fraction(value: float | None, base: float | None) -> float | None:
    """``value / base``, or None when either is missing (or *base* is zero)."""
    return None if value is None or not base else value / base


def ratio(value: float | None, base: float | None) -> str:
    """``value / base`` as ``1.23x``, or ``-`` when either is missing."""
    share = fraction(value, base)
    return "-" if share is None else f"{share:.2f}x"


def ms(seconds: float | None) -> str:
    """Seconds shown in milliseconds (three decimals)."""
    return "-" if seconds is None else f"{1000 * seconds:.3f}"


def per_pipe(run: dict[str, Any], key: str) -> float | None:
    """*key* of a run divided by its completed pipelines (None for a failed run)."""
    if run.get("failed") or not run.get("completed"):
        return None
    value: float = run[key] / run["completed"]
    return value


def requests_per_job(run: dict[str, Any]) -> float | None:
    """Every request the fake saw during the run, per completed pipeline."""
    fake = run.get("fake") or {}
    done = run.get("completed") or run.get("pipelines")
    if not fake or not done:
        return None
    value: float = fake.get("requests_total", 0) / done
    return value


def fake_requests(run: dict[str, Any]) -> str:
    """``requests_per_job`` for a table cell."""
    value = requests_per_job(run)
    return "-" if value is None else f"{value:.2f}"


def check_complete(scenario: Scenario, run: dict[str, Any]) -> None:
    """A note under the table when a run failed or left pipelines unfinished."""
    if run.get("failed"):
        scenario.notes.append(f"{run['impl']} run FAILED; see JSON for its stderr")
    elif run.get("errors") or run.get("completed") != run.get("pipelines"):
        scenario.notes.append(
            f"{run['impl']} @{run.get('concurrency')}: {run.get('completed')} of "
            f"{run.get('pipelines')} completed, {run.get('errors')} errors"
        )
