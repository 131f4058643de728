"""An httpx transport over aiohttp, for asyncio (the ``fast`` extra).

Why our own rather than ``httpx-aiohttp``: what decides whether a paid submit may be
retried is whether the request can have reached the server, and that package maps
``aiohttp.ClientConnectionError`` (which includes ``ServerDisconnectedError``, a
connection dropped *after* sending) to ``httpx.ConnectTimeout``, i.e. "never sent".
Here only connector failures become ``ConnectError``/``ConnectTimeout``; everything that
happens after the connection exists becomes a read/protocol error.

aiohttp's client is several times cheaper per request than httpx's own pool under
concurrency, which is what the overhead benchmark measures. Bodies are passed through
undecoded (``auto_decompress=False``) so httpx decodes them exactly as it would its own.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx

from ._http import Exchange, check_declared_size, request_deadline, too_large

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator

__all__ = ["AiohttpTransport"]


def _map_error(exc: BaseException) -> httpx.TransportError:
    """The httpx error that says as much (and no more) about what happened."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientOSError):
        return httpx.ReadError(message)
    return httpx.TransportError(message)


def _total(timeout: httpx.Timeout) -> float | None:
    # aiohttp enforces the whole-request bound natively: no extra scope per call.
    limit = request_deadline(timeout)
    return None if limit == float("inf") else limit


class _Stream(httpx.AsyncByteStream):
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _map_error(exc) from exc

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests through one lazily created ``aiohttp.ClientSession``.

    The session is created on first use, inside the running event loop (aiohttp
    requires one), with a connection limit of *max_connections*.
    """

    def __init__(self, *, max_connections: int, keepalive_expiry: float | None = 5.0) -> None:
        self._max_connections = max_connections
        self._keepalive = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None
        # A handful of distinct timeout settings exist per client; build each once.
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}
        # API calls beyond the pool queue here, where a waiter is one future, rather
        # than in aiohttp's connector, where each holds a fully built request: with
        # 1,000 pipelines on 100 connections that was a fifth of the client's CPU (GC).
        self._slots = asyncio.Semaphore(max_connections)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive or 0,
                force_close=self._keepalive == 0,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send *request*; map aiohttp failures onto httpx's exception classes."""
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        timeout = self._timeout(timeouts.get("connect"), timeouts.get("pool"), timeouts.get("read"))
        data: Any
        try:
            data = request.content
        except httpx.RequestNotRead:
            data = request.stream  # an async iterable: aiohttp streams it
        try:
            response = await self._get_session().request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=data,
                allow_redirects=False,
                timeout=timeout,
                compress=None,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _map_error(exc) from exc
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Stream(response),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def exchange(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        content: bytes | AsyncIterable[bytes] | None,
        timeout: httpx.Timeout,
        cap: int,
    ) -> Exchange:
        """An API call without any httpx objects: the hot path of every pipeline.

        Reads the whole body under *cap*. Transport failures are httpx's classes, mapped
        exactly as ``handle_async_request`` maps them. The per-read timeout is folded
        into the whole-request deadline (connect + write + read + pool), which is what
        bounds a stalled or trickling API answer: aiohttp re-arms a per-read timer on
        every chunk received, which cost about 8% of a pipeline's CPU, for JSON bodies
        of a few hundred bytes. Downloads (``handle_async_request``) keep it.
        """
        if self._slots.locked():
            await self._wait_for_slot(timeout.pool)
        else:
            await self._slots.acquire()  # free: taken at once, no suspension
        try:
            async with self._get_session().request(
                method,
                url,
                headers=headers,
                data=content,
                allow_redirects=False,
                timeout=self._timeout(timeout.connect, timeout.pool, None, _total(timeout)),
                compress=None,
            ) as response:
                status = response.status
                if check_declared_size(response.headers, status, cap):
                    # A declared length within the cap: read it whole, in one await.
                    return Exchange(status, response.headers, await response.read())
                chunks: list[bytes] = []
                total = 0
                async for chunk in response.content.iter_any():
                    total += len(chunk)
                    if total > cap:
                        raise too_large(status, cap)
                    chunks.append(chunk)
                return Exchange(status, response.headers, b"".join(chunks))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _map_error(exc) from exc
        finally:
            self._slots.release()

    async def _wait_for_slot(self, pool_timeout: float | None) -> None:
        """Queue for a connection slot; httpx's ``PoolTimeout`` (nothing sent) if none."""
        try:
            if sys.version_info >= (3, 11):  # a timer, where wait_for spawns a task
                async with asyncio.timeout(pool_timeout):
                    await self._slots.acquire()
            else:
                await asyncio.wait_for(self._slots.acquire(), pool_timeout)
        except asyncio.TimeoutError:
            raise httpx.PoolTimeout(f"no connection became free within {pool_timeout:g}s") from None

    def _timeout(
        self,
        connect: float | None,
        pool: float | None,
        read: float | None,
        total: float | None = None,
    ) -> aiohttp.ClientTimeout:
        key = (connect, pool, read, total)
        cached = self._timeouts.get(key)
        if cached is None:
            cached = self._timeouts[key] = aiohttp.ClientTimeout(
                total=total, connect=pool, sock_connect=connect, sock_read=read
            )
        return cached

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None
