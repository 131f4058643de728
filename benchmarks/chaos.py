"""``python -m benchmarks.chaos [--jobs 2000]``: many pipelines through a faulty service.

The scenario the reliability issue asks for: ``generate_many`` runs *jobs* whole
pipelines (upload a reference image, submit, poll, download every image) against a
``FakeApimart`` that misbehaves on purpose:

=========================================  ===========================================
10% of requests answer 5xx                 8% ``server_error`` (500/502/503), 2%
                                           ``get_channel_failed`` (500/503)
5% of requests answer 429 + Retry-After    ``rate_limit``
2% of requests are reset before an answer  ``reset`` (the fake saw them, did nothing)
2% of submits drop after the task exists   ``drop_after_submit`` (the ambiguous case)
1% of answers are malformed                ``malformed_json`` (truncated JSON or HTML)
5% of tasks fail, 1% never finish          ``task_failure``, ``task_stuck`` (they end
                                           as TaskTimeoutError at the job deadline)
random request latency                     ``Latency.fast(request_latency=(0, 2 ms))``
=========================================  ===========================================

It runs twice: once against a fake that *ignores* ``Idempotency-Key`` (the client must
never pay twice on its own: an ambiguous submit becomes ``SubmissionUncertainError``),
and once against a fake that honours keys with ``retry_uncertain_submits=True`` (every
job must end with exactly one task). After each run it checks the invariants (exactly
one outcome per job, only typed errors, no duplicate tasks, no task lost, nothing left
running, no partial file) and prints the figures. The same code is the small-size
chaos test (``tests/test_reliability_chaos.py``), so the two cannot drift.

The client retries safe calls (and provably unsent submits) up to 10 times with
millisecond backoffs, as the fake's clock runs 1,000 times fast, so the error counts show
what the client could not, or must not, retry. ``--server`` serves the fake over real
HTTP (uvicorn in a thread; needs the ``server`` extra) instead of the in-process
transport, and also checks that no socket stays open; there every reset happens after
the response headers (an ASGI app cannot drop a connection earlier).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import stamina.instrumentation

from apimart_async import (
    ApimartError,
    AsyncApimart,
    InvalidRequestError,
    Limits,
    PollPolicy,
    RetryPolicy,
    SubmissionUncertainError,
    TaskFailedError,
    TaskStatus,
    TaskTimeoutError,
)
from apimart_async.testing import FakeApimart, Faults, FaultsSpec, Latency
from apimart_async.types import SubmittedEvent

from . import measure
from .images import png

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from apimart_async import Outcome
    from apimart_async.types import Event

__all__ = [
    "CHAOS_FAULTS",
    "MODES",
    "ChaosConfig",
    "ChaosRun",
    "count_sockets",
    "main",
    "run_chaos",
    "settle_sockets",
]

MODEL = "gemini-3.1-flash-image-preview"
API_KEY = "sk-chaos-0123456789abcdef"
MODES = ("keys-ignored", "keys-honoured")

CHAOS_FAULTS = Faults(
    server_error=0.08,
    channel_failed=0.02,
    channel_failed_statuses=(500, 503),
    rate_limit=0.05,
    retry_after=0.01,
    reset=0.02,
    drop_after_submit=0.02,
    malformed_json=0.01,
    task_failure=0.05,
    task_stuck=0.01,
)
"""The issue's fault mix (request-level faults are drawn per request, fates per task)."""

# Faults after which a submit may or may not have created a task (what the client must
# report as SubmissionUncertainError rather than resend on a fake that ignores keys).
_AMBIGUOUS_FAULTS = frozenset({"reset", "drop_after_submit", "malformed_json"})
_AMBIGUOUS_STATUSES = frozenset({500, 502, 504})


@dataclass(frozen=True)
class ChaosConfig:
    """How big and how hostile one run is."""

    jobs: int = 2000
    concurrency: int = 64
    seed: int = 1
    timeout: float = 3.0
    """Per-pipeline deadline: stuck tasks end as TaskTimeoutError when it passes."""
    request_latency: tuple[float, float] = (0.0, 0.002)
    retry_attempts: int = 10
    """Attempts per safe call (and per provably-unsent submit)."""
    server: bool = False
    faults: FaultsSpec = CHAOS_FAULTS
    """One ``Faults`` for every endpoint, or one per endpoint."""


@dataclass
class ChaosRun:
    """Everything one run produced, and the checks over it."""

    mode: str
    config: ChaosConfig
    outcomes: list[Outcome]
    fake: FakeApimart
    events: list[Event]
    download_dir: Path
    wall: float
    leaked_tasks: int
    open_sockets: int | None
    client_closed: bool
    errors: Counter[str] = field(default_factory=Counter[str])

    @property
    def honour(self) -> bool:
        """Whether the fake honoured idempotency keys in this run."""
        return self.mode == "keys-honoured"

    def completed(self) -> list[Outcome]:
        """The outcomes that completed."""
        return [o for o in self.outcomes if o.ok]

    def duplicates(self) -> int:
        """Jobs under whose key the fake created more than one task (paid twice)."""
        return len(self.fake.duplicate_keys())

    def ambiguous_keys(self) -> set[str]:
        """Keys of jobs whose submit hit a fault after which the task may exist."""
        keys: set[str] = set()
        for r in self.fake.requests:
            if r.endpoint != "submit" or r.idempotency_key is None:
                continue
            if r.fault in _AMBIGUOUS_FAULTS or (
                r.fault == "server_error" and r.status in _AMBIGUOUS_STATUSES
            ):
                keys.add(r.idempotency_key)
        return keys

    def report(self) -> dict[str, Any]:
        """The figures: outcome counts, error classes, duplicates, cost in requests."""
        stats = self.fake.stats
        uncertain = [o for o in self.outcomes if isinstance(o.error, SubmissionUncertainError)]
        by_key = stats.tasks_by_key
        return {
            "mode": self.mode,
            "transport": "uvicorn" if self.config.server else "in-process",
            "jobs": self.config.jobs,
            "completed": len(self.completed()),
            "errors": dict(sorted(self.errors.items())),
            "uncertain_with_task": sum(1 for o in uncertain if by_key.get(o.idempotency_key)),
            "duplicates": self.duplicates(),
            "tasks_created": stats.tasks_created,
            "replays": stats.replays,
            "requests": stats.requests_total,
            "requests_per_pipeline": stats.requests_total / max(1, self.config.jobs),
            "faults_injected": sum(stats.faults.values()),
            "wall_s": self.wall,
            "leaked_tasks": self.leaked_tasks,
            "in_flight_after": stats.in_flight,
            "open_sockets_after": self.open_sockets,
            "violations": len(self.violations()),
        }

    def violations(self) -> list[str]:
        """Every broken invariant, described; empty when the run was clean."""
        problems: list[str] = []
        jobs = self.config.jobs
        indices = Counter(o.index for o in self.outcomes)
        if sorted(indices) != list(range(jobs)) or any(n != 1 for n in indices.values()):
            problems.append(f"{len(self.outcomes)} outcomes for {jobs} jobs, not one each")
        for o in self.outcomes:
            if o.error is not None and not isinstance(o.error, ApimartError | InvalidRequestError):
                problems.append(f"job {o.index}: untyped error {o.error!r}")
        if self.duplicates():
            problems.append(f"{self.duplicates()} jobs paid twice: {self.fake.duplicate_keys()}")
        problems += self._task_checks()
        problems += self._mode_checks()
        problems += self._file_checks()
        if self.leaked_tasks:
            problems.append(f"{self.leaked_tasks} tasks still running after the client closed")
        if self.fake.stats.in_flight:
            problems.append(f"{self.fake.stats.in_flight} requests still in flight")
        if self.open_sockets:
            problems.append(f"{self.open_sockets} sockets still open after the client closed")
        if not self.client_closed:
            problems.append("the client did not close")
        return problems

    def _task_checks(self) -> list[str]:
        """Each task the fake created is known to its job and ended as its fate says."""
        problems: list[str] = []
        submitted = {e.task_id for e in self.events if isinstance(e, SubmittedEvent)}
        by_task = {o.task.id: o for o in self.outcomes if o.task is not None}
        uncertain = {
            o.idempotency_key
            for o in self.outcomes
            if isinstance(o.error, SubmissionUncertainError)
        }
        for task in self.fake.tasks.values():
            outcome = by_task.get(task.id)
            if outcome is None:
                if task.id not in submitted and task.idempotency_key not in uncertain:
                    problems.append(f"task {task.id} was created but no job knows it")
                continue
            error = outcome.error
            if task.fate == "fail" and not isinstance(error, TaskFailedError):
                problems.append(f"job {outcome.index}: failed task ended as {error!r}")
            if task.fate == "stuck" and not isinstance(error, TaskTimeoutError):
                problems.append(f"job {outcome.index}: stuck task ended as {error!r}")
            if task.fate == "complete" and error is not None:
                problems.append(f"job {outcome.index}: task completed but job ended {error!r}")
        for o in self.outcomes:
            if o.ok and (o.task is None or o.task.status is not TaskStatus.COMPLETED):
                problems.append(f"job {o.index}: ok without a completed task")
        return problems

    def _mode_checks(self) -> list[str]:
        problems: list[str] = []
        by_key = self.fake.stats.tasks_by_key
        if self.honour:
            for o in self.outcomes:
                created = len(by_key.get(o.idempotency_key, ()))
                if created != 1:
                    problems.append(f"job {o.index}: {created} tasks created, not exactly one")
                if isinstance(o.error, SubmissionUncertainError):
                    problems.append(f"job {o.index}: uncertain although retries are on")
            return problems
        ambiguous = self.ambiguous_keys()
        for o in self.outcomes:
            is_uncertain = isinstance(o.error, SubmissionUncertainError)
            if (o.idempotency_key in ambiguous) != is_uncertain:
                problems.append(
                    f"job {o.index}: ambiguous submit={o.idempotency_key in ambiguous} "
                    f"but outcome {o.error!r}"
                )
        return problems

    def _file_checks(self) -> list[str]:
        problems: list[str] = []
        names = sorted(p.name for p in self.download_dir.iterdir())
        hidden = [n for n in names if n.startswith(".")]
        if hidden:
            problems.append(f"partial files left behind: {hidden[:5]}")
        expected: set[str] = set()
        for o in self.outcomes:
            if not o.ok:
                continue
            n = len(o.task.image_urls) if o.task else 0
            if len(o.files) != n or not all(_is_png(f) for f in o.files):
                problems.append(f"job {o.index}: {len(o.files)} good files for {n} images")
            expected.update(f.name for f in o.files)
        stray = set(names) - expected - set(hidden)
        if stray:
            problems.append(f"files no completed job owns: {sorted(stray)[:5]}")
        return problems


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")


def chaos_requests(jobs: int) -> list[dict[str, Any]]:
    """One request per job, each with its own reference image and n of 1 or 2."""
    return [
        {
            "model": MODEL,
            "prompt": f"chaos job {i}",
            "image_urls": [png(i, side=4)],
            "n": 1 + i % 2,
        }
        for i in range(jobs)
    ]


def _task_ids() -> set[int]:
    return {t.id for t in anyio.get_running_tasks()}


def count_sockets() -> int | None:
    """Open sockets of this process (Linux), or None where /proc is missing."""
    return measure.count_sockets() if Path("/proc/self/fd").is_dir() else None


@contextlib.asynccontextmanager
async def _service(fake: FakeApimart, server: bool) -> AsyncIterator[dict[str, Any]]:
    """Client keyword arguments reaching *fake*: in process, or over real HTTP."""
    if not server:
        yield {"transport": fake.transport()}
        return
    async with fake.serve() as base_url:
        yield {"base_url": base_url}


async def settle_sockets(baseline: int | None, wait: float = 5.0) -> int | None:
    """Sockets above *baseline* once the server side has seen our connections close."""
    if baseline is None:
        return None
    deadline = anyio.current_time() + wait
    while True:
        now = count_sockets()
        extra = max(0, (now or 0) - baseline)
        if extra == 0 or anyio.current_time() > deadline:
            return extra
        await anyio.sleep(0.05)


async def run_chaos(config: ChaosConfig, mode: str, download_dir: Path) -> ChaosRun:
    """Run one chaos pass in *mode* (see ``MODES``) and return what happened."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    honour = mode == "keys-honoured"
    fake = FakeApimart(
        api_key=API_KEY,
        faults=config.faults,
        latency=Latency.fast(request_latency=config.request_latency),
        honour_idempotency=honour,
        seed=config.seed,
    )
    retry = RetryPolicy(
        attempts=config.retry_attempts,
        wait_initial=0.001,
        wait_max=0.02,
        wait_jitter=0.002,
        retry_after_max=0.05,
    )
    events: list[Event] = []
    outcomes: list[Outcome] = []
    before = _task_ids()
    async with _service(fake, config.server) as target:
        sockets_before = count_sockets() if config.server else None
        started = time.perf_counter()
        client = AsyncApimart(
            api_key=API_KEY,
            poll=PollPolicy().scaled(0.001),
            limits=Limits(poll_rate=100_000.0, poll_burst=1_000),
            retry=retry,
            retry_uncertain_submits=honour,
            **target,
        )
        async with (
            client,
            client.generate_many(
                chaos_requests(config.jobs),
                concurrency=config.concurrency,
                timeout=config.timeout,
                download_to=download_dir,
                on_event=events.append,
            ) as stream,
        ):
            async for outcome in stream:
                outcomes.append(outcome)
        wall = time.perf_counter() - started
        open_sockets = await settle_sockets(sockets_before) if config.server else None
    leaked = len(_task_ids() - before)
    errors = Counter(type(o.error).__name__ for o in outcomes if o.error is not None)
    return ChaosRun(
        mode=mode,
        config=config,
        outcomes=outcomes,
        fake=fake,
        events=events,
        download_dir=download_dir,
        wall=wall,
        leaked_tasks=leaked,
        open_sockets=open_sockets,
        client_closed=client.is_closed,
        errors=errors,
    )


def format_table(reports: Sequence[dict[str, Any]]) -> str:
    """The figures of each run side by side, as plain text."""
    error_names = sorted({name for r in reports for name in r["errors"]})
    rows: list[tuple[str, list[str]]] = [
        ("transport", [r["transport"] for r in reports]),
        ("jobs", [str(r["jobs"]) for r in reports]),
        ("completed", [str(r["completed"]) for r in reports]),
        *[(f"  {name}", [str(r["errors"].get(name, 0)) for r in reports]) for name in error_names],
        ("uncertain, task exists", [str(r["uncertain_with_task"]) for r in reports]),
        ("duplicates (must be 0)", [str(r["duplicates"]) for r in reports]),
        ("tasks created", [str(r["tasks_created"]) for r in reports]),
        ("idempotent replays", [str(r["replays"]) for r in reports]),
        ("faults injected", [str(r["faults_injected"]) for r in reports]),
        ("requests", [str(r["requests"]) for r in reports]),
        ("requests / pipeline", [f"{r['requests_per_pipeline']:.2f}" for r in reports]),
        ("wall time", [f"{r['wall_s']:.2f} s" for r in reports]),
        ("leaked tasks", [str(r["leaked_tasks"]) for r in reports]),
        ("requests in flight after", [str(r["in_flight_after"]) for r in reports]),
        (
            "open sockets after",
            [
                "n/a" if r["open_sockets_after"] is None else str(r["open_sockets_after"])
                for r in reports
            ],
        ),
        ("invariant violations", [str(r["violations"]) for r in reports]),
    ]
    headers = [r["mode"] for r in reports]
    width = max(len(name) for name, _ in rows)
    cols = [max(len(h), *(len(v[i]) for _, v in rows)) for i, h in enumerate(headers)]
    lines = [" " * width + "  " + "  ".join(h.rjust(c) for h, c in zip(headers, cols, strict=True))]
    lines.append("-" * len(lines[0]))
    for name, values in rows:
        cells = "  ".join(v.rjust(c) for v, c in zip(values, cols, strict=True))
        lines.append(f"{name.ljust(width)}  {cells}")
    return "\n".join(lines)


async def _run_all(
    config: ChaosConfig, modes: Sequence[str]
) -> list[tuple[dict[str, Any], list[str]]]:
    """Each mode's figures and violations (checked while its download folder exists)."""
    results: list[tuple[dict[str, Any], list[str]]] = []
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="apimart-chaos-") as tmp:
            run = await run_chaos(config, mode, Path(tmp))
            results.append((run.report(), run.violations()))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run both modes, print the table; exit 1 on any violation."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=2000, help="pipelines per mode")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3.0, help="per-pipeline deadline (s)")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--server", action="store_true", help="serve the fake over real HTTP")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    # stamina logs every scheduled retry; thousands of them would bury the table.
    stamina.instrumentation.set_on_retry_hooks([])
    config = ChaosConfig(
        jobs=args.jobs,
        concurrency=args.concurrency,
        seed=args.seed,
        timeout=args.timeout,
        server=args.server,
    )
    modes = MODES if args.mode == "both" else (args.mode,)
    results = anyio.run(_run_all, config, modes, backend=args.backend)
    reports = [report for report, _ in results]
    print(
        f"chaos: {config.jobs} pipelines per mode, concurrency {config.concurrency}, "
        f"{args.backend}, seed {config.seed}, deadline {config.timeout:g} s"
    )
    print(format_table(reports))
    failed = False
    for report, problems in results:
        for problem in problems:
            failed = True
            print(f"VIOLATION [{report['mode']}]: {problem}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
