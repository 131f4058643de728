"""4 shards against 1 process: ``apimart batch --shard K/4`` vs one ``apimart batch`` (issue 20).

    python -m benchmarks.shards                       # 20,000 jobs, realistic latency x0.01
    python -m benchmarks.shards --jobs 2000 --concurrency 64

One ``FakeApimart`` serves real HTTP from its own process with the realistic task
profile (lognormal around 15 s, clipped to 2-120 s) and request latency, both run 100
times faster (``--time-scale``), so a "15 s" task takes 0.15 s. The same batch file is
run twice on it, from an empty output folder each time:

* **1 process**: ``apimart batch JOBS --out A -c C --poll-rps R``;
* **4 shards**: four ``apimart batch JOBS --out B --shard K/4 -c C --poll-rps R``
  processes at once (``-c`` and ``--poll-rps`` are totals: each shard takes a quarter),
  then ``apimart merge B``.

Reported per run: wall time (first start to last exit, merge included), the client
processes' CPU (user + system, all of them), and the requests the fake served (total,
submits, task queries, file downloads), read from ``GET /_fake/stats``. Every job must
end done (the script checks ``results.jsonl``). Sharding is for durability and spread
over machines, not speed: on one machine the shards share the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .fakeserver import FakeServer

GEM = "gemini-3-pro-image-preview"
ROOT = Path(__file__).resolve().parents[1]


class _RealisticServer(FakeServer):
    """The fake with realistic task durations and request latency, both scaled."""

    def __init__(self, scale: float) -> None:
        super().__init__(latency="realistic", time_scale=scale)
        self.scale = scale

    def command(self) -> list[str]:
        """The fake's command line, with request latency (0.2-1.0 service seconds)."""
        low, high = 0.2 * self.scale, 1.0 * self.scale
        return [*super().command(), "--request-latency", f"{low},{high}", "--no-store-uploads"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _command(jobs: Path, out: Path, url: str, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "apimart_async.cli", "batch", str(jobs), "--out", str(out),
        "--base-url", url, "--time-scale", str(args.time_scale), "-c", str(args.concurrency),
        "--poll-rps", str(args.poll_rps), "--progress", "off",
    ]  # fmt: skip


def _run(cmds: list[list[str]]) -> tuple[float, list[int]]:
    env = {**os.environ, "APIMART_API_KEY": "test", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            cmd,
            cwd=tempfile.gettempdir(),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for cmd in cmds
    ]
    codes = []
    for proc in procs:
        _, err = proc.communicate()
        codes.append(proc.returncode)
        if proc.returncode != 0:
            sys.stderr.write(err.decode()[-2000:])
    return time.perf_counter() - start, codes


def _done(results: Path) -> int:
    return sum(json.loads(line)["status"] == "done" for line in results.read_text().splitlines())


def _measure(
    label: str, server: FakeServer, cmds: list[list[str]], results: Path, merge: list[str] | None
) -> dict[str, Any]:
    server.reset()
    cpu = _children_cpu()
    wall, codes = _run(cmds)
    if merge is not None:
        merge_wall, merge_codes = _run([merge])
        wall += merge_wall
        codes += merge_codes
    stats = server.stats()["stats"]
    return {
        "run": label,
        "wall_s": round(wall, 2),
        "client_cpu_s": round(_children_cpu() - cpu, 2),
        "exit": codes,
        "done": _done(results),
        "requests": stats["requests_total"],
        "submits": stats["submits"],
        "polls": stats["polls"],
        "downloads": stats["downloads"],
        "tasks_created": stats["tasks_created"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run both configurations and print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shards")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs (20000)")
    parser.add_argument("--shards", type=int, default=4, help="shards (4)")
    parser.add_argument("--concurrency", type=int, default=256, help="total jobs at once (256)")
    parser.add_argument("--poll-rps", type=float, default=4000.0, help="total polls/s (4000)")
    parser.add_argument("--time-scale", type=float, default=0.01, help="real s per service s")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    jobs = work / "jobs.jsonl"
    with jobs.open("w") as fh:
        for i in range(args.jobs):
            fh.write(json.dumps({"id": f"j{i}", "model": GEM, "prompt": f"picture {i}"}) + "\n")
    rows: list[dict[str, Any]] = []
    try:
        with _RealisticServer(args.time_scale) as server:
            one = work / "one"
            rows.append(
                _measure(
                    "1 process",
                    server,
                    [_command(jobs, one, server.url, args)],
                    one / "results.jsonl",
                    None,
                )
            )
            many = work / "sharded"
            cmds = [
                [*_command(jobs, many, server.url, args), "--shard", f"{k}/{args.shards}"]
                for k in range(args.shards)
            ]
            merge = [sys.executable, "-m", "apimart_async.cli", "merge", str(many)]
            rows.append(
                _measure(f"{args.shards} shards", server, cmds, many / "results.jsonl", merge)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("command: python -m benchmarks.shards " + " ".join(argv or sys.argv[1:]))
    print(
        f"jobs={args.jobs} concurrency={args.concurrency} (total) poll_rps={args.poll_rps} "
        f"(total) time_scale={args.time_scale} (realistic profile)"
    )
    print("| run | wall s | client CPU s | done | requests | submits | polls | downloads |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['wall_s']} | {r['client_cpu_s']} | {r['done']} | "
            f"{r['requests']} | {r['submits']} | {r['polls']} | {r['downloads']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
