"""Listening sockets for the fake's servers (``fake.serve()`` and ``python -m
apimart_async.testing``): bound before the server starts, so a taken port fails at once
with the ``OSError`` that names it, before any request is sent, and port 0 tells its
number."""

from __future__ import annotations

import socket

__all__ = ["bind"]


def bind(host: str, port: int, *, backlog: int = 2048) -> socket.socket:
    """A TCP socket bound to *host*:*port* and listening (``OSError`` if it cannot be)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
