"""The aiohttp transport's connection slots (``_aiohttp._Slots``), asyncio only.

Calls beyond the pool wait here, first come first served, with one shared timer for
their pool timeouts; a slot must never be lost or handed out twice, whatever the
waiters do (time out, get cancelled just as they are served).
"""

from __future__ import annotations

import asyncio

import anyio
import pytest

pytest.importorskip("aiohttp")

from apimart_async._aiohttp import (
    _PoolTimeout,  # pyright: ignore[reportPrivateUsage]
    _Slots,  # pyright: ignore[reportPrivateUsage]
)

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


async def test_the_aiohttp_slot_queue_never_loses_a_slot() -> None:
    """aiohttp's connection slots: a waiter that times out leaves no hole, one
    cancelled just after being handed a slot passes it on, waiters are served in
    order, and every slot comes back."""
    slots = _Slots(1)
    assert slots.take_now()
    assert not slots.take_now()
    with pytest.raises(_PoolTimeout):
        await slots.take(0.01)  # the only slot is held
    served: list[str] = []

    async def wait_for_slot(name: str) -> None:
        await slots.take(None)
        served.append(name)

    first = asyncio.create_task(wait_for_slot("first"))
    second = asyncio.create_task(wait_for_slot("second"))
    third = asyncio.create_task(wait_for_slot("third"))
    await asyncio.sleep(0)  # all three queued, in this order
    slots.release()  # handed to "first"...
    first.cancel()  # ...which is cancelled before it resumes: "second" gets it
    with anyio.fail_after(5):
        await second
        assert not third.done()
        slots.release()
        await third
    assert first.cancelled()
    assert served == ["second", "third"]
    slots.release()
    assert slots.take_now()  # the one slot is back, and only one
    assert not slots.take_now()

    # Pool timeouts share one timer: a later waiter with a shorter timeout still
    # times out on time, the earlier one waits on and is served next.
    patient = asyncio.create_task(slots.take(30.0))
    hasty = asyncio.create_task(slots.take(0.01))
    with anyio.fail_after(5):
        with pytest.raises(_PoolTimeout):
            await hasty
        assert not patient.done()
        slots.release()
        await patient
    assert not slots.take_now()
