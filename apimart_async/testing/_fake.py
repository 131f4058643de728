"""``FakeApimart``: the public face of the fake service.

A fake owns its state (tasks, uploads, idempotency keys, counters, the request log)
and one ASGI app over it, and can be reached two ways that share that app:

- ``fake.transport()``: an httpx transport for ``AsyncApimart(transport=...)`` or
  ``httpx.AsyncClient(transport=...)``; no sockets, fast enough for thousands of
  pipelines in one unit test, works under asyncio and trio;
- ``async with fake.serve() as base_url``: uvicorn on loopback in a background thread
  (and ``python -m apimart_async.testing`` for another process), for benchmarks and
  demos. uvicorn is an optional extra, imported only here.

What can go wrong: a fake is not thread-safe. Drive it from one event loop at a time
(in server mode, uvicorn's thread is that loop; reading ``stats`` from the test's
thread is fine, mutating state from both is not).
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from ._app import FILES_PREFIX, App
from ._options import Faults, Latency, Variants
from ._state import State
from ._transport import FakeTransport

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Iterable, Mapping

    from ._options import FaultsSpec, ScriptStep
    from ._state import FakeStats, FakeTask, RecordedRequest

__all__ = ["DEFAULT_BASE_URL", "DEFAULT_FILES_BASE_URL", "FakeApimart"]

DEFAULT_BASE_URL = "https://api.apimart.ai"
DEFAULT_FILES_BASE_URL = "https://upload.apimart.ai"


class FakeApimart:
    """An in-memory APIMart image service: uploads, submits, task polling, file GETs.

    Everything is keyword-only:

    - *api_key*: the only Bearer token accepted on ``/v1/*`` (401 otherwise).
    - *latency*: task durations and request latency (default ``Latency.fast()``:
      a pipeline completes in milliseconds); *time_scale* overrides its scale.
    - *faults*: a ``Faults`` (or a mapping endpoint -> ``Faults``) of probabilities;
      ``script()`` queues exact faults ahead of them.
    - *variants*: which documented response shapes to send (``Variants``).
    - *honour_idempotency*: ``False`` makes every submit create a task even when its
      ``Idempotency-Key`` was seen before, so tests can prove a client never relies
      on the key to avoid paying twice.
    - *accept_unknown_models*: accept model ids outside the documented list.
    - *seed*: seeds the fake's ``random.Random`` (ids, durations, fault draws).
    - *record_requests*: keep ``requests`` (the counters in ``stats`` are always kept).
    - *store_uploads*: keep uploaded bytes to serve them back (``False`` serves a tiny
      PNG instead, to bound memory in long benchmarks).
    - *base_url* / *files_base_url*: the API origin, and the origin of the upload and
      result URLs handed out (in server mode, a different loopback origin by default).
    - *clock*: a monotonic clock for task phases (e.g. a ``ManualClock``).
    """

    def __init__(
        self,
        *,
        api_key: str = "test",
        latency: Latency | None = None,
        faults: FaultsSpec | None = None,
        variants: Variants | None = None,
        honour_idempotency: bool = True,
        accept_unknown_models: bool = False,
        seed: int | None = 0,
        time_scale: float | None = None,
        record_requests: bool = True,
        store_uploads: bool = True,
        base_url: str = DEFAULT_BASE_URL,
        files_base_url: str | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        latency = latency if latency is not None else Latency.fast()
        if time_scale is not None:
            latency = latency.scaled(time_scale)
        self._base_url = base_url.rstrip("/")
        self._files_explicit = files_base_url is not None
        self._state = State(
            api_key=api_key,
            latency=latency,
            faults=faults if faults is not None else Faults(),
            variants=variants if variants is not None else Variants(),
            honour_idempotency=honour_idempotency,
            accept_unknown_models=accept_unknown_models,
            record_requests=record_requests,
            store_uploads=store_uploads,
            seed=seed,
            clock=clock if clock is not None else time.monotonic,
            files_base_url=files_base_url or DEFAULT_FILES_BASE_URL,
            rng=random.Random(seed),
        )
        self.app: App = App(self._state)
        """The raw ASGI 3 application (serve it with any ASGI server)."""

    def __repr__(self) -> str:
        s = self._state.stats
        return (
            f"<FakeApimart {self._base_url} latency={self._state.latency.name} "
            f"tasks={len(self._state.tasks)} requests={s.requests_total}>"
        )

    # -- configuration --------------------------------------------------------------

    @property
    def api_key(self) -> str:
        """The accepted API key."""
        return self._state.api_key

    @property
    def base_url(self) -> str:
        """The API origin clients should use (the loopback URL while serving)."""
        return self._base_url

    @property
    def files_base_url(self) -> str:
        """The origin of upload and result URLs handed out."""
        return self._state.files_base_url

    @property
    def latency(self) -> Latency:
        """The latency profile; assign to change it for tasks created from now on."""
        return self._state.latency

    @latency.setter
    def latency(self, value: Latency) -> None:
        self._state.latency = value

    @property
    def faults(self) -> FaultsSpec:
        """The fault probabilities; assign (e.g. ``Faults()``) to change them mid-test."""
        return self._state.faults_spec

    @faults.setter
    def faults(self, value: FaultsSpec) -> None:
        self._state.set_faults(value)

    @property
    def variants(self) -> Variants:
        """The response shapes; assign to change them mid-test."""
        return self._state.variants

    @variants.setter
    def variants(self, value: Variants) -> None:
        self._state.variants = value

    @property
    def honour_idempotency(self) -> bool:
        """Whether ``Idempotency-Key`` replays and 409s are in force."""
        return self._state.honour_idempotency

    @honour_idempotency.setter
    def honour_idempotency(self, value: bool) -> None:
        self._state.honour_idempotency = value

    def script(self, endpoint: str, steps: Iterable[ScriptStep]) -> None:
        """Queue exact faults for the next requests on *endpoint*.

        *endpoint* is ``"upload"``, ``"submit"``, ``"poll"`` or ``"download"`` (one step
        per request, before any probabilistic fault), or ``"task"`` (one fate per
        created task). A step is a ``Fault`` or its name, an HTTP error status to
        answer with (``503``), or ``None`` for a normal answer. Calls append.

        >>> fake.script("submit", ["reset", None, "rate_limit"])  # doctest: +SKIP
        """
        self._state.add_script(endpoint, steps)

    def pending_script(self, endpoint: str) -> int:
        """How many scripted steps are still queued for *endpoint*."""
        return len(self._state.scripts.get(endpoint, ()))

    def clear_scripts(self) -> None:
        """Drop every queued scripted step."""
        self._state.scripts.clear()

    # -- running --------------------------------------------------------------------

    def transport(self) -> FakeTransport:
        """An httpx async transport into this fake (no sockets; asyncio and trio)."""
        return FakeTransport(self.app)

    @contextlib.asynccontextmanager
    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, files_host: str | None = None
    ) -> AsyncGenerator[str]:
        """Serve this fake over real HTTP on *host*:*port* (0: any free port) with
        uvicorn in a background thread; yields the API base URL once listening.

        Unless *files_base_url* was given, upload and result URLs use *files_host*
        (default: ``localhost`` when *host* is ``127.0.0.1`` and vice versa), so they
        are another origin than the API and a client that sends its key there shows
        up in ``stats.file_requests_with_auth``. Needs the ``server`` extra (uvicorn).
        """
        from ._server import serve_in_thread

        previous = (self._base_url, self._state.files_base_url)
        async with serve_in_thread(self.app, host, port) as (api_url, port_bound):
            self._base_url = api_url
            if not self._files_explicit:
                self._state.files_base_url = files_origin(host, port_bound, files_host)
            try:
                yield api_url
            finally:
                self._base_url, self._state.files_base_url = previous

    def use_files_base_url(self, url: str) -> None:
        """Point upload and result URLs at *url* (used by the server CLI)."""
        self._state.files_base_url = url.rstrip("/")

    # -- observing ------------------------------------------------------------------

    @property
    def stats(self) -> FakeStats:
        """The counters (uploads, submits, tasks_created, polls, max_in_flight, ...)."""
        return self._state.stats

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request seen since the last reset, in arrival order (if recording)."""
        return self._state.requests

    @property
    def tasks(self) -> Mapping[str, FakeTask]:
        """Every task created, by id."""
        return self._state.tasks

    def task(self, task_id: str) -> FakeTask:
        """The task *task_id* (``KeyError`` if unknown)."""
        return self._state.tasks[task_id]

    def status_of(self, task_id: str, *, now: float | None = None) -> str:
        """The status a poll of *task_id* would report at clock time *now*."""
        state = self._state
        task = state.tasks[task_id]
        at = state.clock() if now is None else now
        return task.phase(at, state.variants, state.task_faults.unknown_status)[0]

    def duplicate_keys(self) -> list[str]:
        """Idempotency keys under which more than one task was created."""
        return self._state.stats.duplicate_keys()

    def stored_upload(self, url: str) -> bytes | None:
        """The bytes stored for an upload URL this fake handed out, or ``None``."""
        path = unquote(urlsplit(url).path)
        if not path.startswith(FILES_PREFIX):
            return None
        stored = self._state.uploads.get(path[len(FILES_PREFIX) :])
        return None if stored is None else stored.data

    def snapshot(self, *, include_tasks: bool = True) -> dict[str, Any]:
        """The JSON served at ``GET /_fake/stats``: counters, task summary, tasks."""
        return self._state.snapshot(include_tasks=include_tasks)

    def reset_stats(self) -> None:
        """Zero the counters and forget recorded requests (tasks and uploads stay)."""
        self._state.reset_stats()

    def reset(self) -> None:
        """Forget everything: counters, requests, tasks, uploads, keys and scripts."""
        self._state.reset()


def files_origin(host: str, port: int, files_host: str | None) -> str:
    """The file origin for a server on *host*:*port*: another name for loopback."""
    if files_host is None:
        files_host = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}.get(host, host)
        if files_host in ("0.0.0.0", "", "::"):
            files_host = "localhost"
    if ":" in files_host:
        files_host = f"[{files_host}]"
    return f"http://{files_host}:{port}"
