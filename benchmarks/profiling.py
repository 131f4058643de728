"""Where a client's CPU goes: ``python -m benchmarks.profiling [--impl apimart] [-c 200]``.

Starts the fake (zero latency), runs one overhead worker and breaks its CPU down by
layer. With ``py-spy`` installed (``pip install py-spy``) the worker is sampled
undisturbed and every sample inside the event loop is attributed to the layers on its
stack (a sample counts for every layer it passes through, so the inclusive figures
overlap) and to the package of its innermost frame (self time, adding up to 100%).
Without py-spy, cProfile runs around the measured section only (``--profile``), which
inflates pure-Python code, and the top cumulative entries are printed.
"""

from __future__ import annotations

import argparse
import collections
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .fakeserver import FakeServer

# Layers worth a line each, matched against py-spy frame strings "func (file:line)".
LAYERS: dict[str, str] = {
    "apimart_async (anything)": r"apimart_async/",
    "  HttpCore.request_json (one attempt, all inside)": r"HttpCore\.request_json ",
    "    AiohttpTransport.exchange (the API fast path, incl. aiohttp)": (
        r"AiohttpTransport\.exchange "
    ),
    "    over httpx (borrowed client or httpx's own pool)": r"_over_httpx|AsyncClient\.send ",
    "  stamina retry wrapper (only after a first failure)": r"stamina/",
    "  anyio cancel scopes (deadlines, submit shield)": r"CancelScope",
    "  anyio semaphores (client limits, job slots)": r"Semaphore\.acquire|Semaphore\.release",
    "  models.parse_request / with_image_urls": r"apimart_async/models",
    "  parse_task / parse_submit / parse_upload": r"parse_task |parse_submit |parse_upload ",
    "  prepare_image (sniff, sha256)": r"prepare_image ",
    "  UploadCache.get_or_upload (incl. the upload)": r"UploadCache\.get_or_upload ",
    "  PollSchedule": r"PollSchedule",
    "  generate_many starters (incl. upload, submit, a due poll)": r"Pipeline\._starter ",
    "  generate_many poll workers (incl. their polls)": r"Pipeline\._poll_worker ",
    "pydantic (anything)": r"pydantic",
    "json (anything)": r"json/",
    "aiohttp (anything)": r"aiohttp/",
    "httpx (anything)": r"httpx/",
}
PACKAGES = (
    "apimart_async",
    "httpx_aiohttp",
    "httpx",
    "httpcore",
    "h11",
    "aiohttp",
    "multidict",
    "yarl",
    "pydantic_core",
    "pydantic",
    "stamina",
    "tenacity",
    "anyio",
    "sniffio",
    "asyncio",
    "benchmarks",
    "json",
    "urllib",
    "email",
    "http",
    "contextlib",
    "random",
    "uuid",
    "inspect",
)
# Frames of start-up work that happens inside the loop but outside the measurement.
_SETUP = re.compile(r"<module>|^png \(|^build \(|listcomp|warmup|prepare \(")


def _package(frame: str) -> str:
    match = re.search(r"\((.*?)(?::\d+)?\)$", frame)
    path = match.group(1) if match else frame
    for name in PACKAGES:
        if f"/{name}/" in path or path.startswith(f"{name}/") or path.endswith(f"/{name}.py"):
            return name
    return path.rsplit("/", 1)[-1]


def _function(frame: str) -> str:
    """``func (path:line)`` as ``func (package/module.py)``: one entry per function."""
    match = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    name, path = match.groups()
    parts = path.split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


def summarize_pyspy(raw: Path, top: int = 15) -> None:
    """Print the layer and self-time breakdown of a py-spy ``--format raw`` file, and
    the *top* functions by own time (the innermost frame of each sample)."""
    layers: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        loop = next((i for i, f in enumerate(frames) if "_run_once" in f), None)
        if loop is None or any(_SETUP.search(f) for f in frames[loop:]):
            continue
        n = int(count)
        total += n
        own[_package(frames[-1])] += n
        functions[_function(frames[-1])] += n
        for name, pattern in LAYERS.items():
            if any(re.search(pattern, f) for f in frames):
                layers[name] += n
    if not total:
        print("no samples inside the event loop")
        return
    print(f"\n{total} samples inside the event loop (setup and warm-up excluded)")
    print("\ninclusive (share of samples with the layer on the stack):")
    for name in LAYERS:
        print(f"  {100 * layers[name] / total:5.1f}%  {name}")
    print("\nself time by package of the innermost frame:")
    for name, n in own.most_common(15):
        print(f"  {100 * n / total:5.1f}%  {name}")
    if top:
        print(f"\ntop {top} functions by own time (innermost frame):")
        for name, n in functions.most_common(top):
            print(f"  {100 * n / total:5.1f}%  {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profiling", description=__doc__)
    p.add_argument("--impl", default="apimart")
    p.add_argument("-c", "--concurrency", type=int, default=200)
    p.add_argument("-n", "--pipelines", type=int, default=4000)
    p.add_argument(
        "--pool", type=int, default=None, help="connection pool (default: min(concurrency, 100))"
    )
    p.add_argument("--top", type=int, default=15, help="functions to list by own time")
    p.add_argument("--keep", type=Path, help="also keep the raw profile at this path")
    p.add_argument("--cprofile", action="store_true", help="use cProfile even if py-spy exists")
    args = p.parse_args(argv)
    beside = Path(sys.executable).parent / "py-spy"  # installed into this venv
    pyspy = None if args.cprofile else (str(beside) if beside.exists() else shutil.which("py-spy"))
    with FakeServer(latency="zero") as fake, tempfile.TemporaryDirectory() as tmp:
        worker = [sys.executable, "-m", "benchmarks.worker", "--impl", args.impl]
        worker += ["--base-url", fake.url, "--pipelines", str(args.pipelines)]
        worker += ["--concurrency", str(args.concurrency)]
        if args.pool is not None:
            worker += ["--pool", str(args.pool)]
        out = args.keep or Path(tmp) / "profile"
        if pyspy:
            cmd = [pyspy, "record", "--format", "raw", "-r", "500", "-o", str(out), "--"]
            subprocess.run([*cmd, *worker], check=True, capture_output=True)
            summarize_pyspy(out, args.top)
        else:
            subprocess.run([*worker, "--profile", str(out)], check=True, capture_output=True)
            stats = pstats.Stats(str(out))
            stats.sort_stats("cumulative").print_stats(r"apimart_async|httpx|stamina", 40)
            if args.top:
                stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
