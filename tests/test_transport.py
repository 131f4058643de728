"""The transport seam over real loopback sockets: every failure becomes our error.

Each failure a network can produce is staged by a small TCP server (or none at all),
and checked on the production transport (aiohttp on asyncio) and on httpx's own pool
(asyncio and trio): the class, whether the request may have been sent (what decides
whether a paid submit may be retried), and whether retrying could help at all. Then
the same failures through the client: a submit that never left is retried or raised
plainly, one that may have arrived is ``SubmissionUncertainError``, a failed
certificate check is never retried.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
import trustme

import apimart_async as am
from apimart_async._transport import Request, Transport, open_transport
from apimart_async.testing import FakeApimart, Latency

from .conftest import until

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.parametrize(
        ("anyio_backend", "backend"),
        [("asyncio", "aiohttp"), ("asyncio", "httpx"), ("trio", "httpx")],
    ),
]

KEY = "sk-test-transport-0123456789"
CAP = 1 << 20
TIMEOUT = httpx.Timeout(2.0)
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


def seam(backend: str, connections: int = 10) -> Transport:
    """Our own pool on *backend*, as a client would build it."""
    return open_transport(
        connections=connections,
        backend=backend,  # type: ignore[arg-type]
        http_client=None,
        transport=None,
    )


def request(url: str, timeout: httpx.Timeout = TIMEOUT, method: str = "GET") -> Request:
    return Request(method, url, {"Authorization": f"Bearer {KEY}"}, None, timeout)


async def read_request(stream: anyio.abc.SocketStream) -> bytes:
    """Read until the end of the request head (our requests carry no body here)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive()
    return data


@asynccontextmanager
async def server(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """A loopback TCP server running *handler* per connection; yields its base URL."""
    listener: anyio.abc.Listener[Any] = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    if tls is not None:
        from anyio.streams.tls import TLSListener

        listener = TLSListener(listener, tls, standard_compatible=False)

    async def guarded(stream: anyio.abc.SocketStream) -> None:
        try:
            async with stream:
                await handler(stream)
        except (anyio.BrokenResourceError, anyio.EndOfStream, ssl.SSLError, OSError):
            pass  # the client went away, which some tests are about

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, guarded)
        try:
            yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


def closed_port() -> str:
    """A loopback URL nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def expect(
    backend: str, req: Request, cls: type[am.ApimartError], **attrs: Any
) -> am.ApimartError:
    """The error *req* raises through the seam, checked for its class and *attrs*."""
    transport = seam(backend)
    try:
        with anyio.fail_after(10), pytest.raises(cls) as info:
            await transport.exchange(req, CAP)
    finally:
        await transport.aclose()
    for name, value in attrs.items():
        assert getattr(info.value, name) == value, (name, info.value)
    return info.value


# -- the mapping, failure by failure ----------------------------------------------------------


async def test_refused_connection_was_never_sent(backend: str) -> None:
    error = await expect(backend, request(closed_port()), am.APIConnectionError, sent=False)
    assert not isinstance(error, am.APITimeoutError) and error.retryable


async def test_connect_timeout_was_never_sent(backend: str) -> None:
    """A listener whose backlog is full drops our SYN: the connection never happens."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler = socket.create_connection(full.getsockname())  # fills the backlog
        try:
            url = "http://{}:{}".format(*full.getsockname())
            timeout = httpx.Timeout(2.0, connect=0.2)
            await expect(backend, request(url, timeout), am.APITimeoutError, sent=False)
        finally:
            filler.close()


async def test_disconnect_after_the_request_may_have_been_received(backend: str) -> None:
    async def hang_up(stream: anyio.abc.SocketStream) -> None:
        await read_request(stream)  # the server has it all, then closes

    async with server(hang_up) as base:
        await expect(backend, request(base + "/v1/tasks/t"), am.APIConnectionError, sent=True)


async def test_truncated_body_was_sent(backend: str) -> None:
    async def truncate(stream: anyio.abc.SocketStream) -> None:
        await read_request(stream)
        await stream.send(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"code":')

    async with server(truncate) as base:
        await expect(backend, request(base + "/v1/tasks/t"), am.APIConnectionError, sent=True)


async def test_no_answer_is_a_timeout_after_sending(backend: str) -> None:
    async def silent(stream: anyio.abc.SocketStream) -> None:
        await read_request(stream)
        await anyio.sleep_forever()

    async with server(silent) as base:
        timeout = httpx.Timeout(0.3)
        await expect(backend, request(base + "/x", timeout), am.APITimeoutError, sent=True)


async def test_bodies_over_the_cap_are_refused(backend: str) -> None:
    big = b"x" * (CAP + 1)

    async def declared(stream: anyio.abc.SocketStream) -> None:
        await read_request(stream)
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)

    async def chunked(stream: anyio.abc.SocketStream) -> None:
        await read_request(stream)
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        await stream.send(head + b"%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n")

    for handler in (declared, chunked):
        async with server(handler) as base:
            error = await expect(backend, request(base + "/x"), am.APIResponseValidationError)
            assert "cap" in str(error)


async def test_failed_certificate_check_is_not_retryable(backend: str) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)

    async def answer(stream: anyio.abc.SocketStream) -> None:
        await read_request(stream)
        await stream.send(OK)

    async with server(answer, tls=context) as base:
        error = await expect(backend, request(base + "/x"), am.APIConnectionError, sent=False)
    assert error.retryable is False and "certificate" in str(error).lower()


async def test_no_free_connection_within_the_pool_timeout_sends_nothing(backend: str) -> None:
    """While the only connection is busy, a call with a 50 ms pool timeout never starts."""
    release = anyio.Event()
    heads: list[bytes] = []

    async def slow(stream: anyio.abc.SocketStream) -> None:
        heads.append(await read_request(stream))
        await release.wait()
        await stream.send(OK)

    transport = seam(backend, connections=1)
    try:
        async with server(slow) as base, anyio.create_task_group() as tg:
            tg.start_soon(transport.exchange, request(base + "/first"), CAP)
            await until(lambda: heads)
            with pytest.raises(am.APITimeoutError) as info:
                await transport.exchange(
                    request(base + "/second", httpx.Timeout(5.0, pool=0.05)), CAP
                )
            release.set()
    finally:
        await transport.aclose()
    assert info.value.sent is False
    assert len(heads) == 1  # the timed-out call never reached the server


async def test_calls_beyond_the_pool_wait_their_turn(backend: str) -> None:
    """40 concurrent calls on 3 connections: all answered, never more than 3 at once."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fast(request_latency=(0.002, 0.004)))
    transport = seam(backend, connections=3)
    statuses: list[int] = []
    try:
        async with fake.serve() as base:

            async def one() -> None:
                exchange = await transport.exchange(request(base + "/v1/tasks/task_unknown"), CAP)
                statuses.append(exchange.status)

            async with anyio.create_task_group() as tg:
                for _ in range(40):
                    tg.start_soon(one)
    finally:
        await transport.aclose()
    assert statuses == [400] * 40
    assert fake.stats.max_in_flight <= 3


async def test_a_slot_comes_back_after_a_failed_call(backend: str) -> None:
    """A call that fails (body over the cap) still frees its slot for the next one."""
    fake = FakeApimart(api_key=KEY)
    transport = seam(backend, connections=1)
    try:
        async with fake.serve() as base:
            url = base + "/v1/tasks/task_unknown"
            with anyio.fail_after(5):  # a leaked slot would block the last call forever
                for _ in range(3):
                    with pytest.raises(am.APIResponseValidationError, match="cap"):
                        await transport.exchange(request(url), 1)
                exchange = await transport.exchange(request(url), CAP)
    finally:
        await transport.aclose()
    assert exchange.status == 400


async def test_a_stream_cut_short_maps_like_an_exchange(backend: str) -> None:
    """A download whose body stops halfway: our error, raised while reading."""

    async def half(stream: anyio.abc.SocketStream) -> None:
        await read_request(stream)
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"\x89PNG" * 10)

    transport = seam(backend)
    try:
        async with server(half) as base, transport.stream(request(base + "/f/a.png")) as streamed:
            assert streamed.status == 200
            with pytest.raises(am.APIConnectionError) as info:
                async for _ in streamed.chunks:
                    pass
    finally:
        await transport.aclose()
    assert info.value.sent is True


# -- through the client: what each failure means for a paid submit ----------------------------


def client(base: str, backend: str) -> am.AsyncApimart:
    return am.AsyncApimart(api_key=KEY, base_url=base, transport_backend=backend)  # type: ignore[arg-type]


async def test_a_submit_that_never_connected_is_not_uncertain(backend: str) -> None:
    async with client(closed_port(), backend) as c:
        with pytest.raises(am.APIConnectionError) as info:
            await c.submit(model="imagen-4.0-apimart", prompt="p")
    assert not isinstance(info.value, am.SubmissionUncertainError) and info.value.sent is False


async def test_a_submit_dropped_after_sending_is_uncertain(backend: str) -> None:
    heads: list[bytes] = []

    async def hang_up(stream: anyio.abc.SocketStream) -> None:
        heads.append(await read_request(stream))

    async with server(hang_up) as base, client(base, backend) as c:
        with pytest.raises(am.SubmissionUncertainError) as info:
            await c.submit(model="imagen-4.0-apimart", prompt="p", idempotency_key="key-drop")
    assert info.value.idempotency_key == "key-drop"
    assert len(heads) == 1  # never resent: a second attempt could pay twice


async def test_a_failed_certificate_check_is_never_retried(backend: str) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    handshakes: list[int] = []

    async def count(stream: anyio.abc.SocketStream) -> None:
        handshakes.append(1)
        await read_request(stream)

    async with server(count, tls=context) as base, client(base, backend) as c:
        with pytest.raises(am.APIConnectionError) as info:
            await c.get_task("task_1")
        with pytest.raises(am.APIConnectionError):
            await c.submit(model="imagen-4.0-apimart", prompt="p")
    assert info.value.retryable is False
    assert len(handshakes) <= 2  # one attempt each, not five


def _header_names(head: bytes) -> list[str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [line.split(":", 1)[0].lower() for line in lines if line]


async def test_api_calls_ask_for_identity_and_downloads_carry_no_library_headers(
    backend: str,
) -> None:
    """An API call names its own User-Agent, Accept and ``Accept-Encoding: identity``
    (the body cap then bounds the bytes held), each once; a download sends none of
    the library's own (no User-Agent, no Accept-Encoding) and no key."""
    heads: list[bytes] = []

    async def record(stream: anyio.abc.SocketStream) -> None:
        heads.append(await read_request(stream))
        await stream.send(OK)

    async with server(record) as base:
        async with client(base, backend) as c:
            with pytest.raises(am.ApimartError):
                await c.get_task("task_1")  # "{}" is no task: the head is what counts
        transport = seam(backend)
        try:
            async with transport.stream(Request("GET", base + "/f/a.png", {}, None, TIMEOUT)):
                pass
        finally:
            await transport.aclose()
    api, download = heads[0], heads[-1]
    names = _header_names(api)
    assert b"\r\nAccept-Encoding: identity\r\n" in api
    for name in ("accept-encoding", "accept", "user-agent", "authorization"):
        assert names.count(name) == 1, (name, api)
    assert b"apimart-async/" in api.lower()
    download_names = _header_names(download)
    if backend == "aiohttp":  # httpx's own pool sends its defaults, as it always did
        assert "user-agent" not in download_names and "accept-encoding" not in download_names
    assert "authorization" not in download_names
