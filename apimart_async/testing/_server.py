"""Serve the fake over real HTTP with uvicorn: in a background thread, or in the foreground.

Imported only in server mode, because uvicorn is an optional extra (``server``).

Why we bind the socket ourselves: with ``--port 0`` the kernel picks the port, and we
need it before uvicorn starts (to build the file origin and print the URL). A socket
that is bound and listening already queues connections, so there is no race with
uvicorn's startup.

The server runs the app's lifespan, which is where the fake's webhook sender lives
(on the server's own loop, next to the state it reads).

What can go wrong: uvicorn logs any exception escaping the app with a traceback; the
app raises ``ConnectionDrop`` on purpose to drop connections, so a logging filter
hides exactly those records. Shutdown waits for in-flight requests (a stalled answer
ends when its client disconnects) for at most ``timeout_graceful_shutdown`` seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import uvicorn

from ._asgi import ConnectionDrop
from ._sockets import bind

if TYPE_CHECKING:
    import socket
    from collections.abc import AsyncGenerator, Callable, Generator

    from ._app import App

__all__ = ["api_origin", "hide_drops", "make_server", "serve_in_thread"]

_UVICORN_ERROR_LOGGER = "uvicorn.error"
STARTUP_TIMEOUT = 15.0


class _HideDrops(logging.Filter):
    """Drop uvicorn's "Exception in ASGI application" records for deliberate drops."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ConnectionDrop)


class _Server(uvicorn.Server):
    """A uvicorn server that reports when startup is over (successful or not)."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None] | None) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
            if self.started and self._on_ready is not None:
                self._on_ready()
        finally:
            self.ready.set()


def api_origin(host: str, port: int) -> str:
    """The URL a client on this machine uses for a server bound to *host*:*port*."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def make_server(
    app: App,
    *,
    log_config: dict[str, Any] | None,
    graceful_timeout: int,
    on_ready: Callable[[], None] | None = None,
) -> _Server:
    """A lean uvicorn server for *app*: its lifespan (the webhook sender), but no access
    log, proxy headers or Date."""
    http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        http=http,
        lifespan="on",
        interface="asgi3",
        ws="none",
        proxy_headers=False,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=graceful_timeout,
        log_config=log_config,
    )
    return _Server(config, on_ready)


@contextlib.contextmanager
def hide_drops() -> Generator[None]:
    """Hide tracebacks of deliberate connection drops while the block runs."""
    log_filter = _HideDrops()
    logger = logging.getLogger(_UVICORN_ERROR_LOGGER)
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)


@contextlib.asynccontextmanager
async def serve_in_thread(app: App, host: str, port: int) -> AsyncGenerator[tuple[str, int]]:
    """Run uvicorn for *app* in a daemon thread; yields ``(api base URL, port)``."""
    sock = bind(host, port)
    bound_port: int = sock.getsockname()[1]
    server = make_server(app, log_config=None, graceful_timeout=1)
    thread = threading.Thread(
        target=server.run,
        kwargs={"sockets": [sock]},
        name=f"apimart-fake-{bound_port}",
        daemon=True,
    )
    with hide_drops():
        thread.start()
        try:
            await anyio.to_thread.run_sync(server.ready.wait, STARTUP_TIMEOUT)
            if not server.started:
                raise RuntimeError(f"the fake server did not start on {host}:{bound_port}")
            yield api_origin(host, bound_port), bound_port
        finally:
            server.should_exit = True
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join, STARTUP_TIMEOUT)
            sock.close()
