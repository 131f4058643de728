"""``FakeApimart``: the public face of the fake service.

A fake owns its state (tasks, uploads, idempotency keys, balance, webhook schedule,
counters, the request log) and one ASGI app over it, and can be reached two ways that
share that app:

- ``fake.transport()``: an httpx transport for ``AsyncApimart(transport=...)`` or
  ``httpx.AsyncClient(transport=...)``; no sockets, fast enough for thousands of
  pipelines in one unit test, works under asyncio and trio;
- ``async with fake.serve() as base_url``: uvicorn on loopback in a background thread
  (and ``python -m apimart_async.testing`` for another process), for benchmarks and
  demos. uvicorn is an optional extra, imported only here.

Webhook callbacks need something running to send them (the fake is otherwise lazy):
``async with fake.webhook_sender():`` runs a sender in the caller's task group, and
``serve()`` runs one in its server. With ``state_path=`` the state lives in a file, so
a fake re-created from it in a new process continues where the old one stopped.

What can go wrong: a fake is not thread-safe. Drive it from one event loop at a time
(in server mode, uvicorn's thread is that loop; reading ``stats`` from the test's
thread is fine, mutating state from both is not).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from ._app import FILES_PREFIX, App
from ._billing import to_usd
from ._options import Faults, Latency, Variants, Webhooks
from ._state import MODELS, UNKNOWN_MODEL, State
from ._transport import FakeTransport
from ._webhooks import open_sender

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Iterable, Mapping

    import httpx

    from ._billing import Balance
    from ._options import FaultsSpec, ScriptStep
    from ._state import FakeStats, FakeTask, RecordedRequest
    from ._webhooks import Rewrite, WebhookDelivery, WebhookSender

__all__ = ["DEFAULT_BASE_URL", "DEFAULT_FILES_BASE_URL", "FakeApimart", "files_origin"]

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

    Money (apimart-api.md §6.1, §7, §10):

    - *balance*: what the key has, in USD (default ``None``: an unlimited key, which
      balance reads report as ``remain_balance: -1``, ``unlimited_quota: true``). Each
      submit reserves its price x n; a submit the balance cannot cover is refused with
      402 ``payment_required`` / "insufficient balance"; a failed task is refunded
      when it fails (and reports ``cost: 0``).
    - *prices*: USD per image by model id, over the defaults in ``MODELS`` (unknown
      models accepted with *accept_unknown_models* cost 0.05 unless priced here).
    - *payment_required_on_reads*: also answer 402 to task queries, uploads and
      schema reads while a limited key has nothing left (observed on the real
      service); balance reads still answer.

    Webhooks and state:

    - *webhooks*: how callbacks are delivered (``Webhooks``: delay, drops,
      duplicates, retries). They are sent by ``webhook_sender()`` or ``serve()``.
    - *state_path*: a file that keeps tasks, uploads, idempotency keys, balance and
      finished callbacks across processes (see ``_persist``); an existing file is
      continued, and its balance wins over *balance*.

    Raises ``ValueError`` (or ``TypeError``) for a bad option, naming it.
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
        balance: float | None = None,
        prices: Mapping[str, float] | None = None,
        payment_required_on_reads: bool = False,
        webhooks: Webhooks | None = None,
        state_path: str | os.PathLike[str] | None = None,
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
            balance=balance,
            prices=prices,
            payment_required_on_reads=payment_required_on_reads,
            webhooks=webhooks,
            state_path=None if state_path is None else os.fspath(state_path),
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

    @property
    def webhooks(self) -> Webhooks:
        """How callbacks are delivered; assign to change it for callbacks scheduled from
        now on."""
        return self._state.webhooks

    @webhooks.setter
    def webhooks(self, value: Webhooks) -> None:
        self._state.webhooks = value

    @property
    def payment_required_on_reads(self) -> bool:
        """Whether reads answer 402 while a limited key has nothing left."""
        return self._state.payment_required_on_reads

    @payment_required_on_reads.setter
    def payment_required_on_reads(self, value: bool) -> None:
        self._state.payment_required_on_reads = value

    @property
    def state_path(self) -> str | None:
        """The state file, if the fake keeps one."""
        file = self._state.file
        return None if file is None else str(file.path)

    def script(self, endpoint: str, steps: Iterable[ScriptStep]) -> None:
        """Queue exact faults for the next requests on *endpoint*.

        *endpoint* is ``"upload"``, ``"submit"``, ``"poll"`` or ``"download"`` (one step
        per request, before any probabilistic fault), ``"balance"`` (balance reads), or
        ``"task"`` (one fate per created task). A step is a ``Fault`` or its name, an
        HTTP error status to answer with (``503``), or ``None`` for a normal answer.
        Calls append.

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
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        files_host: str | None = None,
        webhook_transport: httpx.AsyncBaseTransport | None = None,
        webhook_rewrite: Rewrite | None = None,
    ) -> AsyncGenerator[str]:
        """Serve this fake over real HTTP on *host*:*port* (0: any free port) with
        uvicorn in a background thread; yields the API base URL once listening.

        Unless *files_base_url* was given, upload and result URLs use *files_host*
        (default: ``localhost`` when *host* is ``127.0.0.1`` and vice versa), so they
        are another origin than the API and a client that sends its key there shows
        up in ``stats.file_requests_with_auth``. The server also sends webhook
        callbacks (over real HTTP, or *webhook_transport*, to URLs passed through
        *webhook_rewrite*; both used on the server's thread). Needs the ``server``
        extra (uvicorn).
        """
        from ._server import serve_in_thread

        state = self._state
        previous = (self._base_url, state.files_base_url)
        state.webhook_transport, state.webhook_rewrite = webhook_transport, webhook_rewrite
        try:
            async with serve_in_thread(self.app, host, port) as (api_url, port_bound):
                self._base_url = api_url
                if not self._files_explicit:
                    state.files_base_url = files_origin(host, port_bound, files_host)
                try:
                    yield api_url
                finally:
                    self._base_url, state.files_base_url = previous
        finally:
            state.webhook_transport = state.webhook_rewrite = None

    @contextlib.asynccontextmanager
    async def webhook_sender(
        self,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        rewrite: Rewrite | None = None,
    ) -> AsyncGenerator[WebhookSender]:
        """Send webhook callbacks while the block runs, in a task group of the caller's.

        Callbacks go over real HTTP (httpx), or through *transport* (e.g.
        ``httpx.ASGITransport(app=receiver)`` for an in-process receiver), to each
        callback URL passed through *rewrite* (a function, or a mapping of URL
        prefixes to replacements, e.g. a "public" URL to a loopback listener).
        Callbacks due while no sender runs wait for the next one. Yields the
        ``WebhookSender``; ``await sender.drain()`` waits until every scheduled
        attempt is over.

        Raises ``RuntimeError`` if a sender already runs for this fake (``serve()``
        runs one).
        """
        async with open_sender(
            self._state, self.app.task_payload, transport=transport, rewrite=rewrite
        ) as sender:
            yield sender

    def use_files_base_url(self, url: str) -> None:
        """Point upload and result URLs at *url* (used by the server CLI)."""
        self._state.files_base_url = url.rstrip("/")

    def use_webhook_target(
        self,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        rewrite: Rewrite | None = None,
    ) -> None:
        """Where a server running ``fake.app`` sends callbacks (used by the server CLI;
        ``serve()`` takes the same as arguments)."""
        self._state.webhook_transport, self._state.webhook_rewrite = transport, rewrite

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

    @property
    def balance(self) -> Balance:
        """The key's balance now: ``remaining`` USD (``None``: unlimited) and ``used``."""
        return self._state.balance()

    def set_balance(self, remaining: float | None) -> None:
        """Give the key *remaining* USD from now on (``None``: unlimited), e.g. a top-up
        before a rerun; what was used so far stays. Raises ``ValueError`` if negative."""
        self._state.set_balance(remaining)

    def price_of(self, model: str) -> float:
        """What one image of *model* costs here, in USD."""
        return to_usd(self._state.price_micro(model, MODELS.get(model, UNKNOWN_MODEL)))

    @property
    def webhook_deliveries(self) -> list[WebhookDelivery]:
        """Every callback attempt (and callback never attempted), in order (if recording)."""
        return self._state.dispatch.deliveries

    @property
    def pending_webhooks(self) -> int:
        """Callback attempts scheduled or under way."""
        return self._state.dispatch.pending

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this fake's state to *path* atomically; ``FakeApimart(state_path=path)``
        continues from it."""
        self._state.save(os.fspath(path))

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
        """Zero the counters and forget recorded requests and callback attempts (tasks,
        uploads and the balance stay)."""
        self._state.reset_stats()

    def reset(self) -> None:
        """Forget everything: counters, requests, tasks, uploads, keys, scripts and
        callbacks; the balance goes back to the constructor's (and the state file, if
        any, is emptied)."""
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
