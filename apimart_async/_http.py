"""The one place that sends requests to the API and turns failures into our errors.

Everything that crosses the network to the API origin goes through ``HttpCore``:

* the ``Authorization`` header is added here, per request, and only to URLs built from
  the configured base URL; the shared ``httpx.AsyncClient`` carries no credentials, so a
  download through the same pool cannot leak the key, and redirects are never followed
  on API calls;
* bodies are read under a size cap, so a hostile or broken server cannot make us buffer
  gigabytes;
* httpx exceptions become ``APIConnectionError``/``APITimeoutError`` (``raise ... from``),
  recording whether the request may have reached the server (``sent``), which is what
  decides whether a paid submit may be retried;
* error envelopes (also inside 2xx bodies) become ``APIStatusError`` subclasses;
* retries are declared with stamina; the backoff hooks below classify what is safe.

Retry hooks never return a wait that would pass the caller's deadline: a ``Retry-After``
longer than the time left is not honoured but reported (the error is raised at once).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, NamedTuple, ParamSpec, Protocol, TypeVar, cast

import anyio
import httpx
import stamina

from ._exceptions import (
    APIConnectionError,
    ApimartError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    RateLimitError,
)
from ._parsing import as_object, decode_json, error_from_body, parse_retry_after

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterable, Mapping

    from ._config import RetryPolicy

__all__ = [
    "Exchange",
    "HttpCore",
    "check_declared_size",
    "idempotent_hook",
    "map_request_error",
    "map_transport_error",
    "read_capped",
    "submit_hook",
    "too_large",
]

logger = logging.getLogger("apimart_async")

T = TypeVar("T")
P = ParamSpec("P")
BackoffHook = Callable[[Exception], "bool | float"]

# Failures where httpx guarantees no byte of the request left this process.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


def map_request_error(exc: httpx.RequestError, method: str, url: str) -> ApimartError:
    """Translate any httpx request failure into our tree (``raise ... from exc``).

    Transport failures keep whether the request was sent; a body httpx could not
    decode (bad ``Content-Encoding``) or a redirect loop is a response we could not use.
    """
    if isinstance(exc, httpx.TransportError):
        return map_transport_error(exc, method, url)
    return APIResponseValidationError(
        f"unusable response ({type(exc).__name__}: {exc})", status_code=0
    )


def request_deadline(timeout: httpx.Timeout) -> float:
    """A bound on one whole request: per-read timeouts alone let a server trickle forever."""
    parts = (timeout.connect, timeout.write, timeout.read, timeout.pool)
    if all(p is None for p in parts):
        return float("inf")
    return sum(p or 0.0 for p in parts)


def deadline_error(method: str, url: str, seconds: float) -> APITimeoutError:
    """The error for a request that outlived ``request_deadline``."""
    return APITimeoutError(
        f"the request did not finish within {seconds:g}s", method=method, url=url, sent=True
    )


def map_transport_error(exc: httpx.TransportError, method: str, url: str) -> APIConnectionError:
    """Translate an httpx transport failure, keeping whether the request was sent."""
    sent = not isinstance(exc, _NOT_SENT)
    # httpx messages name the failure, never headers; the URL carries no secret.
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    return cls(message, method=method, url=url, sent=sent)


def check_declared_size(headers: Mapping[str, str], status: int, cap: int) -> bool:
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


def too_large(status: int, cap: int) -> APIResponseValidationError:
    """The error for a body that grew past *cap* while being read."""
    return APIResponseValidationError(
        f"response body exceeds the {cap}-byte cap", status_code=status
    )


async def read_capped(response: httpx.Response, cap: int) -> bytes:
    """Read a streamed httpx body, refusing anything larger than *cap* bytes."""
    check_declared_size(response.headers, response.status_code, cap)
    chunks: list[bytes] = []
    total = 0
    async with aclosing(cast("AsyncGenerator[bytes, None]", response.aiter_bytes())) as stream:
        async for chunk in stream:
            total += len(chunk)
            if total > cap:
                raise too_large(response.status_code, cap)
            chunks.append(chunk)
    return b"".join(chunks)


class Exchange(NamedTuple):
    """One HTTP exchange, read whole (under the cap)."""

    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes


class Exchanger(Protocol):
    """Something that performs an ``Exchange``; transport errors are httpx's classes."""

    async def __call__(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        content: bytes | AsyncIterable[bytes] | None,
        timeout: httpx.Timeout,
        cap: int,
    ) -> Exchange: ...


Send = Callable[
    [str, str, dict[str, str], "bytes | AsyncIterable[bytes] | None", httpx.Timeout],
    Awaitable[httpx.Response],
]
"""Sends one request over httpx and returns the streamed response."""


def _over_httpx(send: Send) -> Exchanger:
    """An exchange over an httpx *send*: read under the cap, closed, and bounded by a
    whole-request deadline (httpx's own timeouts are per read)."""

    async def exchange(
        method: str,
        url: str,
        headers: dict[str, str],
        content: bytes | AsyncIterable[bytes] | None,
        timeout: httpx.Timeout,
        cap: int,
    ) -> Exchange:
        limit = request_deadline(timeout)
        with anyio.move_on_after(limit):
            response = await send(method, url, headers, content, timeout)
            try:
                body = await read_capped(response, cap)
            finally:
                await response.aclose()
            return Exchange(response.status_code, response.headers, body)
        raise httpx.ReadTimeout(f"the request did not finish within {limit:g}s")

    return exchange


def via_transport(transport: httpx.AsyncBaseTransport) -> Exchanger:
    """Exchanges straight through *transport*, or its own faster path if it has one.

    httpx's client layer (cookies, auth flows, redirects, event hooks) does nothing we
    use on API calls and is most of its per-request cost, so our own pool skips it.
    """
    direct = getattr(transport, "exchange", None)
    if direct is not None:
        # A native exchange bounds the whole request itself (see ``request_deadline``).
        return cast("Exchanger", direct)

    async def send(
        method: str,
        url: str,
        headers: dict[str, str],
        content: bytes | AsyncIterable[bytes] | None,
        timeout: httpx.Timeout,
    ) -> httpx.Response:
        extensions = {"timeout": timeout.as_dict()}
        request = httpx.Request(
            method, url, content=content, headers=headers, extensions=extensions
        )
        return await transport.handle_async_request(request)

    return _over_httpx(send)


def via_client(client: httpx.AsyncClient) -> Exchanger:
    """Exchanges through a borrowed client, keeping its hooks, proxies and mounts."""

    async def send(
        method: str,
        url: str,
        headers: dict[str, str],
        content: bytes | AsyncIterable[bytes] | None,
        timeout: httpx.Timeout,
    ) -> httpx.Response:
        request = client.build_request(
            method, url, content=content, headers=headers, timeout=timeout
        )
        return await client.send(request, stream=True, follow_redirects=False)

    return _over_httpx(send)


def _time_left() -> float:
    return anyio.current_effective_deadline() - anyio.current_time()


def _retry_after(exc: APIStatusError, cap: float) -> bool | float:
    hint = exc.retry_after if isinstance(exc, RateLimitError) else None
    if hint is None:
        hint = parse_retry_after(exc.headers.get("retry-after"))
    if hint is None:
        return True
    wait = min(hint, cap)
    # Sleeping past the caller's deadline would only turn a clear 429 into a timeout.
    return wait if wait < _time_left() else False


def is_transient(exc: Exception) -> bool:
    """Whether repeating a safe call could succeed: the retry classes, deadline aside."""
    if isinstance(exc, APIConnectionError | APIResponseValidationError):
        return True
    if isinstance(exc, APIStatusError):
        # get_channel_failed ("no upstream channel, try later") also comes as a 400.
        return (
            exc.status_code in (408, 429)
            or exc.status_code >= 500
            or exc.code == "get_channel_failed"
        )
    return False


def idempotent_hook(retry_after_max: float) -> BackoffHook:
    """Backoff hook for calls that are safe to repeat: uploads, task queries, downloads.

    Retries connection failures, 408, 429 (honouring ``Retry-After``), 5xx, and bodies
    that could not be parsed (a gateway's HTML page). Other 4xx are final.
    """

    def hook(exc: Exception) -> bool | float:
        if not is_transient(exc):
            return False
        if isinstance(exc, APIStatusError) and exc.status_code not in (400, 408):
            return _retry_after(exc, retry_after_max)
        return True

    return hook


def is_provably_not_acted(exc: Exception) -> bool:
    """Whether a failed submit certainly created no task, so resending is free."""
    if isinstance(exc, APIConnectionError):
        return not exc.sent
    if isinstance(exc, APIStatusError):
        if exc.code == "get_channel_failed":
            return True
        if exc.status_code in (429, 503):
            return True
        # The idempotency layer says the original is still running: ask again later.
        return exc.status_code == 409 and exc.code == "idempotency_in_progress"
    return False


def is_ambiguous(exc: Exception) -> bool:
    """Whether a failed submit may have created a task we know nothing about."""
    if is_provably_not_acted(exc):
        return False
    if isinstance(exc, APIConnectionError | APIResponseValidationError):
        return True
    if isinstance(exc, APIStatusError):
        if exc.code == "idempotency_result_indeterminate":
            return True
        return exc.status_code in (500, 502, 504) or exc.status_code > 504
    return False


def submit_hook(retry_after_max: float, *, retry_ambiguous: bool) -> BackoffHook:
    """Backoff hook for paid submits.

    Retries only what provably created nothing (connection never established, 429, 503,
    ``get_channel_failed``). With *retry_ambiguous* (the caller's explicit opt-in, safe
    only where the service honours ``Idempotency-Key``) ambiguous failures are retried
    too, always with the same key and body.
    """

    def hook(exc: Exception) -> bool | float:
        if is_provably_not_acted(exc):
            if isinstance(exc, APIStatusError):
                return _retry_after(exc, retry_after_max)
            return True
        return retry_ambiguous and is_ambiguous(exc)

    return hook


class HttpCore:
    """Sends API requests over one shared ``httpx.AsyncClient``; owns nothing else.

    *api_key* is kept in a header mapping that is only ever merged into requests for the
    API origin and is never part of a repr or a message.
    """

    __slots__ = (
        "_auth",
        "_base",
        "_cap",
        "_client",
        "_default_headers",
        "_exchange",
        "_prefix",
        "_retry",
        "_timeout",
    )

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        base_url: httpx.URL,
        api_key: str,
        retry: RetryPolicy,
        timeout: httpx.Timeout,
        max_response_bytes: int,
        headers: Mapping[str, str],
    ) -> None:
        self._client = client
        # Our own pool (*transport* given): straight to the transport. A borrowed client
        # keeps its full behaviour (hooks, proxies, mounts).
        self._exchange = via_transport(transport) if transport is not None else via_client(client)
        self._base = base_url
        self._prefix = str(base_url).rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._retry = retry
        self._timeout = timeout
        self._cap = max_response_bytes
        self._default_headers = dict(headers)

    @property
    def client(self) -> httpx.AsyncClient:
        """The underlying pool (shared with downloads, which never get the key)."""
        return self._client

    def url(self, path: str) -> str:
        """An absolute URL on the API origin, keeping any path prefix of the base URL."""
        return self._prefix + path

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        content: bytes | AsyncIterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> Any:
        """One attempt: send, read under the cap, raise our error or return parsed JSON."""
        all_headers = {**self._default_headers, **(headers or {}), **self._auth}
        url = self._prefix + path
        timeout = timeout or self._timeout
        try:
            status, response_headers, raw = await self._exchange(
                method, url, all_headers, content, timeout, self._cap
            )
        except httpx.RequestError as exc:
            raise map_request_error(exc, method, url) from exc
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s -> %d (%d bytes)", method, path, status, len(raw))
        if status >= 400:
            body: object = None
            try:
                body = decode_json(raw, status) if raw else None
            except APIResponseValidationError:
                body = raw[:300].decode("utf-8", "replace")
            if isinstance(body, str) or body is None:
                body = {"error": {"message": (body or "").strip() or None}}
            raise error_from_body(status, body, response_headers)
        if 300 <= status < 400:
            raise APIResponseValidationError(
                "unexpected redirect from the API (not followed)",
                status_code=status,
                excerpt=response_headers.get("location", ""),
            )
        parsed = decode_json(raw, status)
        envelope = as_object(parsed)
        if envelope is not None and envelope.get("error"):
            raise error_from_body(status, parsed, response_headers)
        return parsed

    @property
    def call_bound(self) -> float:
        """The longest one API call can take, retries included (inf: unbounded).

        Stamina stops retrying after ``RetryPolicy.timeout``; the attempt under way
        then may run for one more whole-request deadline.
        """
        if self._retry.timeout is None:
            return float("inf")
        return self._retry.timeout + request_deadline(self._timeout)

    def caller(self, hook: BackoffHook, *, attempts: int | None = None) -> RetryingCall:
        """A retrying caller bound to *hook*, using this client's ``RetryPolicy``."""
        policy = self._retry
        return RetryingCall(
            stamina.AsyncRetryingCaller(
                attempts=attempts or policy.attempts,
                timeout=policy.timeout,
                wait_initial=policy.wait_initial,
                wait_max=policy.wait_max,
                wait_jitter=policy.wait_jitter,
            ).on(hook),
            hook,
        )


class RetryingCall:
    """Runs ``fn(*args, **kwargs)`` under a bound stamina caller.

    Stamina only ever sees a zero-argument callable: its retry log records the
    arguments of the retried call, and ours include headers.
    """

    __slots__ = ("_bound", "_hook")

    def __init__(self, bound: stamina.BoundAsyncRetryingCaller, hook: BackoffHook) -> None:
        self._bound = bound
        self._hook = hook

    async def __call__(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        # Most calls succeed first time; setting up stamina's retry state for each
        # costs more than the request's own parsing, so the first attempt runs bare
        # (and this frame holds no closure cells: they cost on every call).
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            if self._hook(exc) is False:
                raise
            return await self._retry(exc, functools.partial(fn, *args, **kwargs))

    async def _retry(self, first_failure: Exception, call: Callable[[], Awaitable[T]]) -> T:
        first: Exception | None = first_failure

        async def replay_then_attempt() -> T:
            # Stamina sees the first failure as its own attempt 1, so it backs off
            # (honouring Retry-After) and counts attempts exactly as if it ran it.
            nonlocal first
            if first is not None:
                failed, first = first, None
                raise failed
            return await call()

        return await self._bound(replay_then_attempt)
