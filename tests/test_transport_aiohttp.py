"""Our aiohttp transport's API fast path over real loopback HTTP (asyncio only).

API calls beyond the pool queue on the transport's own semaphore, not in aiohttp's
connector; these check that the queue bounds requests in flight, that a slot always
comes back (errors included), and that a wait past the pool timeout is httpx's
``PoolTimeout`` (nothing sent), which the client may retry even for a submit.
"""

from __future__ import annotations

import anyio
import httpx
import pytest

from apimart_async._aiohttp import AiohttpTransport
from apimart_async.testing import FakeApimart, Latency

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = httpx.Timeout(5.0)


async def test_calls_beyond_the_pool_wait_their_turn() -> None:
    """40 concurrent calls on 3 connections: all answered, never more than 3 at once."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fast(request_latency=(0.002, 0.004)))
    transport = AiohttpTransport(max_connections=3)
    statuses: list[int] = []
    async with fake.serve() as base:

        async def one() -> None:
            status, _, _ = await transport.exchange(
                "GET", f"{base}/v1/tasks/task_unknown", HEADERS, None, TIMEOUT, 1 << 20
            )
            statuses.append(status)

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(40):
                    tg.start_soon(one)
        finally:
            await transport.aclose()
    assert len(statuses) == 40
    assert fake.stats.max_in_flight <= 3


async def test_a_slot_comes_back_after_a_failed_call() -> None:
    """A call that fails (body over the cap) still frees its slot for the next one."""
    fake = FakeApimart(api_key=KEY)
    transport = AiohttpTransport(max_connections=1)
    async with fake.serve() as base:
        url = f"{base}/v1/tasks/task_unknown"
        try:
            with anyio.fail_after(5):  # a leaked slot would block the last call forever
                for _ in range(3):
                    with pytest.raises(Exception, match="cap"):
                        await transport.exchange("GET", url, HEADERS, None, TIMEOUT, 1)
                status, _, _ = await transport.exchange("GET", url, HEADERS, None, TIMEOUT, 1 << 20)
        finally:
            await transport.aclose()
    assert status == 400


async def test_no_free_connection_within_the_pool_timeout_is_a_pool_timeout() -> None:
    """While the one connection is busy, a call with a 50 ms pool timeout never starts."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fast(request_latency=(0.5, 0.5)))
    transport = AiohttpTransport(max_connections=1)
    async with fake.serve() as base:
        url = f"{base}/v1/tasks/task_unknown"
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(transport.exchange, "GET", url, HEADERS, None, TIMEOUT, 1 << 20)
                await anyio.sleep(0.1)  # the slow call holds the only slot
                with pytest.raises(httpx.PoolTimeout):
                    await transport.exchange(
                        "GET", url, HEADERS, None, httpx.Timeout(5.0, pool=0.05), 1 << 20
                    )
        finally:
            await transport.aclose()
    assert fake.stats.requests_total == 1  # the timed-out call never reached the server
