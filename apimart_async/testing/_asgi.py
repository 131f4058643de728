"""The ASGI 3 types the fake uses, and how the app tells its host to drop a connection.

One ASGI app serves both the in-process transport and uvicorn, so a connection-level
fault has to be expressed in plain ASGI. The app sends ``http.response.start`` (with a
``Content-Length`` it will never honour) and then raises ``ConnectionDrop``:

- the in-process transport catches ``ConnectionDrop`` and raises the httpx error that
  matches ``kind`` (``ConnectError``, ``ReadError`` or ``RemoteProtocolError``);
- uvicorn sees an exception after the response started and closes the socket, so a
  real client gets a truncated response (``httpx.RemoteProtocolError``). Over real
  HTTP every drop is therefore a drop *after the headers*; a TCP reset before any byte
  or a refused connection cannot be produced from inside an ASGI app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

__all__ = ["ConnectionDrop", "DropKind", "Message", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DropKind = Literal["connect_error", "reset", "drop_after"]


class ConnectionDrop(Exception):
    """Raised by the app to make its host drop the connection (see the module doc)."""

    def __init__(self, kind: DropKind) -> None:
        super().__init__(kind)
        self.kind: DropKind = kind
