"""The one seam between the client and the network, and its httpx implementations.

Everything the client sends goes through a ``Transport``: ``exchange`` for API calls
(the whole body read under a size cap) and ``stream`` for result downloads (read chunk
by chunk into a file). Three implementations exist:

* ``HttpxTransport`` over any ``httpx.AsyncBaseTransport`` (httpx's own pool, or a
  transport a test gives, such as ``FakeApimart.transport()``);
* ``ClientTransport`` over an ``httpx.AsyncClient`` (a borrowed one keeps its proxies
  and mounts; its ``auth``, its default ``Authorization``, its default headers and
  cookies never reach a result host, and its ``raise_for_status`` hook is undone);
* ``AiohttpTransport`` (``_aiohttp``), the fast path on asyncio.

``AutoTransport`` picks aiohttp or httpx's pool on first use, inside the running loop;
``open_transport`` turns a client's settings into one of these.

Foreign failures become our errors here, in ``network_error``, and nowhere else: each
keeps whether the request may have reached the server (``sent``), which decides
whether a paid submit may be retried, and whether retrying can help at all (a failed
TLS certificate check never heals by itself).
"""

from __future__ import annotations

import abc
import contextlib
import ssl
import sys
from contextlib import aclosing
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, cast

import anyio
import httpx

from ._config import proxy_from_env
from ._exceptions import (
    APIConnectionError,
    ApimartError,
    APIResponseValidationError,
    APITimeoutError,
)

if TYPE_CHECKING:
    from collections.abc import (
        AsyncGenerator,
        AsyncIterable,
        AsyncIterator,
        Coroutine,
        Mapping,
    )
    from contextlib import AbstractAsyncContextManager
    from typing import Any

__all__ = [
    "AutoTransport",
    "Backend",
    "ClientTransport",
    "Exchange",
    "HttpxTransport",
    "Request",
    "Streamed",
    "Transport",
    "carries_request",
    "check_declared",
    "guarded",
    "mapped",
    "network_error",
    "open_transport",
    "read_capped",
    "request_deadline",
]

Backend = Literal["auto", "aiohttp", "httpx"]


class Request(NamedTuple):
    """One request as the seam sees it; *headers* are complete (auth included).

    *api* is True for requests to the API origin (``HttpCore`` builds those): only they
    may carry credentials, ours or a borrowed client's.
    """

    method: str
    url: str
    headers: dict[str, str]
    content: bytes | AsyncIterable[bytes] | None
    timeout: httpx.Timeout
    api: bool = False

    def __repr__(self) -> str:
        # Never the headers: they hold the key.
        return f"Request({self.method} {self.url})"


class Exchange(NamedTuple):
    """One API exchange, read whole under the cap."""

    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes


class Streamed(NamedTuple):
    """A response whose body is being read: *chunks* yields the decoded body."""

    status: int
    headers: Mapping[str, str]
    chunks: AsyncIterator[bytes]


class Transport(Protocol):
    """What the client needs from the network.

    Failures are raised as our own errors (``network_error``), never a foreign class.
    """

    def exchange(self, request: Request, cap: int) -> Coroutine[Any, Any, Exchange]:
        """Send *request*; read its whole body, refusing more than *cap* bytes.

        A coroutine (an ``async def``, or a plain method handing on another's).
        """
        ...

    def stream(self, request: Request) -> AbstractAsyncContextManager[Streamed]:
        """Send *request* and hold its response open while the caller reads it."""
        ...

    async def aclose(self) -> None:
        """Release the pool (a borrowed client is left open)."""
        ...


# -- the capped reader ------------------------------------------------------------------


def check_declared(headers: Mapping[str, str], status: int, cap: int) -> bool:
    """Refuse a body whose declared length is over *cap* before reading any of it.

    True when a valid length within the cap is declared (the body may be read whole:
    the HTTP layer stops at that length); False when none is, so the reader must count.
    """
    declared = headers.get("content-length")
    if declared is None or not declared.isdigit():
        return False
    if int(declared) > cap:
        raise APIResponseValidationError(
            f"response body of {int(declared)} bytes exceeds the {cap}-byte cap",
            status_code=status,
        )
    return True


async def read_capped(streamed: Streamed, cap: int) -> bytes:
    """The whole body of *streamed*, refusing anything larger than *cap* bytes."""
    check_declared(streamed.headers, streamed.status, cap)
    chunks: list[bytes] = []
    total = 0
    async for chunk in streamed.chunks:
        total += len(chunk)
        if total > cap:
            raise APIResponseValidationError(
                f"response body exceeds the {cap}-byte cap", status_code=streamed.status
            )
        chunks.append(chunk)
    return b"".join(chunks)


def request_deadline(timeout: httpx.Timeout) -> float:
    """A bound on one whole request: per-read timeouts alone let a server trickle forever."""
    parts = (timeout.connect, timeout.write, timeout.read, timeout.pool)
    if all(p is None for p in parts):
        return float("inf")
    return sum(p or 0.0 for p in parts)


# -- foreign errors into ours -------------------------------------------------------------

_HTTPX = (httpx.HTTPError,)
# httpx failures where no byte of the request left this process.
_HTTPX_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)


def _tls_failure(exc: BaseException) -> bool:
    """Whether *exc* (or what caused it) is a failed TLS certificate check."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _describe(exc: BaseException) -> str:
    # Foreign messages name the failure and the host, never our headers.
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def network_error(exc: BaseException, method: str, url: str) -> ApimartError | None:
    """Our error for a failure of httpx or aiohttp, or None if *exc* is neither.

    ``sent`` is False only where the library guarantees nothing left this process
    (a connection never made, no free pool slot). A failed certificate check or an
    unusable URL is not retryable: repeating it cannot succeed.
    """
    if isinstance(exc, httpx.RequestError):
        if not isinstance(exc, httpx.TransportError):
            # A body httpx could not decode, a redirect loop: a response we cannot use.
            return APIResponseValidationError(
                f"unusable response ({_describe(exc)})", status_code=0
            )
        sent = not isinstance(exc, _HTTPX_NOT_SENT)
        retryable = not isinstance(exc, httpx.UnsupportedProtocol) and not _tls_failure(exc)
        cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
        return cls(_message(exc, retryable), method=method, url=url, sent=sent, retryable=retryable)
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(exc, aiohttp.ClientError):
        return _aiohttp_error(aiohttp, exc, method, url)
    if isinstance(exc, TimeoutError):  # aiohttp's total timeout is a bare TimeoutError
        return APITimeoutError(_describe(exc), method=method, url=url, sent=True)
    return None


def _aiohttp_error(aiohttp: object, exc: BaseException, method: str, url: str) -> ApimartError:
    a = cast("Any", aiohttp)
    if isinstance(exc, a.ConnectionTimeoutError):  # no connection within the timeout
        return APITimeoutError(_describe(exc), method=method, url=url, sent=False)
    if isinstance(exc, a.ClientConnectorError):  # the connection was never made
        retryable = not isinstance(exc, a.ClientConnectorCertificateError) and not _tls_failure(exc)
        return APIConnectionError(
            _message(exc, retryable), method=method, url=url, sent=False, retryable=retryable
        )
    if isinstance(exc, a.InvalidURL):
        return APIConnectionError(
            _describe(exc), method=method, url=url, sent=False, retryable=False
        )
    if isinstance(exc, TimeoutError):  # a read timed out: the request was sent
        return APITimeoutError(_describe(exc), method=method, url=url, sent=True)
    # Disconnected, reset, a broken body: all after the connection existed.
    return APIConnectionError(_describe(exc), method=method, url=url, sent=True)


def _message(exc: BaseException, retryable: bool) -> str:
    if retryable:
        return _describe(exc)
    if _tls_failure(exc):
        return f"TLS certificate verification failed (not retried): {_describe(exc)}"
    return f"{_describe(exc)} (not retried)"


def deadline_error(request: Request, seconds: float) -> APITimeoutError:
    """The error for a request that outlived ``request_deadline``."""
    return APITimeoutError(
        f"the request did not finish within {seconds:g}s",
        method=request.method,
        url=request.url,
        sent=True,
    )


# -- httpx implementations ----------------------------------------------------------------


def _httpx_request(request: Request) -> httpx.Request:
    return httpx.Request(
        request.method,
        request.url,
        headers=request.headers,
        content=request.content,
        extensions={"timeout": request.timeout.as_dict()},
    )


class _HttpxBase(abc.ABC):
    """Shared by both httpx implementations: how a response becomes ours."""

    __slots__ = ()

    @abc.abstractmethod
    async def _send(self, request: Request) -> httpx.Response:
        """Send *request*, returning the response with its body still to be read."""

    async def exchange(self, request: Request, cap: int) -> Exchange:
        """Send and read under the cap, bounded by the whole-request deadline."""
        limit = request_deadline(request.timeout)
        with anyio.move_on_after(limit):
            async with self.stream(request) as streamed:
                body = await read_capped(streamed, cap)
            return Exchange(streamed.status, streamed.headers, body)
        raise deadline_error(request, limit)

    @contextlib.asynccontextmanager
    async def stream(self, request: Request) -> AsyncGenerator[Streamed]:
        """Send *request*; yield its response; close it however the caller leaves."""
        try:
            response = await self._send(request)
        except httpx.HTTPStatusError as exc:
            # A borrowed client's ``raise_for_status`` hook: the status is the answer.
            response = httpx.Response(exc.response.status_code, headers=exc.response.headers)
        except httpx.HTTPError as exc:
            raise mapped(exc, request) from exc
        try:
            async with aclosing(cast("AsyncGenerator[bytes, None]", response.aiter_bytes())) as it:
                yield Streamed(response.status_code, response.headers, guarded(it, request, _HTTPX))
        finally:
            await response.aclose()


async def guarded(
    chunks: AsyncIterator[bytes], request: Request, catch: tuple[type[BaseException], ...]
) -> AsyncIterator[bytes]:
    """*chunks*, with a foreign failure while reading the body mapped like any other."""
    try:
        async for chunk in chunks:
            yield chunk
    except catch as exc:
        raise mapped(exc, request) from (None if carries_request(exc) else exc)


def mapped(exc: BaseException, request: Request) -> ApimartError:
    """``network_error`` for a failure the caller knows is a network failure.

    Raise it ``from exc`` only when ``carries_request(exc)`` is False: a foreign error
    holding the request (aiohttp's ``request_info``) holds its headers, and the key.
    """
    error = network_error(exc, request.method, request.url)
    if error is None:  # e.g. an httpx.HTTPError that is not a RequestError
        return APIConnectionError(_describe(exc), method=request.method, url=request.url, sent=True)
    return error


def carries_request(exc: BaseException) -> bool:
    """Whether *exc* holds our request's headers (so it must not become a ``__cause__``)."""
    return getattr(exc, "request_info", None) is not None


class HttpxTransport(_HttpxBase):
    """The seam over an ``httpx.AsyncBaseTransport``: no client layer on the way.

    httpx's client layer (cookies, auth flows, redirects, event hooks) does nothing
    we use, and is most of its per-request cost.
    """

    __slots__ = ("_inner", "_owned")

    def __init__(self, inner: httpx.AsyncBaseTransport, *, owned: bool) -> None:
        self._inner = inner
        self._owned = owned

    async def _send(self, request: Request) -> httpx.Response:
        return await self._inner.handle_async_request(_httpx_request(request))

    async def aclose(self) -> None:
        """Close the wrapped transport if it is ours."""
        if self._owned:
            await self._inner.aclose()


class ClientTransport(_HttpxBase):
    """The seam over an ``httpx.AsyncClient``: a borrowed one, or ours behind a proxy.

    API requests keep the client's default headers and cookies (the API origin is
    trusted) but never its ``auth``: our key is the only credential. Requests to other
    hosts (downloads) are built bare, so none of its headers or cookies go with them.
    Redirects are never followed here; the download code follows them itself.
    """

    __slots__ = ("_client", "_owned")

    def __init__(self, client: httpx.AsyncClient, *, owned: bool) -> None:
        self._client = client
        self._owned = owned

    async def _send(self, request: Request) -> httpx.Response:
        client = self._client
        if request.api:
            built = client.build_request(
                request.method,
                request.url,
                headers=request.headers,
                content=request.content,
                timeout=request.timeout,
            )
        else:
            built = _httpx_request(request)
        return await client.send(built, stream=True, auth=None, follow_redirects=False)

    async def aclose(self) -> None:
        """Close the client if we created it (never a borrowed one)."""
        if self._owned:
            await self._client.aclose()


def _on_asyncio() -> bool:
    # anyio has no public "which backend" call; trio runs no asyncio loop.
    from asyncio import _get_running_loop  # pyright: ignore[reportPrivateUsage]

    return _get_running_loop() is not None


def aiohttp_available() -> bool:
    """Whether the ``fast`` extra (aiohttp) is installed, without importing it."""
    import importlib.util

    return importlib.util.find_spec("aiohttp") is not None


class AutoTransport:
    """Picks aiohttp (asyncio, ``fast`` extra) or httpx's own pool on first use.

    The choice is made inside the running event loop, because a client may be built
    before any loop exists and the backend is only known then. *backend* ``"aiohttp"``
    insists (an error on trio), ``"httpx"`` never uses aiohttp, ``"auto"`` prefers it.
    Pool sizes come from *limits*: httpx ignores ``limits=`` once given a transport.
    """

    __slots__ = ("_backend", "_chosen", "_limits")

    def __init__(self, limits: httpx.Limits, backend: Backend) -> None:
        self._limits = limits
        self._backend = backend
        self._chosen: Transport | None = None

    def _choose(self) -> Transport:
        on_asyncio = _on_asyncio()
        if self._backend == "aiohttp" and not on_asyncio:
            raise RuntimeError(
                "transport_backend='aiohttp' needs asyncio; on trio use 'httpx' or 'auto'"
            )
        if self._backend != "httpx" and on_asyncio and aiohttp_available():
            from ._aiohttp import AiohttpTransport

            chosen: Transport = AiohttpTransport(
                max_connections=self._limits.max_connections or 100,
                keepalive_expiry=self._limits.keepalive_expiry,
            )
        else:
            pool = httpx.AsyncHTTPTransport(limits=self._limits, retries=0)
            chosen = HttpxTransport(pool, owned=True)
        self._chosen = chosen
        return chosen

    def exchange(self, request: Request, cap: int) -> Coroutine[Any, Any, Exchange]:
        """An API call through the chosen transport (its coroutine itself: no extra
        frame per request)."""
        return (self._chosen or self._choose()).exchange(request, cap)

    def stream(self, request: Request) -> AbstractAsyncContextManager[Streamed]:
        """A streamed response through the chosen transport."""
        return (self._chosen or self._choose()).stream(request)

    async def aclose(self) -> None:
        """Close the chosen transport, if any was created."""
        if self._chosen is not None:
            await self._chosen.aclose()


def open_transport(
    *,
    connections: int,
    backend: Backend,
    http_client: httpx.AsyncClient | None,
    transport: httpx.AsyncBaseTransport | None,
) -> Transport:
    """The transport a client's settings ask for; see the module docstring.

    Raises ``ValueError`` for settings that contradict each other or an unknown or
    unavailable *backend*, so the mistake shows at construction.
    """
    if backend not in ("auto", "aiohttp", "httpx"):
        raise ValueError(
            f"transport_backend must be one of 'auto', 'aiohttp', 'httpx' (got {backend!r})"
        )
    if http_client is not None and transport is not None:
        raise ValueError("pass either http_client or transport, not both")
    if backend != "auto" and (http_client is not None or transport is not None):
        raise ValueError(
            f"transport_backend={backend!r} chooses our own pool; it cannot apply to a "
            "given http_client or transport"
        )
    if backend == "aiohttp" and not aiohttp_available():
        raise ValueError(
            "transport_backend='aiohttp' needs aiohttp: pip install 'apimart-async[fast]'"
        )
    if http_client is not None:
        return ClientTransport(http_client, owned=False)
    if transport is not None:
        return HttpxTransport(transport, owned=True)
    pool = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    if backend != "aiohttp" and proxy_from_env():
        # httpx builds proxy-aware pools from the environment (aiohttp would not).
        client = httpx.AsyncClient(limits=pool, trust_env=True, follow_redirects=False)
        return ClientTransport(client, owned=True)
    return AutoTransport(pool, backend)
