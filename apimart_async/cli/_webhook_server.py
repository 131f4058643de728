"""``--webhook-listen HOST:PORT``: the batch's ``WebhookReceiver``, served by uvicorn.

APIMart POSTs each finished task to ``<webhook>/callback`` (apimart-api.md §6.4); the
batch sends ``--webhook-public-url`` plus the receiver's secret path token as every
request's ``webhook``, and whatever public endpoint that URL names (a reverse proxy, a
tunnel) must forward to HOST:PORT here. ``serving()`` runs uvicorn for the receiver in
a task of the caller's task group, for as long as the batch runs:

* on asyncio, on the batch's own event loop (pushes reach the waiting jobs directly);
* on trio, which uvicorn does not support, in a worker thread with its own asyncio
  loop (the receiver hands each push over to the batch's loop; that is what
  ``anyio.from_thread`` is for).

The socket is bound before uvicorn starts, so ``--webhook-listen 127.0.0.1:0`` works
(the port is known at once) and no callback can arrive before anyone listens. uvicorn's
own signal handling is off: the batch's Ctrl-C handling stays in charge, and the server
is stopped by the batch (``should_exit``) once the batch is over, whether it ended,
failed or was interrupted; stopping waits for requests in progress for a second at
most.

What can go wrong: ``ServerUnavailable`` when uvicorn (the ``server`` extra) is not
installed; ``OSError`` from ``bind`` when the address cannot be bound (in use, not an
address of this machine), checked before the batch sends anything; ``RuntimeError``
when uvicorn does not start. The receiver never logs its
token, and uvicorn's access log is off (it would record the token in every path).
"""

from __future__ import annotations

import contextlib
import threading
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

if TYPE_CHECKING:
    import socket
    from collections.abc import AsyncGenerator, Generator

    from apimart_async.webhooks import WebhookReceiver

__all__ = ["ServerUnavailable", "listen_url", "parse_listen", "require_server", "serving"]

STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_SERVER_HINT = (
    "--webhook-listen needs uvicorn, from the server extra: pip install "
    "'apimart-async[server]' (from a checkout of the source: pip install '.[server]')"
)


class ServerUnavailable(Exception):
    """uvicorn (the ``server`` extra) is not installed."""


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6; ``:PORT`` for every interface) as a pair.

    Raises ``ValueError`` naming the problem.
    """
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"takes HOST:PORT (e.g. 127.0.0.1:8080 or :8080), got {text!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"the port must be 0-65535, got {port}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets ([::1]:8080), got {text!r}")
    return host or "0.0.0.0", port  # ":PORT" asks for every interface


def listen_url(host: str, port: int) -> str:
    """The local URL of a listener on *host*:*port* (what a fake's callbacks go to)."""
    if host in ("0.0.0.0", "::", ""):  # every interface: reach it on loopback
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def require_server() -> None:
    """Raise ``ServerUnavailable`` unless uvicorn can be imported."""
    try:
        import uvicorn  # noqa: F401  # pyright: ignore[reportUnusedImport]
    except ImportError:
        raise ServerUnavailable(_SERVER_HINT) from None


def _server(receiver: WebhookReceiver, ready: anyio.Event) -> Any:
    """A uvicorn server for *receiver* that sets *ready* (on the caller's event loop,
    from whichever thread it runs in) once its startup is over."""
    import uvicorn

    thread = threading.get_ident()
    token = anyio.lowlevel.current_token()

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None]:
            yield  # the batch handles SIGINT and SIGTERM, not uvicorn

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                await super().startup(sockets=sockets)
            finally:
                if threading.get_ident() == thread:
                    ready.set()
                else:
                    anyio.from_thread.run_sync(ready.set, token=token)

    config = uvicorn.Config(
        receiver,
        lifespan="off",
        log_config=None,
        log_level="warning",
        access_log=False,  # it would write the secret token of every callback's path
        interface="asgi3",
        ws="none",
        proxy_headers=False,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=1,
    )
    return Server(config)


@contextlib.asynccontextmanager
async def serving(
    receiver: WebhookReceiver, sock: socket.socket, *, backend: str
) -> AsyncGenerator[None]:
    """Serve *receiver* on the listening socket *sock* (``bind``) while the block runs.

    The socket stays the caller's to close. Raises ``ServerUnavailable`` or
    ``RuntimeError`` (uvicorn did not start) before the block runs.
    """
    require_server()
    ready = anyio.Event()  # startup is over, or the server ended before it was
    ended = anyio.Event()
    server = _server(receiver, ready)

    async def run() -> None:
        # Shielded: the batch stops it with should_exit (below), so that uvicorn shuts
        # down properly even when the batch was cancelled (Ctrl-C).
        with anyio.CancelScope(shield=True):
            try:
                if backend == "asyncio":
                    await server.serve(sockets=[sock])
                else:  # trio: uvicorn runs on asyncio, so in a thread of its own
                    await anyio.to_thread.run_sync(partial(server.run, sockets=[sock]))
            finally:
                ended.set()
                ready.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            with anyio.move_on_after(STARTUP_TIMEOUT):
                await ready.wait()
            if not server.started:
                host, port = sock.getsockname()[:2]
                raise RuntimeError(f"the webhook listener did not start on {host}:{port}")
            yield
        finally:
            server.should_exit = True
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(STOP_TIMEOUT):
                    await ended.wait()
                server.force_exit = True  # still busy: stop without waiting longer
