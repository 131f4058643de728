"""``python -m benchmarks.sync_overhead``: what the blocking client costs over the async one.

The same pipelines (upload own PNG → submit → poll, zero-latency tasks) through
``AsyncApimart.generate_many`` (``async``) and through ``Apimart.generate_many``, the
blocking client, iterated from the main thread (``sync``), against one fake server
process, in one run. Each measurement is a fresh worker process (``--worker``), and
repetitions are interleaved, as in the main harness (see ``benchmarks/README.md``).
The figure is client CPU per pipeline: ``getrusage`` user + system of the worker (all
threads: the blocking client's loop thread and the caller's) over the measured section,
divided by the pipelines. Target: sync within 1.2x of async.

    python -m benchmarks.sync_overhead                  # 2,000 pipelines, c=10 and 200, 5 reps
    python -m benchmarks.sync_overhead --pipelines 500 --reps 3 --concurrency 200
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
from typing import Any

from .fakeserver import FakeServer
from .images import png
from .measure import Meter
from .raw import MODEL
from .worker import DEFAULT_POOL, fake_admin

IMPLS = ("async", "sync")
TARGET = 1.2


def _requests(images: list[bytes]) -> list[dict[str, Any]]:
    return [
        {"model": MODEL, "prompt": f"benchmark pipeline {i}", "image_urls": [image]}
        for i, image in enumerate(images)
    ]


def _client_options(concurrency: int) -> dict[str, Any]:
    """The overhead scenario's client: stage limits sized to the concurrency, no budget."""
    from apimart_async import Limits

    from .ours import poll_policy

    pool = min(concurrency, DEFAULT_POOL)
    limits = Limits(
        uploads=concurrency,
        submits=concurrency,
        polls_in_flight=concurrency,
        poll_rate=1e6,
        poll_burst=max(concurrency, 50),
        max_connections=pool,
    )
    return {"limits": limits, "poll": poll_policy("prompt", 1.0)}


async def _run_async(base_url: str, api_key: str, n: int, concurrency: int) -> dict[str, Any]:
    from apimart_async import AsyncApimart

    requests = _requests([png(i) for i in range(n)])
    options = _client_options(concurrency)
    async with AsyncApimart(api_key=api_key, base_url=base_url, **options) as client:
        # One pipeline's calls first, so lazy set-up (the aiohttp transport) is not measured.
        up = await client.upload_image(png(10_000_000), cache=False)
        task = await client.submit(model=MODEL, prompt="warm-up", image_urls=[up.url])
        await client.get_task(task.id)
        await asyncio.to_thread(fake_admin, base_url, "/_fake/reset?all=1", "POST")
        gc.collect()
        meter = Meter()
        meter.start()
        ok = 0
        async with client.generate_many(requests, concurrency=concurrency) as outcomes:
            async for outcome in outcomes:
                ok += outcome.ok
        meter.stop()
    return {**meter.as_dict(), "completed": ok}


def _run_sync(base_url: str, api_key: str, n: int, concurrency: int) -> dict[str, Any]:
    from apimart_async import Apimart

    requests = _requests([png(i) for i in range(n)])
    options = _client_options(concurrency)
    with Apimart(api_key=api_key, base_url=base_url, **options) as client:
        up = client.upload_image(png(10_000_000), cache=False)
        task = client.submit(model=MODEL, prompt="warm-up", image_urls=[up.url])
        client.get_task(task.id)
        fake_admin(base_url, "/_fake/reset?all=1", "POST")
        gc.collect()
        meter = Meter()
        meter.start()
        ok = 0
        with client.generate_many(requests, concurrency=concurrency) as outcomes:
            for outcome in outcomes:
                ok += outcome.ok
        meter.stop()
    return {**meter.as_dict(), "completed": ok}


def worker(args: argparse.Namespace) -> int:
    """One measurement in this process; one JSON object on stdout."""
    (concurrency,) = args.concurrency
    if args.worker == "async":
        result = asyncio.run(_run_async(args.base_url, args.api_key, args.pipelines, concurrency))
    else:
        result = _run_sync(args.base_url, args.api_key, args.pipelines, concurrency)
    result.update(impl=args.worker, pipelines=args.pipelines, concurrency=concurrency)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _measure(impl: str, url: str, pipelines: int, concurrency: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.sync_overhead", "--worker", impl]
    cmd += ["--base-url", url, "--pipelines", str(pipelines), "--concurrency", str(concurrency)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["completed"] != pipelines:
        raise RuntimeError(f"{impl}: {result['completed']} of {pipelines} pipelines completed")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sync_overhead", description=__doc__)
    p.add_argument("--pipelines", type=int, default=2000)
    p.add_argument(
        "--concurrency",
        type=lambda s: [int(c) for c in s.split(",")],
        default=[10, 200],
        help="comma-separated concurrencies (default 10,200)",
    )
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median)")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--base-url", help=argparse.SUPPRESS)
    p.add_argument("--api-key", default="test", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    ratios: list[float] = []
    with FakeServer(latency="zero") as fake:
        print(f"fake: {' '.join(fake.command())}")
        print(f"{args.pipelines} pipelines per run, median of {args.reps} interleaved reps\n")
        print(f"{'c':>5} {'impl':>6} {'CPU ms/pipe':>12} {'spread':>7} {'wall s':>7}")
        for concurrency in args.concurrency:
            cpu: dict[str, list[float]] = {impl: [] for impl in IMPLS}
            wall: dict[str, list[float]] = {impl: [] for impl in IMPLS}
            for rep in range(args.reps):
                order = IMPLS if rep % 2 == 0 else IMPLS[::-1]
                for impl in order:
                    result = _measure(impl, fake.url, args.pipelines, concurrency)
                    cpu[impl].append(result["cpu_s"] * 1000 / args.pipelines)
                    wall[impl].append(result["wall_s"])
            for impl in IMPLS:
                median = statistics.median(cpu[impl])
                spread = (max(cpu[impl]) - min(cpu[impl])) / median
                print(
                    f"{concurrency:>5} {impl:>6} {median:>12.3f} {spread:>6.0%} "
                    f"{statistics.median(wall[impl]):>7.2f}"
                )
            ratio = statistics.median(cpu["sync"]) / statistics.median(cpu["async"])
            ratios.append(ratio)
            verdict = "PASS" if ratio <= TARGET else "FAIL"
            print(f"{concurrency:>5} sync / async CPU per pipeline: {ratio:.2f}x  {verdict}\n")
    print(f"target: sync <= {TARGET}x async; worst ratio {max(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
