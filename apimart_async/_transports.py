"""Which httpx transport a client builds when the caller gives none.

On asyncio with the ``fast`` extra (aiohttp) installed, requests go through our aiohttp
transport, which costs a fraction of httpx's own pool per request under concurrency.
On trio, or without aiohttp, httpx's own transport is used. The choice is made on the
first request, inside the running event loop, because a client may be built before any
loop exists (at import of a web app's module, say) and the backend is only known then.
Pool sizes come from the client's ``Limits`` here: httpx ignores ``limits=`` once a
transport is given.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import TYPE_CHECKING

import httpx

from ._http import Exchange, Exchanger, via_transport

if TYPE_CHECKING:
    from collections.abc import AsyncIterable

__all__ = ["AutoTransport", "default_transport"]


def _on_asyncio() -> bool:
    # anyio has no public "which backend" call; trio runs no asyncio loop.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class AutoTransport(httpx.AsyncBaseTransport):
    """Picks aiohttp (asyncio + ``fast`` extra) or httpx's pool on first use."""

    def __init__(self, limits: httpx.Limits, *, prefer_aiohttp: bool = True) -> None:
        self._limits = limits
        self._prefer_aiohttp = prefer_aiohttp
        self._inner: httpx.AsyncBaseTransport | None = None
        self._exchange: Exchanger | None = None

    @property
    def backend(self) -> str | None:
        """``"aiohttp"``, ``"httpx"``, or None before the first request."""
        if self._inner is None:
            return None
        return "httpx" if isinstance(self._inner, httpx.AsyncHTTPTransport) else "aiohttp"

    def _choose(self) -> httpx.AsyncBaseTransport:
        if (
            self._prefer_aiohttp
            and _on_asyncio()
            and importlib.util.find_spec("aiohttp") is not None
        ):
            from ._aiohttp import AiohttpTransport

            return AiohttpTransport(
                max_connections=self._limits.max_connections or 100,
                keepalive_expiry=self._limits.keepalive_expiry,
            )
        return httpx.AsyncHTTPTransport(limits=self._limits, retries=0)

    def _chosen(self) -> tuple[httpx.AsyncBaseTransport, Exchanger]:
        if self._inner is None or self._exchange is None:
            self._inner = self._choose()
            self._exchange = via_transport(self._inner)
        return self._inner, self._exchange

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send through the chosen transport."""
        inner, _ = self._chosen()
        return await inner.handle_async_request(request)

    async def exchange(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        content: bytes | AsyncIterable[bytes] | None,
        timeout: httpx.Timeout,
        cap: int,
    ) -> Exchange:
        """An API call through the chosen transport's fastest path."""
        _, exchange = self._chosen()
        return await exchange(method, url, headers, content, timeout, cap)

    async def aclose(self) -> None:
        """Close the chosen transport, if any was created."""
        if self._inner is not None:
            await self._inner.aclose()


def default_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """A pooled transport honouring *limits*; aiohttp-backed on asyncio when available."""
    return AutoTransport(limits)
