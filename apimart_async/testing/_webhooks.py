"""Webhook callbacks from the fake: which URLs it accepts, when it calls, and the sender.

The service POSTs a finished task to ``<webhook>/callback`` (apimart-api.md §6.4).
The fake mirrors that in two parts:

- ``Dispatch`` (no I/O, one per fake): decides at submit time what happens to a
  task's callback (refused URL, dropped, or due at the task's end plus a delay) and
  keeps the schedule of attempts and the record of every attempt. Because task
  timelines are fixed at creation, the first attempt's time is known at once.
- ``WebhookSender`` (the I/O): while it runs, it sleeps until the next attempt is
  due, POSTs the task-query body with httpx (real HTTP, or a transport the test
  gives, such as ``httpx.ASGITransport(app=receiver)``), and reschedules retries.
  The fake is lazily driven (nothing runs in the background), so someone has to run
  a sender: ``async with fake.webhook_sender():`` in the caller's task group, or
  ``fake.serve()``, whose server runs one in its lifespan.

Only one sender runs per fake at a time (a second is a ``RuntimeError``), so a callback
is never sent twice by accident; a sender that stops puts its in-flight attempts back
on the schedule, so the next sender sends them.

What can go wrong: nothing the receiver does can break the sender (an exception from
an in-process receiver counts as "no 2xx answer", like a crash behind a real URL). The
sender sends no credentials: callbacks carry no Authorization header (§6.4: no
signature). The schedule is not thread-safe: run the sender on the event loop that
runs the app (``serve()`` does).
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.lowlevel
import httpx

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from ._state import State
    from ._task import FakeTask

__all__ = [
    "APIMART_DOMAINS",
    "DeliveryResult",
    "Dispatch",
    "Rewrite",
    "WebhookDelivery",
    "WebhookSender",
    "callback_url",
    "open_sender",
    "payload_bytes",
]

# §6.4 "not an APIMart domain": the service's own hosts and its documented mirrors (§1).
APIMART_DOMAINS = ("apimart.ai", "apimart.asia", "apib.ai", "aiuxu.com", "aishuch.com")
USER_AGENT = "apimart-async-fake-webhook/1"
MAX_CONCURRENT_DELIVERIES = 64
# A hold of a submit answer for ``Webhooks.callback_first`` never lasts longer than the
# task, the delay and one attempt's timeout, plus this margin (real seconds).
_HOLD_MARGIN = 5.0

DeliveryResult = Literal["delivered", "retry", "rejected", "exhausted", "dropped", "refused"]
"""What became of one attempt: ``delivered`` (2xx), ``retry`` (no 2xx; another attempt
is scheduled), ``rejected`` (a 4xx: the service gives up), ``exhausted`` (no 2xx and
no retry left), or, for callbacks never attempted, ``dropped`` (``Webhooks.drop``) and
``refused`` (a URL the service does not call)."""

Rewrite = Callable[[str], str] | Mapping[str, str]
"""Where a callback really goes: a function of the callback URL, or a mapping of URL
prefixes to replacements (e.g. ``{"https://hooks.example.com": "http://127.0.0.1:8080"}``),
so a "public" webhook URL can reach a loopback listener in tests and the CLI."""


def callback_url(webhook: str) -> str | None:
    """``<webhook>/callback`` (trailing slash normalised), or ``None`` for a URL the
    service refuses (§6.4): not http(s), a port other than 80/443, an APIMart domain,
    or a host that is not public (``localhost``, loopback or private addresses)."""
    try:
        parts = urlsplit(webhook.strip())
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").rstrip(".").lower()
    if parts.scheme.lower() not in ("http", "https") or not host:
        return None
    if port not in (None, 80, 443) or parts.username is not None:
        return None
    if any(host == d or host.endswith("." + d) for d in APIMART_DOMAINS):
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and not address.is_global:
        return None
    path = parts.path.rstrip("/") + "/callback"
    return urlunsplit((parts.scheme.lower(), parts.netloc, path, parts.query, ""))


@dataclass(slots=True)
class WebhookDelivery:
    """One attempt to deliver a callback (or the decision never to attempt it).

    *url* is the callback URL the service derived from the submit's ``webhook``;
    *target* where the attempt really went (after a rewrite; ``None`` if it never
    left). *attempt* counts from 1 (0 for ``dropped``/``refused``); *duplicate* marks
    the second send of an already delivered callback. *status* is the receiver's
    HTTP status (``None``: no answer), *error* why there was none, *at* the fake's
    clock when the attempt ended.
    """

    task_id: str
    url: str
    attempt: int
    result: DeliveryResult
    status: int | None = None
    target: str | None = None
    error: str | None = None
    duplicate: bool = False
    at: float = 0.0


@dataclass(order=True, slots=True)
class _Attempt:
    due: float
    seq: int
    task_id: str = field(compare=False)
    url: str = field(compare=False)
    number: int = field(compare=False)
    duplicate: bool = field(compare=False, default=False)


class Dispatch:
    """The schedule and record of one fake's callbacks (see the module docstring)."""

    def __init__(self, state: State) -> None:
        self._state = state
        self._heap: list[_Attempt] = []
        self._seq = 0
        self.in_flight = 0
        self.deliveries: list[WebhookDelivery] = []
        self._wake: anyio.Event | None = None
        self._idle: list[anyio.Event] = []
        self._first: dict[str, anyio.Event] = {}
        self._awaiting_first: set[str] = set()
        self._running = threading.Lock()

    # -- scheduling (called by the state, on the app's loop) -----------------------

    @property
    def pending(self) -> int:
        """Attempts scheduled or under way."""
        return len(self._heap) + self.in_flight

    def schedule(self, task: FakeTask) -> None:
        """Decide the fate of *task*'s callback (called once it exists)."""
        if task.webhook is None:
            return
        state = self._state
        stats = state.stats
        url = callback_url(task.webhook)
        now = state.clock()
        if url is None:
            stats.webhooks_refused += 1
            self._note(WebhookDelivery(task.id, task.webhook, 0, "refused", at=now))
            state.webhook_finished(task)
            return
        if not task.terminal:
            return  # stuck forever: the service calls back for terminal states only
        options = state.webhooks
        if options.drop and state.rng.random() < options.drop:
            stats.webhooks_dropped += 1
            self._note(WebhookDelivery(task.id, url, 0, "dropped", at=now))
            state.webhook_finished(task)
            return
        due = task.completes_at + options.delay * state.latency.time_scale
        self._push(due, task.id, url, 1)

    def hold_for(self, task: FakeTask) -> tuple[anyio.Event, float] | None:
        """For ``Webhooks.callback_first``: an event set when *task*'s first attempt
        is over, and how long at most to wait for it; ``None`` if nothing will come
        (no callback scheduled, or no sender running to send it)."""
        if not self._running.locked() or task.id not in self._awaiting_first:
            return None
        event = self._first.setdefault(task.id, anyio.Event())
        state = self._state
        bound = (
            task.real_duration
            + state.webhooks.delay * state.latency.time_scale
            + state.webhooks.timeout
            + _HOLD_MARGIN
        )
        return event, bound

    def clear(self) -> None:
        """Forget the schedule and the record (``FakeApimart.reset``)."""
        self._heap.clear()
        self.deliveries.clear()
        self._awaiting_first.clear()
        self._release_waiters()

    # -- used by the sender --------------------------------------------------------

    def claim(self) -> bool:
        """Become the one running sender; False if another runs already."""
        return self._running.acquire(blocking=False)

    def release(self) -> None:
        self._wake = None
        self._running.release()

    def arm(self) -> anyio.Event:
        """A fresh event that the next scheduling change sets."""
        self._wake = anyio.Event()
        return self._wake

    def next_due(self) -> float | None:
        return self._heap[0].due if self._heap else None

    def pop_due(self, now: float) -> list[_Attempt]:
        due: list[_Attempt] = []
        while self._heap and self._heap[0].due <= now:
            due.append(heapq.heappop(self._heap))
        self.in_flight += len(due)
        return due

    def requeue(self, attempt: _Attempt) -> None:
        """Put back an attempt its sender could not finish (the sender stopped)."""
        self.in_flight -= 1
        heapq.heappush(self._heap, attempt)

    def finish(self, attempt: _Attempt, record: WebhookDelivery, retry_at: float | None) -> None:
        """Record an attempt's end; schedule its retry if any."""
        self.in_flight -= 1
        self._note(record)
        if retry_at is not None:
            self._push(retry_at, attempt.task_id, attempt.url, attempt.number + 1)
        if attempt.number == 1 and not attempt.duplicate:
            self._awaiting_first.discard(attempt.task_id)
            event = self._first.pop(attempt.task_id, None)
            if event is not None:
                event.set()
        if not self.pending:
            self._release_waiters()

    def send_duplicate(self, attempt: _Attempt, at: float) -> None:
        self._seq += 1
        heapq.heappush(
            self._heap, _Attempt(at, self._seq, attempt.task_id, attempt.url, attempt.number, True)
        )
        self._poke()

    async def wait_idle(self) -> None:
        """Return once nothing is scheduled or under way."""
        while self.pending:
            event = anyio.Event()
            self._idle.append(event)
            await event.wait()

    # -- internals -----------------------------------------------------------------

    def _push(self, due: float, task_id: str, url: str, number: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, _Attempt(due, self._seq, task_id, url, number))
        if number == 1:
            self._awaiting_first.add(task_id)
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _note(self, record: WebhookDelivery) -> None:
        if self._state.record_requests:
            self.deliveries.append(record)

    def _release_waiters(self) -> None:
        waiters, self._idle = self._idle, []
        for event in waiters:
            event.set()
        firsts, self._first = self._first, {}
        for event in firsts.values():
            event.set()


def _rewriter(rewrite: Rewrite | None) -> Callable[[str], str]:
    if rewrite is None:
        return lambda url: url
    if callable(rewrite):
        return rewrite
    # Longest prefix first, so a specific mapping wins over a general one.
    pairs = sorted(rewrite.items(), key=lambda kv: len(kv[0]), reverse=True)

    def by_prefix(url: str) -> str:
        for prefix, replacement in pairs:
            if url.startswith(prefix):
                return replacement + url[len(prefix) :]
        return url

    return by_prefix


class WebhookSender:
    """Sends due callbacks while its ``fake.webhook_sender()`` block runs.

    ``await sender.drain()`` returns once every scheduled attempt (retries included)
    is over, so a test can assert on ``fake.webhook_deliveries`` without sleeping.
    """

    def __init__(
        self,
        state: State,
        payload: Callable[[FakeTask], bytes],
        http: httpx.AsyncClient,
        rewrite: Callable[[str], str],
    ) -> None:
        self._state = state
        self._dispatch = state.dispatch
        self._payload = payload
        self._http = http
        self._rewrite = rewrite
        self._limiter = anyio.CapacityLimiter(MAX_CONCURRENT_DELIVERIES)
        # A clock that is not the real one (a ManualClock) moves without telling us:
        # look again often instead of sleeping until the next due time.
        self._max_sleep = math.inf if state.clock is time.monotonic else 0.01

    @property
    def pending(self) -> int:
        """Attempts scheduled or under way."""
        return self._dispatch.pending

    async def drain(self) -> None:
        """Wait until every scheduled attempt, retries included, is over."""
        await self._dispatch.wait_idle()

    async def run(self) -> None:
        """Deliver forever (until cancelled)."""
        dispatch = self._dispatch
        clock = self._state.clock
        async with anyio.create_task_group() as tg:
            while True:
                wake = dispatch.arm()
                for attempt in dispatch.pop_due(clock()):
                    tg.start_soon(self._deliver, attempt)
                next_due = dispatch.next_due()
                wait = self._max_sleep if next_due is None else next_due - clock()
                wait = min(wait, self._max_sleep)
                if wait > 0:
                    with anyio.move_on_after(wait):
                        await wake.wait()
                else:
                    await anyio.lowlevel.checkpoint()

    async def _deliver(self, attempt: _Attempt) -> None:
        try:
            async with self._limiter:
                record, retry_at = await self._attempt(attempt)
        except anyio.get_cancelled_exc_class():
            self._dispatch.requeue(attempt)
            raise
        self._dispatch.finish(attempt, record, retry_at)

    async def _attempt(self, attempt: _Attempt) -> tuple[WebhookDelivery, float | None]:
        state = self._state
        options = state.webhooks
        task = state.tasks.get(attempt.task_id)
        record = WebhookDelivery(
            attempt.task_id, attempt.url, attempt.number, "retry", duplicate=attempt.duplicate
        )
        stats = state.stats
        stats.webhook_attempts += 1
        if task is None:  # forgotten by reset(): nothing to send
            record.result, record.error, record.at = "exhausted", "task forgotten", state.clock()
            return record, None
        if attempt.number <= options.failures and not attempt.duplicate:
            record.error = "lost on the way (Webhooks.failures)"
        else:
            record.target = self._rewrite(attempt.url)
            record.status, record.error = await self._post(record.target, self._payload(task))
        now = record.at = state.clock()
        status = record.status
        if status is not None and 200 <= status < 300:
            record.result = "delivered"
            if attempt.duplicate:
                stats.webhook_duplicates += 1
            else:
                stats.webhooks_delivered += 1
                task.delivered_at = now
                state.webhook_finished(task)
                if options.duplicate and state.rng.random() < options.duplicate:
                    self._dispatch.send_duplicate(attempt, now)
            return record, None
        if attempt.duplicate:
            record.result = "exhausted"  # a duplicate is never retried
            return record, None
        if status is not None and 400 <= status < 500:
            record.result = "rejected"
        elif attempt.number < options.max_attempts:
            delay = options.retry_delays[attempt.number - 1] * state.latency.time_scale
            return record, now + delay
        else:
            record.result = "exhausted"
        stats.webhooks_gave_up += 1
        state.webhook_finished(task)
        return record, None

    async def _post(self, target: str, body: bytes) -> tuple[int | None, str | None]:
        timeout = self._state.webhooks.timeout
        try:
            with anyio.fail_after(timeout):
                response = await self._http.post(
                    target,
                    content=body,
                    headers={"content-type": "application/json", "user-agent": USER_AGENT},
                )
        except TimeoutError:
            return None, f"no answer within {timeout:g}s"
        # Deliberately broad: whatever the receiver does (refuse the connection, crash
        # in process, send garbage) is "no 2xx answer" to the service, never our crash.
        except Exception as exc:  # noqa: BLE001
            return None, f"{type(exc).__name__}: {exc}"
        return response.status_code, None


@contextlib.asynccontextmanager
async def open_sender(
    state: State,
    payload: Callable[[FakeTask], bytes],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    rewrite: Rewrite | None = None,
) -> AsyncGenerator[WebhookSender]:
    """Run a ``WebhookSender`` for *state* in a task group of the caller's.

    Raises ``RuntimeError`` if another sender already runs for this fake.
    """
    dispatch = state.dispatch
    if not dispatch.claim():
        raise RuntimeError(
            "a webhook sender already runs for this fake (fake.serve() runs its own)"
        )
    try:
        async with (
            httpx.AsyncClient(transport=transport, trust_env=False, timeout=None) as http,
            anyio.create_task_group() as tg,
        ):
            sender = WebhookSender(state, payload, http, _rewriter(rewrite))
            tg.start_soon(sender.run)
            try:
                yield sender
            finally:
                tg.cancel_scope.cancel()
    finally:
        dispatch.release()


def payload_bytes(body: object) -> bytes:
    """JSON bytes of a callback body, compact like the service's answers."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
