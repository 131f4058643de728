"""What a worker measures about its own process: CPU, wall, RSS, open sockets.

* CPU is ``getrusage(RUSAGE_SELF)`` user + system, threads included (aiohttp resolves
  names in a worker thread; file reads go to threads too), taken around the measured
  section only, so interpreter start-up, imports and client construction are excluded.
* Current RSS comes from ``/proc/self/statm`` (resident pages); growth is the
  difference of two readings.
* Peak RSS is ``VmHWM`` from ``/proc/self/status`` after resetting the high-water mark
  (writing ``5`` to ``/proc/self/clear_refs``) at the start of the measured section, so
  it is the peak *of that section*; ``ru_maxrss`` (lifetime peak) is reported too.
* Cyclic GC: collections per generation and the time spent in them during the section.
* Open sockets are the entries of ``/proc/self/fd`` that link to ``socket:[...]``
  (asyncio's self-pipe is a socket pair, so an idle loop already holds two).
"""

from __future__ import annotations

import gc
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from typing_extensions import Self

__all__ = [
    "Meter",
    "SocketSampler",
    "count_sockets",
    "cpu_seconds",
    "peak_rss",
    "reset_peak_rss",
    "rss_now",
]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_now() -> int:
    """Resident set size now, in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """Peak RSS since the last ``reset_peak_rss`` (or process start), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_sockets() -> int:
    """Open file descriptors of this process that are sockets."""
    count = 0
    fd_dir = "/proc/self/fd"
    for name in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{name}").startswith("socket:"):
                count += 1
        except OSError:  # closed between listdir and readlink
            continue
    return count


class SocketSampler:
    """Samples the open-socket count every *interval* seconds in a daemon thread.

    Cheap (a directory listing a few times a second) and identical for every
    implementation, so its cost does not skew the comparison.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, count_sockets())

    def __enter__(self) -> Self:
        self.peak = count_sockets()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, count_sockets())


@dataclass
class Meter:
    """CPU, wall clock, RSS and cyclic-GC time around one measured section.

    The GC figures come from a ``gc.callbacks`` hook (it runs once per collection, so
    it costs nothing measurable): collections per generation and the time inside them.
    Garbage collection is where per-pipeline allocations turn into CPU that grows with
    the number of pipelines alive at once, so it is reported apart.
    """

    cpu: float = 0.0
    wall: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    rss_peak: int = 0
    _cpu0: float = 0.0
    _wall0: float = 0.0
    _gc0: float = 0.0
    gc_s: float = 0.0
    gc_collections: list[int] = field(default_factory=lambda: [0, 0, 0])

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc0 = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc0
            self.gc_collections[info["generation"]] += 1

    def start(self) -> None:
        """Take the baseline: current RSS, reset peak, CPU and wall readings."""
        self.rss_before = rss_now()
        reset_peak_rss()
        gc.callbacks.append(self._on_gc)
        self._wall0 = time.perf_counter()
        self._cpu0 = cpu_seconds()

    def stop(self) -> None:
        """Close the section."""
        self.cpu = cpu_seconds() - self._cpu0
        self.wall = time.perf_counter() - self._wall0
        gc.callbacks.remove(self._on_gc)
        self.rss_after = rss_now()
        self.rss_peak = peak_rss()

    def as_dict(self) -> dict[str, Any]:
        """The readings, JSON-ready."""
        return {
            "cpu_s": self.cpu,
            "wall_s": self.wall,
            "gc_s": self.gc_s,
            "gc_collections": self.gc_collections,
            "rss_before": self.rss_before,
            "rss_after": self.rss_after,
            "rss_peak": self.rss_peak,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
