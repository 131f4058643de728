"""A 1,000,000-line batch file: time to the first submit and memory (issue 14, item 5).

    python -m benchmarks.batch_stream                    # 1,000,000 lines, 20 s window
    python -m benchmarks.batch_stream --lines 200000 --before ../previous-checkout

``apimart batch`` runs as its own process against a zero-latency ``FakeApimart`` served
over HTTP. The parent starts it, polls the fake's counters every 10 ms until the first
submit arrives (time to first submit, measured from the moment the process was
started, interpreter start-up and imports included), samples the batch's RSS every
0.25 s for ``--window`` seconds of work, then sends SIGINT and times the clean stop
(which lists the lines not reached yet in ``results.jsonl``). Peak RSS is the kernel's
``VmHWM`` of the batch process just before the stop; the RSS samples show whether
memory grows with the jobs done. ``--before TREE`` runs the same measurement with
another source tree's ``apimart_async`` first, for a before/after row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .fakeserver import FakeServer

GEM = "gemini-3-pro-image-preview"
ROOT = Path(__file__).resolve().parents[1]


def _status(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _measure(tree: str, jobs: Path, server: FakeServer, window: float) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="bench-stream-out-"))
    env = {**os.environ, "APIMART_API_KEY": "test", "PYTHONPATH": tree}
    cmd = [
        sys.executable, "-m", "apimart_async.cli", "batch", str(jobs), "--out", str(out),
        "--base-url", server.url, "--time-scale", "0.001", "-c", "32",
        "--poll-rps", "100000", "--progress", "off",
    ]  # fmt: skip
    server.reset()
    start = time.perf_counter()
    # cwd: not a source tree, so that PYTHONPATH alone decides which code runs.
    proc = subprocess.Popen(
        cmd, cwd=out, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    first = None
    samples: list[tuple[float, int]] = []
    try:
        while first is None and proc.poll() is None:
            if server.stats()["stats"]["submits"] > 0:
                first = time.perf_counter() - start
                break
            time.sleep(0.01)
        began = time.perf_counter()
        while proc.poll() is None and time.perf_counter() - began < window:
            samples.append((round(time.perf_counter() - start, 1), _status(proc.pid, "VmRSS")))
            time.sleep(0.25)
        peak = _status(proc.pid, "VmHWM")
        done = server.stats()["stats"]["submits"]
        stop = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)
        stopped = time.perf_counter() - stop
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(out, ignore_errors=True)
    return {
        "tree": tree,
        "first_submit_s": None if first is None else round(first, 2),
        "peak_rss_mb": round(peak / 2**20, 1),
        "rss_mb_samples": [
            (t, round(r / 2**20, 1)) for t, r in samples[:: max(1, len(samples) // 8)]
        ],
        "submits_in_window": done,
        "stop_s": round(stopped, 2),
        "exit": proc.returncode,
        "stderr_tail": err.decode(errors="replace")[-300:] if proc.returncode not in (130,) else "",
    }


def main(argv: list[str] | None = None) -> int:
    """Measure (and compare) the time to first submit and memory of a huge batch file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch_stream")
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines (1000000)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of work (20)")
    parser.add_argument("--before", metavar="TREE", help="another source tree to measure first")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    jobs = work / "jobs.jsonl"
    with jobs.open("w") as fh:
        for i in range(args.lines):
            line = {"id": f"j{i}", "model": GEM, "prompt": f"a picture of thing number {i}"}
            fh.write(json.dumps(line) + "\n")
    rows = []
    try:
        with FakeServer(latency="zero") as server:
            for tree in [*([args.before] if args.before else []), str(ROOT)]:
                rows.append(_measure(tree, jobs, server, args.window))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("command: python -m benchmarks.batch_stream " + " ".join(argv or sys.argv[1:]))
    size = args.lines
    print(f"lines={size} window={args.window}s")
    print(
        "| tree | first submit s | peak RSS MB | submits in window | stop s | RSS samples (s, MB) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tree']} | {r['first_submit_s']} | {r['peak_rss_mb']} | "
            f"{r['submits_in_window']} | {r['stop_s']} | {r['rss_mb_samples']} |"
        )
        if r["stderr_tail"]:
            print(f"  exit {r['exit']}: {r['stderr_tail']!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
