"""One measured client in its own process: ``python -m benchmarks.worker --impl ... ``.

Prints one JSON object on stdout. Start-up (interpreter, imports), client creation,
image generation and a warm-up pipeline (one upload, submit and poll, then
``POST /_fake/reset``) happen *before* the measured section, so the figures are the
steady-state cost of the pipelines alone. Modes:

* ``pipelines``: run *N* pipelines at *concurrency*; CPU, wall, peak RSS, peak open
  sockets; with ``--lags``, per-task detection lag and polls read from the fake.
  With ``--webhook-port``, a ``WebhookReceiver`` is served by uvicorn on that loopback
  port, on this process's event loop (its CPU is the client's), and our client waits on
  its pushes (``AsyncApimart(webhooks=receiver)``); the fake delivers to it through
  ``--webhook-rewrite``. ``--otel`` picks what OpenTelemetry the process has.
* ``inflight``: start *N* pipelines at once against tasks the fake holds pending; once
  every pipeline has made its first poll (a barrier), record RSS growth and open
  sockets, then cancel everything.
* ``upload``: upload one large file from disk; peak RSS above the pre-upload baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import math
import os
import statistics
import sys
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .images import png
from .measure import Meter, SocketSampler, count_sockets, rss_now
from .otel import OTEL_MODES, OtelSetup

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from apimart_async.webhooks import WebhookReceiver

RAW_IMPLS = ("aiohttp", "httpx", "httpx-aiohttp")
OUR_IMPLS = (
    "apimart",
    "apimart-generate",
    "apimart-httpx",
    "apimart-calls",
    "apimart-shared",
    "apimart-fixed",
)
IMPLS = RAW_IMPLS + OUR_IMPLS
# The connection pool every client gets by default: aiohttp's TCPConnector and httpx's
# Limits default to 100, and so does our client's. Beyond it, a run mostly measures the
# cost of opening connections (1,000 sockets for 2,000 pipelines), not the client.
DEFAULT_POOL = 100


@contextlib.asynccontextmanager
async def serve_receiver(public_url: str, port: int) -> AsyncGenerator[WebhookReceiver]:
    """A ``WebhookReceiver`` under uvicorn on ``127.0.0.1:port``, on this event loop.

    The fake's sender POSTs callbacks for ``public_url`` here (its ``--webhook-rewrite``
    maps the public URL to this port). Serving on the client's own loop means a push is
    handed to the waiting job directly, and its cost is part of the client's CPU.
    """
    from apimart_async.cli._webhook_server import serving
    from apimart_async.testing._sockets import bind
    from apimart_async.webhooks import WebhookReceiver

    receiver = WebhookReceiver(public_url=public_url)
    # The CLI's listener (what `apimart batch --webhook-listen` runs), on this loop.
    with bind("127.0.0.1", port) as sock:
        async with serving(receiver, sock, backend="asyncio"):
            yield receiver


def fake_admin(base_url: str, path: str, method: str = "GET") -> Any:
    """Call one of the fake's admin endpoints (blocking; never in a measured section)."""
    req = urllib.request.Request(f"{base_url.rstrip('/')}{path}", method=method, data=None)
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


def build(args: argparse.Namespace, receiver: WebhookReceiver | None = None) -> Any:
    """The implementation object for ``--impl`` (raw loop or our client)."""
    if args.impl in RAW_IMPLS:
        from .raw import RawAiohttp, RawHttpx

        if args.impl == "aiohttp":
            return RawAiohttp(args.base_url, args.api_key, pool=args.pool, interval=args.interval)
        return RawHttpx(
            args.base_url, args.api_key, pool=args.pool, interval=args.interval, transport=args.impl
        )
    from apimart_async import Limits

    from .ours import Ours, poll_policy

    if args.limits == "sized":
        c = args.concurrency
        limits = Limits(
            uploads=c,
            submits=c,
            polls_in_flight=c,
            poll_rate=args.poll_rate,
            poll_burst=max(c, 50),
            max_connections=args.pool,
        )
    else:  # the client's defaults, with the poll budget given
        limits = Limits(poll_rate=args.poll_rate, poll_burst=1000)
    return Ours(
        args.impl,
        args.base_url,
        args.api_key,
        limits=limits,
        poll=poll_policy(args.poll, args.poll_scale),
        interval=args.interval,
        webhooks=receiver,
    )


def lag_report(returns: dict[str, float], snapshot: dict[str, Any]) -> dict[str, Any]:
    """Detection lag and polls per task: our return times against the fake's records.

    lag = (time.monotonic() when the pipeline returned the task, in this process)
          - (completes_at: time.monotonic() at which the fake's task finished).
    CLOCK_MONOTONIC is system-wide on Linux, so both readings share one clock; the
    check is that no task was returned before the fake saw it detected. Tasks the
    client never queried (``polls == 0``: their result was pushed by a webhook) are
    summarised apart as ``pushed``, the others as ``queried``, since with webhooks the
    two are different mechanisms (a push, or the safety-net poll after a lost one).
    """
    tasks = {t["id"]: t for t in snapshot.get("tasks", [])}
    rows: list[tuple[float, float, float]] = []  # (lag, real duration, polls)
    early = 0
    for task_id, returned in returns.items():
        task = tasks.get(task_id)
        if task is None:
            continue
        if task.get("detected_at") is not None and returned < task["detected_at"]:
            early += 1
        rows.append((returned - task["completes_at"], task["real_duration"], task["polls"]))
    if not rows:
        return {"matched": 0}
    out = {
        **_lag_summary(rows),
        "matched": len(rows),
        "lag_min_s": min(r[0] for r in rows),
        "duration_p50_s": statistics.median(r[1] for r in rows),
        "duration_max_s": max(r[1] for r in rows),
        "polls_p95": _pct([r[2] for r in rows], 0.95),
        "polls_max": max(r[2] for r in rows),
        "returned_before_detected": early,
        "fake_detection_lag": snapshot.get("tasks_summary", {}).get("detection_lag"),
    }
    pushed = [r for r in rows if r[2] == 0]
    queried = [r for r in rows if r[2] > 0]
    out["pushed"] = {"count": len(pushed), **(_lag_summary(pushed) if pushed else {})}
    out["queried"] = {"count": len(queried), **(_lag_summary(queried) if queried else {})}
    return out


def _lag_summary(rows: list[tuple[float, float, float]]) -> dict[str, float]:
    lags = [r[0] for r in rows]
    durations = [r[1] for r in rows]
    rel = [lag / dur if dur > 0 else 0.0 for lag, dur, _ in rows]
    return {
        "lag_mean_s": statistics.fmean(lags),
        "lag_p95_s": _pct(lags, 0.95),
        "duration_mean_s": statistics.fmean(durations),
        "lag_over_duration_of_means": statistics.fmean(lags) / statistics.fmean(durations),
        "lag_over_duration_mean": statistics.fmean(rel),
        "lag_over_duration_median": statistics.median(rel),
        "lag_over_duration_p95": _pct(rel, 0.95),
        "polls_mean": statistics.fmean(r[2] for r in rows),
    }


def sustained_rate(done_at: list[float], started: float, k: int) -> dict[str, Any]:
    """Pipelines per second while every slot was busy: *k* = pipelines - concurrency
    completions over the time they took from the start.

    Once the k-th pipeline has finished, the last one has started; what follows is the
    drain, whose length is set by the slowest tasks of the batch. On realistic task
    durations those are a handful of random draws from a long tail, different in every
    run, so whole-run throughput of a finite batch measures them more than the client.
    """
    if k < 1 or len(done_at) < k or done_at[k - 1] <= started:
        return {}
    return {"sustained_rate": k / (done_at[k - 1] - started), "sustained_k": k}


def fake_counters(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The fake's request counters (per-task tables dropped)."""
    stats = dict(snapshot.get("stats", snapshot))
    for key in ("polls_by_task", "tasks_by_key", "duplicate_keys"):
        stats.pop(key, None)
    return stats


async def run_pipelines(args: argparse.Namespace, otel: OtelSetup) -> dict[str, Any]:
    n = args.pipelines
    images = [png(0)] * n if args.impl == "apimart-shared" else [png(i) for i in range(n)]
    returns: dict[str, float] = {}

    def on_done(task_id: str) -> None:
        returns[task_id] = time.monotonic()

    async with contextlib.AsyncExitStack() as stack:
        receiver: WebhookReceiver | None = None
        if args.webhook_port:
            # Entered first, so it closes last: after the client.
            receiver = await stack.enter_async_context(
                serve_receiver(args.webhook_public_url, args.webhook_port)
            )
        impl = build(args, receiver)
        async with impl:
            await impl.warmup()
            await asyncio.to_thread(fake_admin, args.base_url, "/_fake/reset?all=1", "POST")
            impl.prepare(images)
            otel.clear()
            gc.collect()
            meter = Meter()
            profiler = cProfile.Profile() if args.profile else None
            with SocketSampler() as sockets:
                meter.start()
                started = time.monotonic()  # the clock on_done reads
                if profiler is not None:
                    profiler.enable()
                errors = await impl.run(images, args.concurrency, on_done) or 0
                if profiler is not None:
                    profiler.disable()
                meter.stop()
            if profiler is not None:
                profiler.dump_stats(args.profile)
            query = "" if args.lags else "?tasks=0"
            snapshot = await asyncio.to_thread(fake_admin, args.base_url, f"/_fake/stats{query}")
    out: dict[str, Any] = {
        **meter.as_dict(),
        **otel.report(),
        "completed": len(returns),
        "errors": errors,
        "sockets_peak": sockets.peak,
        "pool": impl.pool,
        "fake": fake_counters(snapshot),
        **sustained_rate(sorted(returns.values()), started, n - args.concurrency),
    }
    if receiver is not None:
        stats = receiver.stats
        out["receiver"] = {
            "received": stats.received,
            "duplicates": stats.duplicates,
            "ignored": stats.ignored,
            "rejected": stats.rejected_total,
        }
    if args.lags:
        out["lags"] = lag_report(returns, snapshot)
    return out


async def run_inflight(args: argparse.Namespace) -> dict[str, Any]:
    n = args.pipelines
    images = [png(i) for i in range(n)]
    sockets_idle = count_sockets()  # the event loop's own self-pipe pair
    polled = 0
    barrier = asyncio.Event()

    def on_poll() -> None:
        nonlocal polled
        polled += 1
        if polled == n:
            barrier.set()

    impl = build(args)
    async with impl:
        await impl.warmup()
        await asyncio.to_thread(fake_admin, args.base_url, "/_fake/reset?all=1", "POST")
        impl.prepare(images)
        gc.collect()
        meter = Meter()
        meter.start()
        if args.tracemalloc:
            tracemalloc.start(args.tracemalloc)
        runner = asyncio.ensure_future(impl.run(images, n, lambda _id: None, on_poll))
        waiter = asyncio.ensure_future(barrier.wait())
        done, _ = await asyncio.wait(
            {runner, waiter}, timeout=args.timeout, return_when=asyncio.FIRST_COMPLETED
        )
        reached = barrier.is_set()
        await asyncio.sleep(0.5)  # let every pipeline settle into its sleep
        gc.collect()
        rss_held = rss_now()
        sockets_held = count_sockets()
        meter.stop()
        top: list[str] = []
        if args.tracemalloc:
            snapshot_mem = tracemalloc.take_snapshot()
            tracemalloc.stop()
            key = "traceback" if args.tracemalloc > 1 else "lineno"
            for stat in snapshot_mem.statistics(key)[:40]:
                where = " <- ".join(str(f) for f in stat.traceback)
                top.append(f"{stat.size / n:8.1f} B/pipeline {stat.count / n:6.2f} blocks  {where}")
        runner.cancel()
        waiter.cancel()
        await asyncio.gather(runner, waiter, return_exceptions=True)
        if runner in done and runner.exception() is not None:
            raise runner.exception()
        snapshot = await asyncio.to_thread(fake_admin, args.base_url, "/_fake/stats?tasks=0")
    return {
        **meter.as_dict(),
        "reached_barrier": reached,
        "waiting": polled,
        "rss_held": rss_held,
        "rss_growth": rss_held - meter.rss_before,
        "rss_growth_per_pipeline": (rss_held - meter.rss_before) / n,
        "tracemalloc_top": top,
        "sockets_idle": sockets_idle,
        "sockets_held": sockets_held,
        "pool": impl.pool,
        "fake": fake_counters(snapshot),
    }


async def run_upload(args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.file)
    size = args.file_bytes
    impl = build(args)
    async with impl:
        await impl.warmup()
        await asyncio.to_thread(fake_admin, args.base_url, "/_fake/reset?all=1", "POST")
        gc.collect()
        meter = Meter()
        meter.start()
        url = await impl.upload_file(path)
        meter.stop()
        snapshot = await asyncio.to_thread(fake_admin, args.base_url, "/_fake/stats?tasks=0")
    return {
        **meter.as_dict(),
        "file_bytes": size,
        "url": url,
        "peak_delta": meter.rss_peak - meter.rss_before,
        "fake": fake_counters(snapshot),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__)
    p.add_argument("--impl", choices=IMPLS, required=True)
    p.add_argument("--mode", choices=("pipelines", "inflight", "upload"), default="pipelines")
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", default="test")
    p.add_argument("--pipelines", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument(
        "--pool",
        type=int,
        default=None,
        help=f"every client's connection pool (default: concurrency, at most {DEFAULT_POOL})",
    )
    p.add_argument("--interval", type=float, default=0.5, help="raw/fixed poll interval (s)")
    p.add_argument("--poll", choices=("prompt", "adaptive", "idle"), default="prompt")
    p.add_argument("--poll-scale", type=float, default=1.0)
    p.add_argument("--poll-rate", type=float, default=1e6)
    p.add_argument("--limits", choices=("sized", "default"), default="sized")
    p.add_argument("--lags", action="store_true", help="report detection lag per task")
    p.add_argument(
        "--otel",
        choices=OTEL_MODES,
        default="api",
        help="OpenTelemetry in this process: none (hidden, as if not installed), api (no "
        "provider set: the default), noop (no-op providers set), sdk (in-memory exporter)",
    )
    p.add_argument(
        "--webhook-port",
        type=int,
        default=0,
        help="serve a WebhookReceiver on 127.0.0.1:PORT and wait on its pushes",
    )
    p.add_argument(
        "--webhook-public-url",
        default="https://hooks.bench.example.com/hooks",
        help="the receiver's public_url (the fake rewrites it to the loopback port)",
    )
    p.add_argument("--file", help="upload mode: the file to upload")
    p.add_argument("--profile", metavar="PATH", help="pipelines mode: cProfile stats to PATH")
    p.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="FRAMES",
        help="inflight mode: report the top allocations held at the barrier",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="inflight: barrier timeout")
    args = p.parse_args(argv)
    if args.webhook_port and args.impl not in ("apimart", "apimart-generate"):
        p.error("--webhook-port needs --impl apimart or apimart-generate")
    if args.pool is None:
        args.pool = min(args.concurrency, DEFAULT_POOL)
    args.file_bytes = os.path.getsize(args.file) if args.file else 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    otel = OtelSetup(args.otel)  # before anything imports apimart_async
    if args.mode == "pipelines":
        result = asyncio.run(run_pipelines(args, otel))
    elif args.mode == "inflight":
        result = asyncio.run(run_inflight(args))
    else:
        result = asyncio.run(run_upload(args))
    result.update(
        impl=args.impl, mode=args.mode, pipelines=args.pipelines, concurrency=args.concurrency
    )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
