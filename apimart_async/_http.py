"""The one place that sends requests to the API and turns answers into our results.

Everything that crosses the network to the API origin goes through ``HttpCore``:

* the ``Authorization`` header is added here, per request, and only to URLs built from
  the configured base URL; the transport carries no credentials, so a download through
  the same pool cannot leak the key, and redirects are never followed on API calls;
* bodies are read under a size cap (by the transport), so a hostile or broken server
  cannot make us buffer gigabytes;
* error envelopes (also inside 2xx bodies) become ``APIStatusError`` subclasses.

Retries are not made here: a caller wraps ``request_json`` in a ``Retrier``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ._exceptions import APIResponseValidationError
from ._parsing import as_object, decode_json, error_from_body
from ._transport import Request

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Mapping

    import httpx

    from ._telemetry import Telemetry
    from ._transport import Transport

__all__ = ["HttpCore"]

logger = logging.getLogger("apimart_async.http")


class HttpCore:
    """Sends API requests through one ``Transport``.

    *api_key* is kept in a header mapping that is only ever merged into requests for the
    API origin and is never part of a repr or a message.
    """

    __slots__ = (
        "_auth",
        "_cap",
        "_default_headers",
        "_prefix",
        "telemetry",
        "timeout",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        *,
        base_url: httpx.URL,
        api_key: str,
        timeout: httpx.Timeout,
        max_response_bytes: int,
        headers: Mapping[str, str],
        telemetry: Telemetry | None = None,
    ) -> None:
        self.transport = transport
        self.telemetry = telemetry
        self._prefix = str(base_url).rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self.timeout = timeout
        self._cap = max_response_bytes
        # Bodies are capped as they arrive, so ask for them uncompressed: the cap then
        # bounds what is held, and no transport adds its own Accept-Encoding.
        self._default_headers = {"Accept-Encoding": "identity", **headers}

    def __repr__(self) -> str:
        return f"<HttpCore {self._prefix!r}>"

    def url(self, path: str) -> str:
        """An absolute URL on the API origin, keeping any path prefix of the base URL."""
        return self._prefix + path

    async def request_json(
        self,
        method: str,
        path: str,
        content: bytes | AsyncIterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> Any:
        """One attempt: send, read under the cap, raise our error or return parsed JSON."""
        request = Request(
            method,
            self._prefix + path,
            {**self._default_headers, **headers, **self._auth}
            if headers
            else {**self._default_headers, **self._auth},
            content,
            timeout or self.timeout,
            True,
        )
        telemetry = self.telemetry
        if telemetry is None:
            # The common case in one coroutine frame: every extra layer is an object
            # per request, alive while it waits for a connection (GC pressure at
            # high concurrency).
            status, response_headers, raw = await self.transport.exchange(request, self._cap)
            return self._answer(request, path, status, response_headers, raw)
        with telemetry.http(method, request.url, path, request.headers) as span:
            status, response_headers, raw = await self.transport.exchange(request, self._cap)
            telemetry.status(span, status, path)
            return self._answer(request, path, status, response_headers, raw)

    def _answer(
        self,
        request: Request,
        path: str,
        status: int,
        response_headers: Mapping[str, str],
        raw: bytes,
    ) -> Any:
        """The parsed JSON of a 2xx answer, or the error the answer stands for."""
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s -> %d (%d bytes)", request.method, path, status, len(raw))
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

    async def aclose(self) -> None:
        """Close the transport (it decides whether there is anything of ours to close)."""
        await self.transport.aclose()
