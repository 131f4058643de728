"""Paid submits: heard out whoever cancels, never cut short while someone waits.

The submit keeper runs each paid request in the client's own task group. These tests
pin what that buys: a slow answer to a live submit is still the caller's result (the
shield deadline applies only once the caller is gone), closing the client hears out
what is on the wire and says what it had to abandon, a client refuses a second event
loop with a clear error, and the answers the service may give (a synchronous result,
two task ids) are read for what they are.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import apimart_async as am
from apimart_async import AsyncApimart
from apimart_async.testing import FakeApimart, Faults
from apimart_async.types import FailedEvent, SubmittedEvent

from .conftest import FAST_POLL
from .mock import Script, reply, task_body

pytestmark = pytest.mark.anyio

KEY = "test-key"
GEM = "gemini-3.1-flash-image-preview"


def stalled_fake(seconds: float) -> FakeApimart:
    """A fake that creates the task at once and answers the submit *seconds* later."""
    fake = FakeApimart(api_key=KEY, faults=Faults(stall_seconds=seconds))
    fake.script("submit", ["stall"])
    return fake


async def test_a_live_submit_answered_after_the_shield_is_heard() -> None:
    """Nobody cancels: an answer slower than the shield (0.2 s) is still the result."""
    fake = stalled_fake(0.5)
    async with AsyncApimart(
        api_key=KEY, transport=fake.transport(), poll=FAST_POLL, submit_shield=0.2, timeout=5.0
    ) as client:
        task = await client.submit(model=GEM, prompt="slow answer")
    assert list(fake.tasks) == [task.id]


async def test_a_submit_answered_just_within_its_timeout_is_heard() -> None:
    fake = stalled_fake(0.2)
    async with AsyncApimart(
        api_key=KEY, transport=fake.transport(), poll=FAST_POLL, submit_shield=0.05, timeout=0.6
    ) as client:
        task = await client.submit(model=GEM, prompt="just in time")
    assert list(fake.tasks) == [task.id]


async def test_a_submit_past_its_timeout_is_uncertain(caplog: pytest.LogCaptureFixture) -> None:
    """The request timeout, not the shield, ends a live submit: uncertain, key in the log."""
    fake = stalled_fake(5.0)
    async with AsyncApimart(
        api_key=KEY, transport=fake.transport(), poll=FAST_POLL, submit_shield=0.05, timeout=0.3
    ) as client:
        with pytest.raises(am.SubmissionUncertainError) as info:
            await client.submit(model=GEM, prompt="too late", idempotency_key="key-late")
    assert info.value.idempotency_key == "key-late"
    assert fake.stats.tasks_created == 1 and fake.stats.submits == 1
    assert any(
        r.levelno == logging.WARNING and "key-late" in r.getMessage() for r in caplog.records
    )


async def test_closing_hears_out_a_submit_on_the_wire() -> None:
    """aclose() waits for a submit whose caller left, so its task id is reported."""
    fake = stalled_fake(0.3)
    events: list[am.Event] = []
    client = AsyncApimart(api_key=KEY, transport=fake.transport(), poll=FAST_POLL)
    with anyio.move_on_after(0.05) as scope:
        await client.submit(model=GEM, prompt="x", on_event=events.append)
    assert scope.cancelled_caught
    await client.aclose()
    (task_id,) = list(fake.tasks)
    assert [e.task_id for e in events if isinstance(e, SubmittedEvent)] == [task_id]
    assert [t.id for t in client.orphaned_tasks()] == [task_id]


async def test_closing_reports_what_it_had_to_abandon(caplog: pytest.LogCaptureFixture) -> None:
    """A submit still unanswered when the shield runs out at close: uncertain, with its key."""
    fake = stalled_fake(30.0)
    events: list[am.Event] = []
    client = AsyncApimart(
        api_key=KEY, transport=fake.transport(), poll=FAST_POLL, submit_shield=0.1
    )
    with anyio.move_on_after(0.05):
        await client.submit(
            model=GEM, prompt="x", idempotency_key="key-gone", on_event=events.append
        )
    with anyio.fail_after(5):
        await client.aclose()
    uncertain = [e.error for e in events if isinstance(e, FailedEvent)]
    assert [type(e) for e in uncertain] == [am.SubmissionUncertainError]
    assert any("key-gone" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_client_refuses_a_second_event_loop() -> None:
    """One client driven by two asyncio.run() calls: a RuntimeError that says what to do."""
    fake = FakeApimart(api_key=KEY)
    client = AsyncApimart(api_key=KEY, transport=fake.transport(), poll=FAST_POLL)

    def run_in_new_loop() -> Any:
        return asyncio.run(client.get_task("task_x"))

    with pytest.raises(am.BadRequestError):  # the fake does not know the id: the call ran
        await anyio.to_thread.run_sync(run_in_new_loop)
    with pytest.raises(RuntimeError) as info:
        await client.get_task("task_x")
    message = str(info.value)
    assert "AsyncApimart" in message and "bound to another event loop" in message
    assert "Apimart" in message and "inside the loop" in message


async def test_a_synchronous_result_is_a_definite_answer() -> None:
    """An answer with ``object: generation.result`` (§3.3 D) is a finished task."""
    url = "https://upload.apimart.ai/f/image/sync_0.png"
    body = task_body("task_S", urls=(url,))
    body["data"]["object"] = "generation.result"
    script = Script(reply(200, body))
    async with AsyncApimart(api_key=KEY, transport=script.transport(), poll=FAST_POLL) as client:
        task = await client.generate(model=GEM, prompt="at once")
    assert task.id == "task_S" and task.status is am.TaskStatus.COMPLETED
    assert task.image_urls == (url,)
    assert [r.url.path for r in script.requests] == ["/v1/images/generations", "/v1/tasks/task_S"]


async def test_an_answer_naming_two_tasks_is_uncertain_and_names_both() -> None:
    both = {"code": 200, "data": [{"task_id": "task_1"}, {"task_id": "task_2"}]}
    script = Script(reply(200, both))
    async with AsyncApimart(api_key=KEY, transport=script.transport(), poll=FAST_POLL) as client:
        with pytest.raises(am.SubmissionUncertainError) as info:
            await client.submit(model=GEM, prompt="x")
    assert "task_1" in str(info.value) and "task_2" in str(info.value)


async def test_a_borrowed_clients_auth_never_replaces_our_key() -> None:
    """A borrowed client's auth= and default Authorization: our key goes to the API,
    and nothing of the borrowed client's goes to a result host."""
    seen: list[httpx.Request] = []
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64 + b"IEND\xaeB`\x82"

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "files.example":
            return httpx.Response(200, content=png)
        return reply(200, task_body("task_B", urls=("https://files.example/b.png",)))

    borrowed = httpx.AsyncClient(
        transport=httpx.MockTransport(handler),
        auth=("user", "borrowed-password"),
        headers={"Authorization": "Bearer borrowed-token", "X-Team": "imaging"},
        cookies={"session": "borrowed-cookie"},
    )
    async with borrowed, AsyncApimart(api_key="sk-ours-0123456789", http_client=borrowed) as c:
        task = await c.get_task("task_B")
        await c.download(task, "/tmp/apimart-borrowed-test")
    api, download = seen
    assert api.headers["authorization"] == "Bearer sk-ours-0123456789"
    assert api.headers["x-team"] == "imaging"  # the API origin may see the client's own headers
    for name in ("authorization", "x-team", "cookie"):
        assert name not in download.headers


async def test_a_borrowed_clients_raise_for_status_is_mapped() -> None:
    """A raise_for_status response hook: our typed error, never httpx.HTTPStatusError."""

    async def raise_for_status(response: httpx.Response) -> None:
        response.raise_for_status()

    borrowed = httpx.AsyncClient(
        transport=Script(reply(404, {"error": {"message": "no"}})).transport(),
        event_hooks={"response": [raise_for_status]},
    )
    async with borrowed, AsyncApimart(api_key=KEY, http_client=borrowed) as client:
        with pytest.raises(am.NotFoundError):
            await client.get_task("task_x")


async def test_uncertainty_sticks_across_later_attempts() -> None:
    """retry_uncertain_submits: an attempt that may have created the task, then only
    429s: the end is SubmissionUncertainError, never a "nothing happened" 429."""
    fake = FakeApimart(api_key=KEY)
    fake.script("submit", ["drop_after_submit", 429, 429, 429, 429])
    async with AsyncApimart(
        api_key=KEY, transport=fake.transport(), poll=FAST_POLL, retry_uncertain_submits=True
    ) as client:
        with pytest.raises(am.SubmissionUncertainError):
            await client.submit(model=GEM, prompt="x", idempotency_key="key-sticky")
    assert fake.stats.tasks_created == 1


@pytest.mark.parametrize(
    ("key", "works"),
    [("sk-test-0123456789\n", True), ("  sk-test-0123456789 ", True), ("sk-te st", False)],
)
async def test_keys_are_trimmed_and_checked_without_being_shown(key: str, works: bool) -> None:
    fake = FakeApimart(api_key="sk-test-0123456789")
    if not works:
        with pytest.raises(ValueError) as info:
            AsyncApimart(api_key=key, transport=fake.transport())
        assert key.strip() not in str(info.value) and "not shown" in str(info.value)
        return
    async with AsyncApimart(api_key=key, transport=fake.transport(), poll=FAST_POLL) as client:
        assert (await client.generate(model=GEM, prompt="x")).status.is_terminal


async def test_a_look_alike_host_gets_nothing_of_a_borrowed_client(tmp_path: Path) -> None:
    """Only requests the client builds for the API carry the borrowed client's
    headers and cookies; a result URL on a look-alike host carries none."""
    seen: list[httpx.Request] = []
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64 + b"IEND\xaeB`\x82"

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=png)

    borrowed = httpx.AsyncClient(
        transport=httpx.MockTransport(handler),
        headers={"X-Tenant-Secret": "s3cret"},
        cookies={"session": "c00kie"},
    )
    lookalike = "https://api.apimart.ai.evil.example/a.png"
    with_credentials = "https://api.apimart.ai@evil.example/b.png"
    async with borrowed, AsyncApimart(api_key=KEY, http_client=borrowed) as client:
        await client.download([lookalike], tmp_path)
        with pytest.raises(am.APIResponseValidationError, match="credentials"):
            await client.download([with_credentials], tmp_path)
    assert len(seen) == 1
    for request in seen:
        assert "x-tenant-secret" not in request.headers and "cookie" not in request.headers
        assert "authorization" not in request.headers


async def test_a_submit_handler_failure_keeps_the_task(caplog: pytest.LogCaptureFixture) -> None:
    """on_event raising on the SubmittedEvent: the caller gets its error, and the task
    that was created goes to orphaned_tasks() and a WARNING, not nowhere."""
    fake = FakeApimart(api_key=KEY)

    def handler(event: am.Event) -> None:
        if event.kind == "submitted":
            raise LookupError("bug in my handler")

    async with AsyncApimart(api_key=KEY, transport=fake.transport(), poll=FAST_POLL) as client:
        with pytest.raises(LookupError):
            await client.generate(model=GEM, prompt="x", on_event=handler)
        orphans = client.orphaned_tasks()
    (task_id,) = list(fake.tasks)
    assert [t.id for t in orphans] == [task_id]
    assert any(task_id in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_system_exit_in_an_orphan_report_does_not_end_the_loop() -> None:
    """The report of an orphaned submit runs in the client's own task: a SystemExit
    from the handler there is logged, and the loop (and closing) go on."""
    fake = stalled_fake(0.2)

    def handler(event: am.Event) -> None:
        if event.kind == "submitted":
            raise SystemExit("callback exits")

    async with AsyncApimart(api_key=KEY, transport=fake.transport(), poll=FAST_POLL) as client:
        with anyio.move_on_after(0.05):
            await client.submit(model=GEM, prompt="x", on_event=handler)
    assert fake.stats.tasks_created == 1


async def test_the_callers_context_reaches_the_submit_task() -> None:
    """Context variables (log correlation ids) are seen by the SubmittingEvent handler,
    which runs in the client's own task, on trio as on asyncio."""
    import contextvars

    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    seen: list[str] = []

    def handler(event: am.Event) -> None:
        if event.kind == "submitting":
            seen.append(request_id.get())

    fake = FakeApimart(api_key=KEY)
    async with AsyncApimart(api_key=KEY, transport=fake.transport(), poll=FAST_POLL) as client:
        request_id.set("req-42")
        await client.submit(model=GEM, prompt="x", on_event=handler)
    assert seen == ["req-42"]
