"""FakeApimart's webhook callbacks (apimart-api.md §6.4): what is sent, where, when, how
often, and what the fake does when the receiver misbehaves.

The receiver is a tiny ASGI app of the test's own (reached in process through
``httpx.ASGITransport``, or over loopback HTTP), so these tests check the fake alone.
Nothing is timed: ``await sender.drain()`` returns once every scheduled attempt is over.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest

from apimart_async.testing import FakeApimart, Fault, Latency, Webhooks
from apimart_async.testing._server import serve_in_thread
from apimart_async.testing._webhooks import callback_url

pytestmark = pytest.mark.anyio

API = "https://api.apimart.ai"
HOOK = "https://hooks.example.com/apimart"
FAST = Webhooks(retry_delays=(10.0, 30.0, 60.0))  # x time_scale 0.001: 10/30/60 ms


@dataclass
class Call:
    """One POST the receiver got."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Receiver:
    """An ASGI receiver that records each POST and answers the next scripted status
    (then ``default``); ``raise`` as a status makes it crash like a buggy app."""

    statuses: list[int | str] = field(default_factory=list[int | str])
    default: int = 200
    calls: list[Call] = field(default_factory=list[Call])
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with self.lock:
            self.calls.append(Call(scope["path"], headers, json.loads(body)))
            status = self.statuses.pop(0) if self.statuses else self.default
        if status == "raise":
            raise RuntimeError("receiver bug")
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def ids(self) -> list[str]:
        """The task ids of the calls, in arrival order."""
        return [c.body["data"]["id"] for c in self.calls]


def api(fake: FakeApimart) -> httpx.AsyncClient:
    """A plain httpx client to the fake's API, with its key."""
    return httpx.AsyncClient(
        transport=fake.transport(),
        base_url=API,
        headers={"Authorization": f"Bearer {fake.api_key}"},
    )


async def submit(c: httpx.AsyncClient, webhook: str | None = HOOK, **body: Any) -> str:
    """Submit (with a webhook unless None) and return the task id."""
    payload: dict[str, Any] = {"model": "imagen-4.0-apimart", "prompt": "x", **body}
    if webhook is not None:
        payload["webhook"] = webhook
    response = await c.post("/v1/images/generations", json=payload)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["data"][0]["task_id"]
    return task_id


def results(fake: FakeApimart) -> list[tuple[int, str, int | None]]:
    """``(attempt, result, status)`` of every recorded delivery."""
    return [(d.attempt, d.result, d.status) for d in fake.webhook_deliveries]


# -- what is sent where -------------------------------------------------------------------


async def test_callback_is_the_task_query_body_posted_to_callback() -> None:
    """A completed task's callback: POST <webhook>/callback with exactly what GET
    /v1/tasks/{id} answers, JSON, and no Authorization header."""
    fake = FakeApimart(api_key="sk-secret-key-123", webhooks=FAST)
    receiver = Receiver()
    async with (
        api(fake) as c,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        task_id = await submit(c, n=1)
        await sender.drain()
        queried = (await c.get(f"/v1/tasks/{task_id}")).json()
    (call,) = receiver.calls
    assert call.path == "/apimart/callback"
    assert call.body == queried and call.body["data"]["status"] == "completed"
    assert call.headers["content-type"] == "application/json"
    assert "authorization" not in call.headers
    assert "sk-secret-key-123" not in json.dumps(call.headers)
    (delivery,) = fake.webhook_deliveries
    assert (delivery.task_id, delivery.attempt, delivery.result) == (task_id, 1, "delivered")
    assert delivery.url == delivery.target == f"{HOOK}/callback"
    assert fake.task(task_id).delivered_at is not None
    assert fake.stats.webhooks_delivered == fake.stats.webhook_attempts == 1
    assert fake.pending_webhooks == 0


async def test_failed_tasks_are_called_back_and_unfinished_ones_never() -> None:
    """Terminal states only: a failed task is pushed (with its error), a stuck one never;
    a task without a webhook is not called back either."""
    fake = FakeApimart(latency=Latency.zero(), webhooks=FAST)
    fake.script("task", [Fault.TASK_FAILED, Fault.TASK_STUCK, None])
    receiver = Receiver()
    async with (
        api(fake) as c,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        failed = await submit(c)
        stuck = await submit(c)
        plain = await submit(c, webhook=None)
        await sender.drain()
    assert receiver.ids() == [failed]
    body = receiver.calls[0].body["data"]
    assert body["status"] == "failed" and body["cost"] == 0 and "error" in body
    assert fake.status_of(stuck) == "processing" and fake.status_of(plain) == "completed"


@pytest.mark.parametrize(
    ("webhook", "expected"),
    [
        ("https://hooks.example.com/x/", "https://hooks.example.com/x/callback"),
        ("https://hooks.example.com/x", "https://hooks.example.com/x/callback"),
        ("https://hooks.example.com", "https://hooks.example.com/callback"),
        ("http://hooks.example.com:80/a?t=1", "http://hooks.example.com:80/a/callback?t=1"),
        ("HTTPS://Hooks.Example.com:443/", "https://Hooks.Example.com:443/callback"),
        ("http://203.0.113.9/", None),  # documentation range: not public
        ("http://8.8.8.8/h", "http://8.8.8.8/h/callback"),
        ("https://hooks.example.com:8443/x", None),
        ("ftp://hooks.example.com/x", None),
        ("https://api.apimart.ai/x", None),
        ("https://apimart.ai/x", None),
        ("https://upload.apib.ai/x", None),
        ("http://localhost/x", None),
        ("http://127.0.0.1/x", None),
        ("http://[::1]/x", None),
        ("http://10.1.2.3/x", None),
        ("http://192.168.0.2/x", None),
        ("https://user:pw@hooks.example.com/x", None),
        ("https://hooks.example.com:99999/x", None),
        ("not a url", None),
        ("", None),
    ],
)
def test_callback_url_rules(webhook: str, expected: str | None) -> None:
    """``<webhook>/callback`` with the slash normalised; refused URLs give None (§6.4)."""
    assert callback_url(webhook) == expected


async def test_refused_urls_are_dropped_silently() -> None:
    """A webhook URL the service would refuse does not fail the submit; nothing is sent."""
    fake = FakeApimart(latency=Latency.zero(), webhooks=FAST)
    receiver = Receiver()
    async with (
        api(fake) as c,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        task_id = await submit(c, webhook="https://hooks.example.com:8080/x")
        await sender.drain()
    assert receiver.calls == [] and fake.status_of(task_id) == "completed"
    assert results(fake) == [(0, "refused", None)]
    assert fake.stats.webhooks_refused == 1 and fake.stats.webhook_attempts == 0


async def test_a_webhook_that_is_not_a_string_is_a_400() -> None:
    """``webhook`` must be a string; anything else is refused before a task exists."""
    fake = FakeApimart()
    async with api(fake) as c:
        response = await c.post(
            "/v1/images/generations",
            json={"model": "imagen-4.0-apimart", "prompt": "x", "webhook": {"url": HOOK}},
        )
    assert response.status_code == 400 and "webhook" in response.json()["error"]["message"]
    assert fake.stats.tasks_created == 0


# -- retries, give-ups, drops, duplicates ---------------------------------------------------


async def test_5xx_is_retried_until_a_2xx() -> None:
    """No 2xx (a 503, then a 302, then a crash of the receiver) is retried on the
    10/30/60 s schedule (scaled); the fourth attempt succeeds."""
    fake = FakeApimart(webhooks=FAST)
    receiver = Receiver(statuses=[503, 302, "raise"])
    async with (
        api(fake) as c,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        task_id = await submit(c)
        await sender.drain()
    assert receiver.ids() == [task_id] * 4
    assert results(fake) == [
        (1, "retry", 503),
        (2, "retry", 302),
        (3, "retry", None),
        (4, "delivered", 200),
    ]
    assert "receiver bug" in (fake.webhook_deliveries[2].error or "")
    ends = [d.at for d in fake.webhook_deliveries]
    # Each retry waits its delay (10/30/60 ms) after the previous attempt ended: lower
    # bounds only, which a slow machine can only exceed.
    assert ends[1] - ends[0] >= 0.010 and ends[2] - ends[1] >= 0.030
    assert ends[3] - ends[2] >= 0.060
    assert fake.stats.webhooks_delivered == 1 and fake.stats.webhook_attempts == 4


async def test_gives_up_after_the_last_retry() -> None:
    """Four attempts without a 2xx (first plus three retries): the callback is abandoned."""
    fake = FakeApimart(webhooks=FAST)
    receiver = Receiver(default=500)
    async with (
        api(fake) as c,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        await submit(c)
        await sender.drain()
    assert [r for _, r, _ in results(fake)] == ["retry", "retry", "retry", "exhausted"]
    assert len(receiver.calls) == 4 and fake.stats.webhooks_gave_up == 1
    assert fake.stats.webhooks_delivered == 0


async def test_a_4xx_ends_the_delivery_at_once() -> None:
    """A 4xx answer: the service gives up without retrying."""
    fake = FakeApimart(webhooks=FAST)
    receiver = Receiver(statuses=[404])
    async with (
        api(fake) as c,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        await submit(c)
        await sender.drain()
    assert results(fake) == [(1, "rejected", 404)] and len(receiver.calls) == 1


async def test_unreachable_receiver_is_retried() -> None:
    """A connection that cannot be made counts as no answer, like a 5xx."""
    fake = FakeApimart(webhooks=Webhooks(retry_delays=(0.0,)))

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with api(fake) as c, fake.webhook_sender(transport=httpx.MockTransport(refuse)) as s:
        await submit(c)
        await s.drain()
    assert results(fake) == [(1, "retry", None), (2, "exhausted", None)]
    assert "ConnectError" in (fake.webhook_deliveries[0].error or "")


async def test_failures_before_success_are_lost_on_the_way() -> None:
    """``failures=2``: two attempts never reach the receiver, the third does."""
    fake = FakeApimart(webhooks=Webhooks(failures=2, retry_delays=(0.0, 0.0, 0.0)))
    receiver = Receiver()
    async with (
        api(fake) as c,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        task_id = await submit(c)
        await sender.drain()
    assert receiver.ids() == [task_id]
    assert results(fake) == [(1, "retry", None), (2, "retry", None), (3, "delivered", 200)]
    assert fake.webhook_deliveries[0].target is None


async def test_drops_and_duplicates() -> None:
    """``drop=1``: never sent; ``duplicate=1``: every delivered callback comes twice."""
    dropping = FakeApimart(webhooks=Webhooks(drop=1.0))
    receiver = Receiver()
    async with (
        api(dropping) as c,
        dropping.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        await submit(c)
        await sender.drain()
    assert receiver.calls == [] and results(dropping) == [(0, "dropped", None)]
    assert dropping.stats.webhooks_dropped == 1

    doubling = FakeApimart(webhooks=Webhooks(duplicate=1.0))
    receiver = Receiver()
    async with (
        api(doubling) as c,
        doubling.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        task_id = await submit(c)
        await sender.drain()
    assert receiver.ids() == [task_id, task_id]
    assert [d.duplicate for d in doubling.webhook_deliveries] == [False, True]
    assert doubling.stats.webhooks_delivered == 1 and doubling.stats.webhook_duplicates == 1


async def test_drop_rate_is_drawn_per_callback() -> None:
    """With ``drop=0.3`` over 200 tasks, some callbacks are lost and most arrive, each
    task at most once (no duplicates asked for)."""
    fake = FakeApimart(webhooks=Webhooks(drop=0.3), seed=3)
    receiver = Receiver()
    async with (
        api(fake) as c,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        ids = [await submit(c) for _ in range(200)]
        await sender.drain()
    arrived = set(receiver.ids())
    assert len(arrived) == len(receiver.calls) == fake.stats.webhooks_delivered
    assert 100 < len(arrived) < 190 and arrived <= set(ids)
    assert fake.stats.webhooks_dropped == 200 - len(arrived)


# -- timing and the sender's lifecycle -------------------------------------------------------


async def test_callback_can_arrive_before_the_submit_answer() -> None:
    """``callback_first``: the receiver has the callback before the client has the id."""
    fake = FakeApimart(latency=Latency.zero(), webhooks=Webhooks(callback_first=True))
    receiver = Receiver()
    async with (
        api(fake) as c,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        task_id = await submit(c)
        seen_when_answered = list(receiver.ids())
        await sender.drain()
    assert seen_when_answered == [task_id]


async def test_callback_first_does_not_hold_without_a_sender() -> None:
    """Without a running sender the submit is answered at once; the callback waits for
    the next sender, which delivers it."""
    fake = FakeApimart(latency=Latency.zero(), webhooks=Webhooks(callback_first=True))
    receiver = Receiver()
    async with api(fake) as c:
        task_id = await submit(c)
        assert fake.pending_webhooks == 1
        async with fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as s:
            await s.drain()
    assert receiver.ids() == [task_id]


async def test_delay_is_scaled_after_the_terminal_state() -> None:
    """The first attempt goes out ``delay`` service seconds (scaled) after the end."""
    fake = FakeApimart(webhooks=Webhooks(delay=20.0))  # 20 ms at the fast scale
    receiver = Receiver()
    async with (
        api(fake) as c,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        task_id = await submit(c)
        await sender.drain()
    (delivery,) = fake.webhook_deliveries
    assert delivery.at >= fake.task(task_id).completes_at + 0.020


async def test_only_one_sender_at_a_time_and_a_stopped_sender_hands_over() -> None:
    """A second sender is refused; attempts not sent when a sender stops go out with
    the next one."""
    fake = FakeApimart(latency=Latency.fixed(1.0, time_scale=0.05), webhooks=FAST)
    receiver = Receiver()
    transport = httpx.ASGITransport(app=receiver)
    async with api(fake) as c:
        async with fake.webhook_sender(transport=transport):
            with pytest.raises(RuntimeError, match="already runs"):
                async with fake.webhook_sender():
                    pass
            task_id = await submit(c)
        assert receiver.calls == [] and fake.pending_webhooks == 1
        async with fake.webhook_sender(transport=transport) as sender:
            await sender.drain()
    assert receiver.ids() == [task_id]


async def test_rewrite_routes_the_public_url() -> None:
    """A prefix mapping (or a function) sends the callback somewhere else; the record
    keeps both URLs."""
    fake = FakeApimart(webhooks=FAST)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(204)

    rewrite = {"https://hooks.example.com": "http://receiver.test:8080", "https://x.org": "z"}
    async with (
        api(fake) as c,
        fake.webhook_sender(transport=httpx.MockTransport(handler), rewrite=rewrite) as sender,
    ):
        await submit(c)
        await sender.drain()
    assert seen == ["http://receiver.test:8080/apimart/callback"]
    (delivery,) = fake.webhook_deliveries
    assert delivery.url == f"{HOOK}/callback" and delivery.target == seen[0]
    assert delivery.result == "delivered" and delivery.status == 204


async def test_many_callbacks_in_process() -> None:
    """500 tasks with webhooks: every callback arrives exactly once."""
    fake = FakeApimart(webhooks=FAST, record_requests=False)
    receiver = Receiver()
    async with (
        api(fake) as c,
        fake.webhook_sender(transport=httpx.ASGITransport(app=receiver)) as sender,
    ):
        async with anyio.create_task_group() as tg:
            for _ in range(500):
                tg.start_soon(submit, c)
        await sender.drain()
    assert len(receiver.calls) == len(set(receiver.ids())) == 500
    assert fake.stats.webhooks_delivered == 500 and fake.webhook_deliveries == []


# -- real HTTP --------------------------------------------------------------------------------


async def test_serve_sends_callbacks_over_http() -> None:
    """``fake.serve()`` runs its own sender: a real HTTP submit leads to a real HTTP
    callback to a loopback receiver (the public URL rewritten onto it)."""
    fake = FakeApimart(webhooks=FAST)
    receiver = Receiver()
    async with (
        serve_in_thread(receiver, "127.0.0.1", 0) as (receiver_url, _),  # type: ignore[arg-type]
        fake.serve(webhook_rewrite={"https://hooks.example.com": receiver_url}) as url,
    ):
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {fake.api_key}"}
        ) as c:
            task_id = await submit(c)
        for _ in range(3000):  # at most 30 s: a bound, not a timing assertion
            if fake.stats.webhooks_delivered:
                break
            await anyio.sleep(0.01)
        with pytest.raises(RuntimeError, match="already runs"):
            async with fake.webhook_sender():
                pass
    assert receiver.ids() == [task_id] and receiver.calls[0].path == "/apimart/callback"
    assert fake.webhook_deliveries[0].target == f"{receiver_url}/apimart/callback"


async def test_sender_posts_over_real_http_by_default() -> None:
    """Without a transport the sender uses real HTTP; a rewrite function routes the
    public URL to a loopback receiver."""
    fake = FakeApimart(webhooks=FAST)
    receiver = Receiver(statuses=[502])
    async with serve_in_thread(receiver, "127.0.0.1", 0) as (receiver_url, _):  # type: ignore[arg-type]

        def to_loopback(url: str) -> str:
            return url.replace("https://hooks.example.com", receiver_url)

        async with api(fake) as c, fake.webhook_sender(rewrite=to_loopback) as sender:
            task_id = await submit(c)
            await sender.drain()
    assert receiver.ids() == [task_id, task_id]
    assert results(fake) == [(1, "retry", 502), (2, "delivered", 200)]
    assert fake.webhook_deliveries[1].target == f"{receiver_url}/apimart/callback"
