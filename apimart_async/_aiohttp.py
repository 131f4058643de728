"""The seam over aiohttp, for asyncio (the ``fast`` extra).

aiohttp's client is several times cheaper per request than httpx's own pool under
concurrency, which is what the overhead benchmark measures. This module is imported
only when the transport is chosen, inside a running asyncio loop.

Why our own rather than ``httpx-aiohttp``: what decides whether a paid submit may be
retried is whether the request can have reached the server, and that package maps
``aiohttp.ClientConnectionError`` (which includes ``ServerDisconnectedError``, a
connection dropped *after* sending) to "connect timeout", i.e. "never sent". Failures
here go through ``_transport.network_error`` like every other transport's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from typing import TYPE_CHECKING

import aiohttp

from ._exceptions import APIConnectionError, APITimeoutError
from ._transport import (
    Exchange,
    Streamed,
    carries_request,
    check_declared,
    guarded,
    mapped,
    read_capped,
    request_deadline,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    import httpx

    from ._transport import Request

__all__ = ["AiohttpTransport"]

_AIOHTTP = (aiohttp.ClientError, asyncio.TimeoutError)
# aiohttp refuses malformed header values with a bare ValueError, before sending.
_REFUSED = ValueError
# aiohttp's own User-Agent, Accept and Accept-Encoding stay off downloads (a result
# host learns nothing about us; no compressed body is asked for).
_SKIP_AUTO = ("User-Agent", "Accept-Encoding", "Accept")
_MAX_TIMEOUTS = 64
_Timeouts = tuple[float | None, float | None, float | None, float | None]


class AiohttpTransport:
    """Sends requests through one lazily created ``aiohttp.ClientSession``.

    The session is created on first use, inside the running event loop (aiohttp
    requires one), with a connection limit of *max_connections*. Requests beyond the
    pool queue in ``_Slots`` here, where a waiter is one future, rather than in
    aiohttp's connector, where each holds a fully built request (with 1,000 pipelines
    on 100 connections that was a fifth of the client's CPU, in garbage collection).
    """

    __slots__ = (
        "_api_timeouts",
        "_keepalive",
        "_max_connections",
        "_session",
        "_slots",
        "_timeouts",
    )

    def __init__(self, *, max_connections: int, keepalive_expiry: float | None = 5.0) -> None:
        self._max_connections = max_connections
        self._keepalive = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None
        # A handful of distinct timeout settings exist per client; build each once.
        self._timeouts: dict[_Timeouts, aiohttp.ClientTimeout] = {}
        self._api_timeouts: dict[int, tuple[httpx.Timeout, aiohttp.ClientTimeout]] = {}
        self._slots = _Slots(max_connections)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive or 0,
                force_close=self._keepalive == 0,
            )
            # No session-wide skip_auto_headers: aiohttp rebuilds that list into two
            # multidicts on every request. API requests name all three headers
            # themselves (HttpCore), so none is added; downloads skip them per call.
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def exchange(self, request: Request, cap: int) -> Exchange:
        """An API call: the hot path of every pipeline.

        The per-read timeout is folded into the whole-request deadline (connect +
        write + read + pool), which is what bounds a stalled or trickling answer:
        aiohttp re-arms a per-read timer on every chunk, which cost about 8% of a
        pipeline's CPU for JSON bodies of a few hundred bytes.
        """
        timeout = request.timeout
        cached = self._api_timeouts.get(id(timeout))
        if cached is None or cached[0] is not timeout:
            cached = self._api_timeout(timeout)
        slots = self._slots
        if not slots.take_now():
            await self._wait_slot(request)
        try:
            async with self._get_session().request(
                request.method,
                request.url,
                headers=request.headers,
                data=request.content,
                allow_redirects=False,
                timeout=cached[1],
                compress=None,
            ) as response:
                status = response.status
                if check_declared(response.headers, status, cap):
                    # A declared length within the cap: read it whole, in one await.
                    return Exchange(status, response.headers, await response.read())
                streamed = Streamed(status, response.headers, response.content.iter_any())
                return Exchange(status, response.headers, await read_capped(streamed, cap))
        except _AIOHTTP as exc:
            raise mapped(exc, request) from (None if carries_request(exc) else exc)
        except _REFUSED:
            raise _unsendable(request) from None
        finally:
            slots.release()

    @contextlib.asynccontextmanager
    async def stream(self, request: Request) -> AsyncGenerator[Streamed]:
        """A download: per-read timeouts apply, the caller bounds the whole of it."""
        timeout = request.timeout
        if not self._slots.take_now():
            await self._wait_slot(request)
        try:
            try:
                response = await self._get_session().request(
                    request.method,
                    request.url,
                    headers=request.headers,
                    allow_redirects=False,
                    timeout=self._timeout((timeout.connect, timeout.pool, timeout.read, None)),
                    skip_auto_headers=_SKIP_AUTO,
                )
            except _AIOHTTP as exc:
                raise mapped(exc, request) from (None if carries_request(exc) else exc)
            except _REFUSED:
                raise _unsendable(request) from None
            try:
                chunks = guarded(response.content.iter_chunked(256 * 1024), request, _AIOHTTP)
                yield Streamed(response.status, response.headers, chunks)
            finally:
                response.release()
        finally:
            self._slots.release()

    async def _wait_slot(self, request: Request) -> None:
        """Queue for a connection; a wait past the pool timeout sends nothing."""
        pool_timeout = request.timeout.pool
        try:
            await self._slots.take(pool_timeout)
        except _PoolTimeout:
            raise APITimeoutError(
                f"no connection became free within {pool_timeout:g}s",
                method=request.method,
                url=request.url,
                sent=False,
            ) from None

    def _api_timeout(self, timeout: httpx.Timeout) -> tuple[httpx.Timeout, aiohttp.ClientTimeout]:
        """The aiohttp settings of an API call under *timeout*, remembered per object
        (a client uses a handful: its own, the upload one); kept with the object, so
        an id reused by a later one never matches."""
        limit = request_deadline(timeout)
        total = None if limit == float("inf") else limit
        entry = (timeout, self._timeout((timeout.connect, timeout.pool, None, total)))
        if len(self._api_timeouts) >= _MAX_TIMEOUTS:  # per-call timeouts: stay bounded
            self._api_timeouts.clear()
        self._api_timeouts[id(timeout)] = entry
        return entry

    def _timeout(self, key: _Timeouts) -> aiohttp.ClientTimeout:
        cached = self._timeouts.get(key)
        if cached is None:
            connect, pool, read, total = key
            cached = self._timeouts[key] = aiohttp.ClientTimeout(
                total=total, connect=pool, sock_connect=connect, sock_read=read
            )
        return cached

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class _PoolTimeout(Exception):
    """No connection slot became free within the pool timeout."""


class _Slots:
    """The connection slots of one transport, handed out first come, first served.

    Cheaper than ``asyncio.Semaphore`` + ``asyncio.timeout`` where it matters, with
    1,000 requests queued on 100 connections: a free slot is taken by a plain call (no
    coroutine), ``release`` hands the slot straight to the next waiter (no scan of the
    queue), and a waiter is one future. Pool timeouts share one timer, armed for the
    earliest deadline in the queue: a queued request adds no timer handle, no
    ``asyncio.timeout`` object and no task cancellation to end its wait.

    A waiter that leaves (timed out, cancelled) stays in the queue, already done, and
    is skipped by the next ``release``; one cancelled just after being handed a slot
    passes it on, so no slot is ever lost.
    """

    __slots__ = ("_deadlines", "_free", "_timer", "_timer_at", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        # Side by side: the waiters in arrival order and their deadlines (loop time).
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._deadlines: collections.deque[float] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # when the timer fires; never after a live deadline

    def take_now(self) -> bool:
        """Take a free slot if there is one (a queue means there is none)."""
        if self._free > 0:
            self._free -= 1
            return True
        return False

    async def take(self, timeout: float | None) -> None:
        """Wait for a slot; ``_PoolTimeout`` after *timeout* seconds (None: no limit)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        deadline = math.inf if timeout is None else loop.time() + timeout
        self._waiters.append(waiter)
        self._deadlines.append(deadline)
        if deadline < self._timer_at:
            self._arm(loop, deadline)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # handed a slot as it was cancelled: the next one gets it
            raise

    def release(self) -> None:
        """Give a slot back: to the longest waiter still waiting, else to the pool."""
        waiters, deadlines = self._waiters, self._deadlines
        while waiters:
            waiter = waiters.popleft()
            deadlines.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(at, self._expire, loop)
        self._timer_at = at

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """The earliest deadline came: fail every waiter past its own, re-arm for the next.

        A scan of the queue, once per pool timeout at most in a steady flow (the timer
        is armed for the oldest waiter's deadline, who is usually served long before).
        """
        self._timer, self._timer_at = None, math.inf
        current = loop.time()
        following = math.inf
        for waiter, deadline in zip(self._waiters, self._deadlines, strict=True):
            if waiter.done():
                continue
            if deadline <= current:
                waiter.set_exception(_PoolTimeout())
            elif deadline < following:
                following = deadline
        if following < math.inf:
            self._arm(loop, following)


def _unsendable(request: Request) -> APIConnectionError:
    # Its message may quote the header value, which may be ours: not kept.
    return APIConnectionError(
        "the request could not be formed (a header value is invalid); not retried",
        method=request.method,
        url=request.url,
        sent=False,
        retryable=False,
    )
