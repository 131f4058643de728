"""An httpx async transport that calls the fake's ASGI app directly: no sockets.

Why not ``httpx.ASGITransport``: it cannot express connection faults (it would turn
the app's ``ConnectionDrop`` into a generic exception), and it does not enforce the
request's read timeout. This one maps each drop onto the httpx error a real socket
would produce, and wraps the app call in ``anyio.fail_after(read timeout)`` so a
stalled answer trips the client's timeout in process exactly as it would over TCP.

What can go wrong: the whole request body is read into memory before the app runs
(fine for the service's 20 MB cap), and the read timeout bounds the whole answer
rather than each socket read, which is stricter than httpx over TCP only for answers
that trickle in, which the fake never sends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import httpx

from ._asgi import ConnectionDrop, Message

if TYPE_CHECKING:
    from ._app import App
    from ._asgi import Scope

__all__ = ["FakeTransport"]


class FakeTransport(httpx.AsyncBaseTransport):
    """Send httpx requests to a ``FakeApimart`` in the same process.

    Get one from ``FakeApimart.transport()``; any number of transports (and clients)
    may share one fake. The URL's host is passed through, so result and upload URLs on
    another host (the file host) reach the same fake, as they do in server mode.
    """

    def __init__(self, app: App) -> None:
        self._app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {}).get("read")
        try:
            if timeout is None:
                return await self._call(request)
            with anyio.fail_after(timeout):
                return await self._call(request)
        except TimeoutError:
            msg = "timed out waiting for the fake's answer"
            raise httpx.ReadTimeout(msg, request=request) from None
        except ConnectionDrop as drop:
            if drop.kind == "connect_error":
                msg = "[Errno 111] Connection refused"
                raise httpx.ConnectError(msg, request=request) from None
            if drop.kind == "reset":
                msg = "[Errno 104] Connection reset by peer"
                raise httpx.ReadError(msg, request=request) from None
            msg = "peer closed connection without sending complete message body"
            raise httpx.RemoteProtocolError(msg, request=request) from None

    async def _call(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        url = request.url
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": url.scheme,
            "path": url.path,
            "raw_path": url.raw_path.split(b"?", 1)[0],
            "query_string": url.query,
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "server": (url.host, url.port or (443 if url.scheme == "https" else 80)),
            "client": ("127.0.0.1", 0),
            "extensions": {},
        }
        body_sent = False
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            # Nobody disconnects in process: wait until cancelled (e.g. a stall that
            # trips the read timeout, or the stall's own deadline).
            await anyio.sleep_forever()
            raise AssertionError("unreachable")  # pragma: no cover

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers.extend(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunk: bytes = message.get("body", b"")
                if chunk:
                    chunks.append(chunk)

        await self._app(scope, receive, send)
        if not status:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            )
        return httpx.Response(
            status,
            headers=headers,
            stream=httpx.ByteStream(b"".join(chunks)),
            extensions={"http_version": b"HTTP/1.1"},
        )
