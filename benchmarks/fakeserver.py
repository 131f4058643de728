"""FakeApimart as a real HTTP server in its own process, for the runner.

``python -m apimart_async.testing --port 0 ...`` prints ``APIMART_FAKE_URL=...`` once it
listens; we read that line, then keep draining its output in a thread so a chatty
server can never block on a full pipe. The fake's own CPU time is read from
``/proc/<pid>/stat`` around each worker run: it shares the two cores with the client
being measured, so the tables report it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from typing_extensions import Self

from .runs import REPO

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["FakeServer"]

_TICKS = os.sysconf("SC_CLK_TCK")


class FakeServer:
    """Start, query and stop one fake server process (a context manager)."""

    def __init__(
        self,
        *,
        latency: str = "zero",
        time_scale: float | None = None,
        seed: int = 1,
        api_key: str = "test",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.latency = latency
        self.time_scale = time_scale
        self.seed = seed
        self.api_key = api_key
        self.extra_args = tuple(extra_args)  # more ``python -m apimart_async.testing`` flags
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives with self

    def command(self) -> list[str]:
        """The exact command line of the server."""
        cmd = [sys.executable, "-m", "apimart_async.testing", "--host", "127.0.0.1"]
        cmd += ["--port", "0", "--api-key", self.api_key, "--latency", self.latency]
        cmd += ["--seed", str(self.seed)]
        if self.time_scale is not None:
            cmd += ["--time-scale", repr(self.time_scale)]
        return cmd + list(self.extra_args)

    def __enter__(self) -> Self:
        # From the repository root, like the workers: this checkout's apimart_async.
        self._proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO
        )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in self._proc.stdout:
            if line.startswith("APIMART_FAKE_URL="):
                self.url = line.strip().split("=", 1)[1]
                break
            if time.monotonic() > deadline:
                break
        if not self.url:
            self.__exit__()
            raise RuntimeError(f"the fake server did not start:\n{self.log()}")
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for _ in self._proc.stdout:
            pass

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def log(self) -> str:
        """What the server wrote on stderr (for error reports)."""
        self._log.seek(0)
        return self._log.read()[-4000:]

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self._proc is not None
        return self._proc.pid

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self._proc is not None and self._proc.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used so far."""
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def rss(self) -> int:
        """The server's resident set size in bytes."""
        with open(f"/proc/{self.pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _call(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(f"{self.url}{path}", method=method)
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read() or b"null")

    def reset(self) -> None:
        """Forget every task, upload and counter."""
        self._call("/_fake/reset?all=1", "POST")

    def stats(self, *, tasks: bool = False) -> dict[str, Any]:
        """``GET /_fake/stats`` (without the per-task table unless *tasks*)."""
        result: dict[str, Any] = self._call(f"/_fake/stats?tasks={int(tasks)}")
        return result
