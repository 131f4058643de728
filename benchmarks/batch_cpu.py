"""``apimart batch`` CPU per job against ``generate_many`` for the same jobs (issue 15).

    python -m benchmarks.batch_cpu                  # 2,000 jobs, 3 interleaved reps
    python -m benchmarks.batch_cpu --jobs 5000 --reps 5 --progress bar

One ``FakeApimart`` serves real HTTP from its own process with zero task latency (the
first task query already sees ``completed``), so what is measured is the client side
only. Each measurement is a fresh worker process (``--worker``) that imports
everything first, then takes ``getrusage`` CPU around the work alone:

* ``many``: ``client.generate_many(jobs, concurrency=C, download_to=DIR)``: submit,
  poll, download, as a script would do it;
* ``batch``: ``apimart batch JOBS --out DIR -c C`` in process (parse and validate the
  file, journal every step, download, write ``results.jsonl``, print the summary), with
  the progress display asked for (``off``, ``plain`` or ``bar``; ``bar`` renders to a
  forced terminal that is thrown away).

Both use the same poll schedule (scaled by ``--time-scale``), the same concurrency and
an unlimited poll budget. Reps are interleaved (batch, many, batch, many, ...); the
table shows medians, and the ratio batch / many is the issue's figure (target <= 1.5).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

GEM = "gemini-3-pro-image-preview"
TARGET = 1.5


def _write_jobs(path: Path, count: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(count):
            fh.write(json.dumps({"id": f"j{i}", "model": GEM, "prompt": f"picture {i}"}) + "\n")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import anyio
    import rich.progress  # noqa: F401  # the bar's modules, imported before measuring

    from apimart_async import AsyncApimart, Limits, PollPolicy
    from apimart_async.cli._app import run
    from apimart_async.cli._batch import cmd_batch  # noqa: F401 - imported before measuring

    jobs = Path(args.jobs_file)
    out = Path(args.out)
    if args.worker == "batch":
        argv = [
            "batch", str(jobs), "--out", str(out), "--base-url", args.url,
            "--time-scale", str(args.time_scale), "-c", str(args.concurrency),
            "--poll-rps", "1000000", "--progress", args.progress,
        ]  # fmt: skip
        sink_out, sink_err = io.StringIO(), io.StringIO()
        start = cpu_seconds()
        code = run(argv, stdout=sink_out, stderr=sink_err)
        cpu = cpu_seconds() - start
        if code != 0:
            raise SystemExit(f"batch exited {code}:\n{sink_err.getvalue()[-2000:]}")
    else:
        requests = [json.loads(line) for line in jobs.read_text(encoding="utf-8").splitlines()]
        for request in requests:
            request.pop("id", None)

        async def many() -> int:
            done = 0
            async with (
                AsyncApimart(
                    api_key="test",
                    base_url=args.url,
                    poll=PollPolicy().scaled(args.time_scale),
                    limits=Limits(poll_rate=1_000_000.0, poll_burst=1_000),
                ) as client,
                client.generate_many(
                    requests,
                    concurrency=args.concurrency,
                    download_to=None if args.no_download else out,
                ) as outcomes,
            ):
                async for outcome in outcomes:
                    done += outcome.error is None
            return done

        start = cpu_seconds()
        done = anyio.run(many)
        cpu = cpu_seconds() - start
        if done != len(requests):
            raise SystemExit(f"generate_many finished {done} of {len(requests)} jobs")
    return {"impl": args.worker, "cpu": cpu, "jobs": args.count}


def _measure(impl: str, url: str, jobs: Path, count: int, args: argparse.Namespace) -> float:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{impl}-"))
    tree = args.before if impl == "before" else str(Path(__file__).resolve().parents[1])
    try:
        cmd = [
            sys.executable, __file__, "--worker", "many" if impl == "many" else "batch",
            "--url", url,
            "--jobs-file", str(jobs), "--out", str(out), "--count", str(count),
            "--concurrency", str(args.concurrency), "--time-scale", str(args.time_scale),
            "--progress", args.progress, *(["--no-download"] if args.no_download else []),
        ]  # fmt: skip
        # The worker runs as a script, so *tree* decides which apimart_async it measures.
        env = {**os.environ, "APIMART_API_KEY": "test", "PYTHONPATH": tree}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{impl} worker failed:\n{done.stdout}\n{done.stderr}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return float(result["cpu"])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (or one worker, with ``--worker``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch_cpu")
    parser.add_argument("--jobs", type=int, default=2000, dest="count", help="jobs (2000)")
    parser.add_argument("--count", type=int, dest="count", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (3)")
    parser.add_argument("--concurrency", type=int, default=32, help="jobs at once (32)")
    parser.add_argument("--time-scale", type=float, default=0.001, help="poll schedule scale")
    parser.add_argument("--progress", default="off", choices=("off", "plain", "bar"))
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="generate_many stops at the result URLs (the batch still downloads)",
    )
    parser.add_argument(
        "--before",
        metavar="TREE",
        help="also measure `apimart batch` from another source tree (e.g. a checkout of "
        "the previous commit), in the same interleaved reps",
    )
    parser.add_argument("--worker", choices=("batch", "many"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--jobs-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    from .fakeserver import FakeServer

    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    jobs = work / "jobs.jsonl"
    _write_jobs(jobs, args.count)
    impls = ["batch", "many", *(["before"] if args.before else [])]
    figures: dict[str, list[float]] = {impl: [] for impl in impls}
    try:
        with FakeServer(latency="zero") as server:
            for _ in range(args.reps):
                for impl in impls:
                    server.reset()
                    cpu = _measure(impl, server.url, jobs, args.count, args)
                    figures[impl].append(cpu / args.count * 1000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    batch = statistics.median(figures["batch"])
    many = statistics.median(figures["many"])
    ratio = batch / many
    command = " ".join(["python -m benchmarks.batch_cpu", *(argv or sys.argv[1:])])
    print(f"command: {command}")
    print(f"jobs={args.count} concurrency={args.concurrency} progress={args.progress}")
    print("| impl | CPU ms/job (median) | reps |")
    print("|---|---|---|")
    print(f"| apimart batch | {batch:.3f} | {', '.join(f'{x:.3f}' for x in figures['batch'])} |")
    print(f"| generate_many | {many:.3f} | {', '.join(f'{x:.3f}' for x in figures['many'])} |")
    if args.before:
        before = statistics.median(figures["before"])
        reps = ", ".join(f"{x:.3f}" for x in figures["before"])
        print(f"| apimart batch, before | {before:.3f} | {reps} |")
        print(f"before: batch / generate_many = {before / many:.2f}x")
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"batch / generate_many = {ratio:.2f}x (target <= {TARGET}x): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
