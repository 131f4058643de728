"""Waiting on pushes: results arrive by webhook, polls are only a safety net.

The fake delivers callbacks (``fake.webhook_sender``) to a ``WebhookReceiver``
in-process through ``httpx.ASGITransport``, with the service's habits: delays,
duplicates, drops, a callback that arrives before the submit answer. Each job must
end exactly once, a dropped callback must be caught by the safety-net poll, and
the events must be those of polling mode.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import httpx
import pytest

import apimart_async as am
from apimart_async.testing import FakeApimart, Latency, Webhooks
from apimart_async.types import CompletedEvent, SubmittedEvent
from apimart_async.webhooks import WebhookReceiver

from .conftest import FAST_LIMITS, ClientFor, until

pytestmark = pytest.mark.anyio

KEY = "test-key"
GEM = "gemini-3.1-flash-image-preview"
PUBLIC = "https://hooks.example.com/apimart"
# The safety-net poll comes after ~1.8 s here: a push (milliseconds) always beats it,
# however loaded the machine, so "no poll at all" proves the pushes were used.
PUSH_POLL = am.PollPolicy().scaled(0.01)


def jobs(count: int) -> list[dict[str, Any]]:
    return [{"model": GEM, "prompt": f"job {i}"} for i in range(count)]


async def run_many(
    fake: FakeApimart, client: am.AsyncApimart, receiver: WebhookReceiver, count: int, **kw: Any
) -> list[am.Outcome]:
    async with (
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)),
        client.generate_many(jobs(count), concurrency=count, **kw) as stream,
    ):
        return [o async for o in stream]


async def test_pushed_results_need_no_polls(client_for: ClientFor) -> None:
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.02), webhooks=Webhooks(delay=0.01))
    receiver = WebhookReceiver(public_url=PUBLIC)
    events: list[am.Event] = []
    async with client_for(fake, poll=PUSH_POLL) as client:
        outcomes = await run_many(
            fake, client, receiver, 20, webhook=receiver, on_event=events.append
        )
    assert all(o.ok for o in outcomes)
    assert fake.stats.polls == 0  # every job ended on its push
    bodies = [r.json_body for r in fake.requests if r.endpoint == "submit"]
    assert all(b is not None and b["webhook"] == receiver.webhook_url for b in bodies)
    kinds = Counter(e.kind for e in events)
    assert kinds["submitted"] == kinds["completed"] == 20


async def test_a_dropped_callback_is_caught_by_the_safety_net(client_for: ClientFor) -> None:
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.02), webhooks=Webhooks(drop=1.0))
    receiver = WebhookReceiver(public_url=PUBLIC)
    async with client_for(fake) as client:
        outcomes = await run_many(fake, client, receiver, 10, webhook=receiver)
    assert all(o.ok for o in outcomes)
    assert receiver.stats.received == 0
    assert 10 <= fake.stats.polls <= 30  # a few safety polls each, not a polling schedule


async def test_duplicate_callbacks_end_each_job_once(client_for: ClientFor) -> None:
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.02), webhooks=Webhooks(duplicate=1.0))
    receiver = WebhookReceiver(public_url=PUBLIC)
    events: list[am.Event] = []
    async with client_for(fake) as client:
        outcomes = await run_many(
            fake, client, receiver, 10, webhook=receiver, on_event=events.append
        )
    assert all(o.ok for o in outcomes) and len(outcomes) == 10
    assert sum(isinstance(e, CompletedEvent) for e in events) == 10
    assert receiver.stats.duplicates > 0


async def test_a_callback_before_the_submit_answer_is_still_matched(client_for: ClientFor) -> None:
    fake = FakeApimart(api_key=KEY, latency=Latency.zero(), webhooks=Webhooks(callback_first=True))
    receiver = WebhookReceiver(public_url=PUBLIC)
    async with client_for(fake, poll=PUSH_POLL) as client:
        outcomes = await run_many(fake, client, receiver, 5, webhook=receiver)
    assert all(o.ok for o in outcomes)
    assert fake.stats.polls == 0


async def test_a_client_wide_receiver_serves_generate(client_for: ClientFor) -> None:
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.02))
    receiver = WebhookReceiver(public_url=PUBLIC)
    events: list[am.Event] = []
    async with (
        client_for(fake, webhooks=receiver, poll=PUSH_POLL) as client,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)),
    ):
        task = await client.generate(model=GEM, prompt="pushed", on_event=events.append)
        own = await client.submit(model=GEM, prompt="own", webhook="https://elsewhere.example/cb")
    assert task.status is am.TaskStatus.COMPLETED
    assert fake.stats.polls == 0
    assert [e.kind for e in events if isinstance(e, SubmittedEvent | CompletedEvent)] == [
        "submitted",
        "completed",
    ]
    assert fake.tasks[own.id].webhook == "https://elsewhere.example/cb"  # the call's own


async def test_a_webhook_url_alone_is_sent_and_polling_goes_on(client_for: ClientFor) -> None:
    fake = FakeApimart(api_key=KEY)
    async with client_for(fake) as client:
        async with client.generate_many(jobs(3), webhook="https://hooks.example.com/x") as s:
            outcomes = [o async for o in s]
        with pytest.raises(am.InvalidRequestError, match="webhook"):
            async with client.generate_many(jobs(3), webhook="http://localhost/x"):
                pass
    assert all(o.ok for o in outcomes) and fake.stats.polls >= 3
    assert {t.webhook for t in fake.tasks.values()} == {"https://hooks.example.com/x"}


async def test_a_fastapi_app_mounting_the_receiver(client_for: ClientFor) -> None:
    from fastapi import FastAPI

    receiver = WebhookReceiver(public_url=PUBLIC)
    app = FastAPI()
    app.mount("/apimart", receiver)
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.02))
    async with (
        client_for(fake, webhooks=receiver, poll=PUSH_POLL, limits=FAST_LIMITS) as client,
        fake.webhook_sender(transport=httpx.ASGITransport(app=app)),
        client.generate_many(jobs(5)) as stream,
    ):
        outcomes = [o async for o in stream]
    assert all(o.ok for o in outcomes) and fake.stats.polls == 0
    assert receiver.stats.received == 5


async def test_leaving_early_then_late_pushes_disturb_nothing(
    client_for: ClientFor, caplog: pytest.LogCaptureFixture
) -> None:
    """Break out after the first outcome: the pushes that arrive afterwards find no
    job (no error, no traceback), and the tasks left running are the client's."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.05), webhooks=Webhooks(delay=0.05))
    receiver = WebhookReceiver(public_url=PUBLIC)
    async with (
        client_for(fake, poll=PUSH_POLL) as client,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)),
    ):
        async with client.generate_many(jobs(6), concurrency=6, webhook=receiver) as stream:
            async for _ in stream:
                break
        await until(lambda: receiver.stats.received >= 6)
        orphans = client.orphaned_tasks()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(orphans) == 5
