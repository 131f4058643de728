"""WebhookReceiver: pushed tasks are parsed, stored once, announced once; nothing a
client sends makes it raise or change state unless it holds the token.

The pushed bodies are what the service sends: the task-query body of a real task, read
from FakeApimart after the client ran the task to its end.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apimart_async as am
from apimart_async import AsyncApimart, Task, TaskStatus
from apimart_async.testing import FakeApimart
from apimart_async.webhooks import WebhookReceiver, WebhookStats, parse_callback

pytestmark = pytest.mark.anyio

GEM = "gemini-3-pro-image-preview"
PUBLIC = "https://example.com/hooks"


# -- helpers ------------------------------------------------------------------------------


def pushed_body(task: Task) -> bytes:
    """The body the service pushes for *task*: its task-query body (§6.4), rebuilt from
    the task object exactly as the client received it from the fake."""
    return json.dumps({"code": 200, "data": task.raw}).encode()


async def finished_task(client: AsyncApimart, prompt: str) -> tuple[Task, bytes]:
    """Run a real task on the fake to completion; return it and its pushed body."""
    task = await client.generate(model=GEM, prompt=prompt)
    assert task.status is TaskStatus.COMPLETED and task.image_urls
    return task, pushed_body(task)


def body(task_id: str, status: str = "completed", **fields: Any) -> bytes:
    """A hand-made push body in the documented envelope (§6.1)."""
    data = {"id": task_id, "status": status, "progress": 100, **fields}
    return json.dumps({"code": 200, "data": data}).encode()


def callback_path(receiver: WebhookReceiver) -> str:
    """The path the service POSTs to when *receiver* is served at its public URL."""
    return urlsplit(receiver.callback_url).path


@pytest.fixture
def receiver() -> WebhookReceiver:
    return WebhookReceiver(public_url=PUBLIC)


@pytest.fixture
async def http(receiver: WebhookReceiver) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the receiver, served whole, over httpx's ASGI transport."""
    transport = httpx.ASGITransport(app=receiver)
    async with httpx.AsyncClient(transport=transport, base_url="https://example.com") as c:
        yield c


class Recorder:
    """A listener that records every task it is given."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []

    def __call__(self, task: Task) -> None:
        self.tasks.append(task)

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.tasks]


async def call_asgi(
    app: WebhookReceiver, scope: dict[str, Any], messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Drive the ASGI app directly with *messages*; return what it sent."""
    sent: list[dict[str, Any]] = []
    pending = list(messages)

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Any) -> None:
        sent.append(dict(message))

    with anyio.fail_after(5):
        await app(scope, receive, send)
    return sent


def http_scope(path: str, *, method: str = "POST", root_path: str = "") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [(b"host", b"example.com")],
    }


# -- accepted callbacks ---------------------------------------------------------------------


async def test_a_pushed_task_is_parsed_stored_and_announced(
    client: AsyncApimart, receiver: WebhookReceiver, http: httpx.AsyncClient
) -> None:
    """The service's body becomes the same typed Task the client polls; listeners get it."""
    task, pushed = await finished_task(client, "a fox")
    seen = Recorder()
    receiver.add_listener(seen)
    assert receiver.get(task.id) is None

    response = await http.post(callback_path(receiver), content=pushed)

    assert response.status_code == 200
    assert response.json() == {"status": "accepted"}
    stored = receiver.get(task.id)
    assert stored == await client.get_task(task.id)
    assert stored is not None and stored.image_urls == task.image_urls
    assert seen.tasks == [stored]
    assert receiver.stats == WebhookStats(received=1)


async def test_a_failed_task_is_pushed_with_its_error(
    client: AsyncApimart, fake: FakeApimart, receiver: WebhookReceiver, http: httpx.AsyncClient
) -> None:
    """Failed is terminal too: stored with the service's error."""
    fake.script("task", ["task_failed"])
    submitted = await client.submit(model=GEM, prompt="a fox")
    with pytest.raises(am.TaskFailedError) as info:
        await client.wait(submitted.id)
    assert info.value.task is not None

    response = await http.post(callback_path(receiver), content=pushed_body(info.value.task))

    assert response.status_code == 200
    stored = receiver.get(submitted.id)
    assert stored is not None and stored.status is TaskStatus.FAILED
    assert stored.error is not None and stored.error.message


async def test_duplicates_are_stored_and_announced_once(
    client: AsyncApimart, receiver: WebhookReceiver, http: httpx.AsyncClient
) -> None:
    """The service may deliver twice and retries: every delivery gets 200, one counts."""
    first, pushed_first = await finished_task(client, "one")
    second, pushed_second = await finished_task(client, "two")
    seen = Recorder()
    receiver.add_listener(seen)

    answers = [
        (await http.post(callback_path(receiver), content=content)).json()["status"]
        for content in (pushed_first, pushed_first, pushed_second, pushed_first, pushed_second)
    ]

    assert answers == ["accepted", "duplicate", "accepted", "duplicate", "duplicate"]
    assert seen.ids == [first.id, second.id]
    assert receiver.stats == WebhookStats(received=2, duplicates=3)


async def test_a_callback_before_the_id_is_known_is_found_later(
    client: AsyncApimart, receiver: WebhookReceiver, http: httpx.AsyncClient
) -> None:
    """A push that beats the submit answer: the listener fires for an id nobody waits on
    yet, and ``get`` still finds the task once the id is known."""
    task, pushed = await finished_task(client, "early")
    waiting: dict[str, Task] = {}
    known: set[str] = set()

    def engine_listener(pushed_task: Task) -> None:
        if pushed_task.id in known:
            waiting[pushed_task.id] = pushed_task

    receiver.add_listener(engine_listener)
    await http.post(callback_path(receiver), content=pushed)
    assert waiting == {}  # the id was not known when the push came

    known.add(task.id)  # ... now the submit answer arrives
    late = receiver.get(task.id)
    assert late is not None and late.id == task.id and late.status is TaskStatus.COMPLETED


async def test_non_terminal_pushes_are_answered_but_ignored(
    receiver: WebhookReceiver, http: httpx.AsyncClient
) -> None:
    """The service pushes terminal states only; anything else gets 200 and no effect,
    including a status string no documentation lists."""
    seen = Recorder()
    receiver.add_listener(seen)
    for status in ("submitted", "pending", "processing", "in_progress", "queued", "weird"):
        response = await http.post(callback_path(receiver), content=body("task_x", status))
        assert response.status_code == 200
        assert response.json() == {"status": "ignored", "reason": "not a terminal state"}
    assert receiver.get("task_x") is None
    assert seen.tasks == []
    assert receiver.stats == WebhookStats(ignored=6)
    # The same id, finished, is then accepted.
    assert (await http.post(callback_path(receiver), content=body("task_x"))).status_code == 200
    assert seen.ids == ["task_x"]


async def test_documented_payload_variants_are_accepted(
    receiver: WebhookReceiver, http: httpx.AsyncClient
) -> None:
    """String or list result URLs, the webhook doc's string error codes, a bare task."""
    pushes = {
        "t1": {"code": 200, "data": {"id": "t1", "status": "completed", "result": {
            "images": [{"url": ["https://upload.apimart.ai/f/image/1.png"], "expires_at": 1763174708}]
        }}},
        "t2": {"code": 200, "data": {"id": "t2", "status": "completed", "result": {
            "images": [{"url": "https://upload.apimart.ai/f/image/2.png"}]
        }}},
        "t3": {"code": 200, "data": {"id": "t3", "status": "failed", "error": {
            "message": "upstream refused", "type": "task_failed", "param": "",
            "code": "task_failed",
        }}},
        "t4": {"id": "t4", "status": "cancelled"},
    }  # fmt: skip
    for task_id, payload in pushes.items():
        response = await http.post(callback_path(receiver), json=payload)
        assert response.status_code == 200, task_id
    t1, t2, t3, t4 = (receiver.get(i) for i in pushes)
    assert t1 is not None and t1.image_urls == ("https://upload.apimart.ai/f/image/1.png",)
    assert t2 is not None and t2.image_urls == ("https://upload.apimart.ai/f/image/2.png",)
    assert t3 is not None and t3.error is not None and t3.error.code == "task_failed"
    assert t4 is not None and t4.status is TaskStatus.CANCELLED


# -- rejected callbacks ---------------------------------------------------------------------


async def test_a_wrong_token_gets_404_and_changes_nothing(
    receiver: WebhookReceiver, http: httpx.AsyncClient
) -> None:
    """Any path but ``.../<token>/callback``: 404, nothing stored, no listener called."""
    seen = Recorder()
    receiver.add_listener(seen)
    token = urlsplit(receiver.webhook_url).path.rsplit("/", 1)[-1]
    other = WebhookReceiver(public_url=PUBLIC)
    wrong = [
        callback_path(other),  # another receiver's token
        f"/hooks/{token[:-1]}/callback",  # one character short
        f"/hooks/{token}x/callback",
        f"/hooks/{token.upper()}/callback" if token.upper() != token else "/hooks/X/callback",
        f"/hooks/{token}",  # the webhook URL itself, without /callback
        f"/hooks/{token}/callback/extra",
        f"/hooks/callback/{token}",
        "/hooks/callback",
        "/callback",
        "/",
        "/hooks/%E2%98%83/callback",  # non-ASCII segment: compared as bytes, no crash
    ]
    for path in wrong:
        response = await http.post(path, content=body("task_1"))
        assert response.status_code == 404, path
        assert token not in response.text
    assert receiver.get("task_1") is None
    assert seen.tasks == []
    assert receiver.stats == WebhookStats(rejected={"wrong_path": len(wrong)})


async def test_other_methods_get_405_on_the_right_path_only(
    receiver: WebhookReceiver, http: httpx.AsyncClient
) -> None:
    """GET/PUT/...: 405 with ``Allow: POST`` on the callback path; elsewhere 404."""
    for method in ("GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"):
        response = await http.request(method, callback_path(receiver))
        assert response.status_code == 405, method
        assert response.headers["allow"] == "POST"
    assert (await http.get("/hooks/not-the-token/callback")).status_code == 404
    assert receiver.stats == WebhookStats(rejected={"method": 6, "wrong_path": 1})


HOSTILE_BODIES: list[tuple[str, bytes, int, str]] = [
    ("empty", b"", 400, "bad_json"),
    ("text", b"hello", 400, "bad_json"),
    ("truncated", body("task_1")[:-5], 400, "bad_json"),
    ("not-utf8", b"\xff\xfe\x00{", 400, "bad_json"),
    ("html", b"<html><body>502 Bad Gateway</body></html>", 400, "bad_json"),
    ("deep-nesting", b"[" * 200_000, 400, "bad_json"),
    ("huge-int", b'{"data": {"id": "t", "status": "completed", "progress": ' + b"9" * 5000 + b"}}",
     400, "bad_json"),
    ("null", b"null", 400, "not_a_task"),
    ("number", b"42", 400, "not_a_task"),
    ("string", b'"completed"', 400, "not_a_task"),
    ("list", b"[]", 400, "not_a_task"),
    ("empty-object", b"{}", 400, "not_a_task"),
    ("data-null", b'{"code": 200, "data": null}', 400, "not_a_task"),
    ("data-list-of-two", b'{"data": [{"id": "a"}, {"id": "b"}]}', 400, "not_a_task"),
    ("missing-id", b'{"code": 200, "data": {"status": "completed"}}', 400, "not_a_task"),
    ("empty-id", body(""), 400, "not_a_task"),
    ("int-id", b'{"data": {"id": 7, "status": "completed"}}', 400, "not_a_task"),
    ("error-envelope", b'{"error": {"code": 500, "message": "boom"}}', 400, "not_a_task"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("content", "status", "reason"),
    [case[1:] for case in HOSTILE_BODIES],
    ids=[case[0] for case in HOSTILE_BODIES],
)
async def test_hostile_bodies_are_rejected_without_a_crash(
    receiver: WebhookReceiver, http: httpx.AsyncClient, content: bytes, status: int, reason: str
) -> None:
    """Bodies that are not a task get a 4xx naming the reason and change nothing."""
    seen = Recorder()
    receiver.add_listener(seen)
    response = await http.post(callback_path(receiver), content=content)
    assert response.status_code == status
    assert response.json() == {"status": "rejected", "reason": reason}
    assert seen.tasks == [] and receiver.get("task_1") is None and receiver.get("t") is None
    assert receiver.stats == WebhookStats(rejected={reason: 1})


async def test_bodies_over_the_cap_get_413_declared_or_streamed() -> None:
    """A declared Content-Length over the cap is refused unread; a chunked body is cut
    off as soon as it passes the cap."""
    receiver = WebhookReceiver(public_url=PUBLIC, max_body_size=1024)
    path = callback_path(receiver)
    chunks_sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        while chunks_sent < 10_000:
            chunks_sent += 1
            yield b" " * 512

    transport = httpx.ASGITransport(app=receiver)
    async with httpx.AsyncClient(transport=transport, base_url="https://example.com") as http:
        declared = await http.post(path, content=body("task_1", pad="x" * 2000))
        streamed = await http.post(path, content=endless())
        at_cap = await http.post(path, content=body("task_2").ljust(1024))
    assert declared.status_code == 413 and streamed.status_code == 413
    assert chunks_sent < 10_000  # reading stopped at the cap, not at the end
    assert at_cap.status_code == 200  # exactly the cap is allowed
    assert receiver.get("task_1") is None and receiver.get("task_2") is not None
    assert receiver.stats == WebhookStats(received=1, rejected={"too_large": 2})


# -- listeners ------------------------------------------------------------------------------


async def test_a_failing_listener_breaks_neither_the_receiver_nor_the_others(
    receiver: WebhookReceiver, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The exception is logged; later listeners still run; the service still gets 200."""
    before, after = Recorder(), Recorder()

    def broken(task: Task) -> None:
        raise RuntimeError(f"listener bug on {task.id}")

    receiver.add_listener(before)
    receiver.add_listener(broken)
    receiver.add_listener(after)
    with caplog.at_level(logging.ERROR, logger="apimart_async.webhooks"):
        response = await http.post(callback_path(receiver), content=body("task_1"))
    assert response.status_code == 200
    assert before.ids == after.ids == ["task_1"]
    [record] = [r for r in caplog.records if r.exc_info]
    assert "task_1" in record.getMessage() and "listener bug on task_1" in caplog.text


async def test_unsubscribe_stops_a_listener_and_is_idempotent(
    receiver: WebhookReceiver, http: httpx.AsyncClient
) -> None:
    """The function add_listener returns removes exactly that registration."""
    seen = Recorder()
    first = receiver.add_listener(seen)
    receiver.add_listener(seen)  # registered twice: called twice
    await http.post(callback_path(receiver), content=body("task_1"))
    first()
    first()
    await http.post(callback_path(receiver), content=body("task_2"))
    assert seen.ids == ["task_1", "task_1", "task_2"]


async def test_async_listeners_are_refused_and_stray_coroutines_closed(
    receiver: WebhookReceiver, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Listeners are synchronous: a coroutine function is a TypeError; a plain function
    that returns a coroutine anyway has it closed (no "never awaited") and logged."""

    async def async_listener(task: Task) -> None:
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="plain function"):
        receiver.add_listener(async_listener)
    receiver.add_listener(lambda task: async_listener(task))
    with caplog.at_level(logging.ERROR, logger="apimart_async.webhooks"):
        response = await http.post(callback_path(receiver), content=body("task_1"))
    assert response.status_code == 200
    assert "returned a coroutine" in caplog.text


async def test_listeners_may_hand_tasks_to_async_code(
    client: AsyncApimart, receiver: WebhookReceiver, http: httpx.AsyncClient
) -> None:
    """The documented hand-off: a memory stream's send_nowait from the listener."""
    task, pushed = await finished_task(client, "handoff")
    send, receive = anyio.create_memory_object_stream[Task](10)
    receiver.add_listener(send.send_nowait)
    async with send, receive:
        await http.post(callback_path(receiver), content=pushed)
        with anyio.fail_after(5):
            got = await receive.receive()
    assert got.id == task.id


# -- the store --------------------------------------------------------------------------------


def test_the_store_is_bounded_and_evicts_the_oldest() -> None:
    """At most max_tasks kept; an evicted task pushed again counts as new (documented)."""
    receiver = WebhookReceiver(public_url=PUBLIC, max_tasks=2)
    path = callback_path(receiver)
    seen = Recorder()
    receiver.add_listener(seen)
    for task_id in ("a", "b", "c"):
        assert receiver.handle(body(task_id), path)[0] == 200
    assert receiver.get("a") is None
    assert receiver.get("b") is not None and receiver.get("c") is not None
    receiver.handle(body("a"), path)  # re-pushed after eviction: new again, evicts "b"
    assert receiver.get("b") is None
    assert seen.ids == ["a", "b", "c", "a"]
    assert receiver.stats == WebhookStats(received=4)


def test_concurrent_pushes_from_threads_are_announced_once_per_task() -> None:
    """handle() from many threads at once (a threaded WSGI server): one call per id."""
    receiver = WebhookReceiver(public_url=PUBLIC)
    path = callback_path(receiver)
    seen = Recorder()
    receiver.add_listener(seen)
    ids = [f"task_{i}" for i in range(50)]
    start = threading.Barrier(8)

    def deliver() -> None:
        start.wait()
        for task_id in ids:
            assert receiver.handle(body(task_id), path)[0] == 200

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen.ids) == sorted(ids)
    assert receiver.stats == WebhookStats(received=50, duplicates=50 * 7)


# -- the framework-independent entry points ------------------------------------------------------


def test_handle_answers_like_the_asgi_app() -> None:
    """The plain entry point for Flask/Django: (status, JSON body), the same rules."""
    receiver = WebhookReceiver(public_url=PUBLIC, max_body_size=300_000)
    path = callback_path(receiver)
    assert receiver.handle(body("t1"), path) == (200, b'{"status": "accepted"}')
    assert receiver.handle(body("t1"), path) == (200, b'{"status": "duplicate"}')
    # The path may be the whole request path or the part after the mount point.
    token = path.split("/")[-2]
    assert receiver.handle(body("t2"), f"/{token}/callback")[0] == 200
    assert receiver.handle(body("t3"), f"/{token}/callback/")[0] == 200
    assert receiver.handle(body("t4"), "/elsewhere/callback")[0] == 404
    assert receiver.handle(body("t4"), path, method="GET")[0] == 405
    assert receiver.handle(b"x" * 300_001, path)[0] == 413
    for _, content, status, _reason in HOSTILE_BODIES:
        assert receiver.handle(content, path)[0] == status
    assert receiver.get("t4") is None
    assert receiver.stats.received == 3


def test_parse_callback_reads_a_body_or_raises_a_validation_error() -> None:
    """For users who route callbacks themselves: the same parser, typed errors."""
    task = parse_callback(body("task_1", result={"images": [{"url": ["https://x.test/1.png"]}]}))
    assert task.id == "task_1" and task.image_urls == ("https://x.test/1.png",)
    assert parse_callback(body("task_2").decode()).id == "task_2"
    for bad in (b"", b"[" * 100_000, b"{}", b'{"data": {"status": "completed"}}'):
        with pytest.raises(am.APIResponseValidationError):
            parse_callback(bad)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
_task_like = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=8), _json), "status": st.one_of(st.text(max_size=12), _json)},
    optional={
        "progress": _json,
        "result": _json,
        "error": _json,
        "created": _json,
        "completed": _json,
        "estimated_time": _json,
        "cost": _json,
    },
)
_bodies = st.one_of(
    st.binary(max_size=64),
    _json.map(lambda v: json.dumps(v).encode()),
    _task_like.map(lambda d: json.dumps({"code": 200, "data": d}).encode()),
    st.lists(_task_like, max_size=2).map(lambda d: json.dumps({"data": d}).encode()),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_bodies, min_size=1, max_size=5))
def test_arbitrary_bodies_never_raise_and_announce_each_task_once(pushes: list[bytes]) -> None:
    """Whatever arrives: a 200/400 answer, and listeners see each stored id exactly once."""
    receiver = WebhookReceiver(public_url=PUBLIC)
    path = callback_path(receiver)
    seen = Recorder()
    receiver.add_listener(seen)
    for content in pushes:
        status, answer = receiver.handle(content, path)
        assert status in (200, 400)
        assert json.loads(answer)["status"] in ("accepted", "duplicate", "ignored", "rejected")
    assert len(seen.ids) == len(set(seen.ids)) == receiver.stats.received
    assert all(
        receiver.get(task_id) is task for task_id, task in zip(seen.ids, seen.tasks, strict=True)
    )
    stats = receiver.stats
    assert stats.received + stats.duplicates + stats.ignored + stats.rejected_total == len(pushes)


# -- ASGI: mounting, root_path, lifespan, disconnects -------------------------------------------


async def test_mounted_in_fastapi_next_to_other_routes() -> None:
    """``app.mount("/hooks", receiver)``: the service's POST to webhook_url/callback lands;
    the app's own routes still work; GET and wrong tokens are answered by the receiver."""
    from fastapi import FastAPI

    receiver = WebhookReceiver(public_url="https://example.com/hooks")
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"ok": "yes"}

    app.mount("/hooks", receiver)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://example.com") as http:
        pushed = await http.post(receiver.callback_url, content=body("task_1"))
        wrong = await http.post("/hooks/not-the-token/callback", content=body("task_2"))
        get = await http.get(receiver.callback_url)
        health_check = await http.get("/health")
    assert pushed.status_code == 200 and pushed.json() == {"status": "accepted"}
    assert wrong.status_code == 404 and get.status_code == 405
    assert wrong.json() == {"status": "rejected", "reason": "wrong_path"}  # ours, not the app's
    assert health_check.json() == {"ok": "yes"}
    assert receiver.get("task_1") is not None and receiver.get("task_2") is None


async def test_mounted_in_fastapi_behind_a_root_path() -> None:
    """A FastAPI app served under a root_path (a proxy strips /api): the full public
    callback URL still reaches the mounted receiver."""
    from fastapi import FastAPI

    receiver = WebhookReceiver(public_url="https://example.com/api/hooks")
    app = FastAPI()
    app.mount("/hooks", receiver)
    transport = httpx.ASGITransport(app=app, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="https://example.com") as http:
        response = await http.post(receiver.callback_url, content=body("task_1"))
        wrong = await http.post("/api/hooks/nope/callback", content=body("task_2"))
    assert response.status_code == 200
    assert wrong.json() == {"status": "rejected", "reason": "wrong_path"}
    assert receiver.get("task_1") is not None and receiver.stats.received == 1


@pytest.mark.parametrize(
    ("path", "root_path"),
    [
        ("/prefix/hooks/{token}/callback", "/prefix"),  # full path (uvicorn, new Starlette)
        ("/{token}/callback", "/prefix/hooks"),  # relative to root_path (older Starlette)
        ("/{token}/callback", ""),  # served whole at the receiver's own root
    ],
)
async def test_the_callback_path_is_matched_with_or_without_root_path(
    path: str, root_path: str
) -> None:
    """Servers disagree on whether scope["path"] includes root_path; both work."""
    receiver = WebhookReceiver(public_url="https://example.com/prefix/hooks")
    token = receiver.webhook_url.rsplit("/", 1)[-1]
    scope = http_scope(path.format(token=token), root_path=root_path)
    sent = await call_asgi(
        receiver, scope, [{"type": "http.request", "body": body("task_1"), "more_body": False}]
    )
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == {"status": "accepted"}
    assert receiver.get("task_1") is not None


async def test_a_body_in_many_chunks_is_reassembled(receiver: WebhookReceiver) -> None:
    """ASGI servers deliver large bodies in pieces."""
    content = body("task_1", result={"images": [{"url": ["https://x.test/a.png"]}]})
    pieces = [content[i : i + 7] for i in range(0, len(content), 7)]
    messages = [{"type": "http.request", "body": p, "more_body": True} for p in pieces]
    messages.append({"type": "http.request", "body": b"", "more_body": False})
    sent = await call_asgi(receiver, http_scope(callback_path(receiver)), messages)
    assert sent[0]["status"] == 200
    stored = receiver.get("task_1")
    assert stored is not None and stored.image_urls == ("https://x.test/a.png",)


async def test_a_client_that_disconnects_mid_body_gets_no_answer_and_changes_nothing(
    receiver: WebhookReceiver,
) -> None:
    """http.disconnect while reading: nobody to answer, nothing stored, no exception."""
    messages = [
        {"type": "http.request", "body": body("task_1")[:10], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent = await call_asgi(receiver, http_scope(callback_path(receiver)), messages)
    assert sent == []
    assert receiver.get("task_1") is None and receiver.stats == WebhookStats()


async def test_lifespan_and_websocket_scopes(receiver: WebhookReceiver) -> None:
    """Served whole (uvicorn app=receiver), startup/shutdown are acknowledged and a
    websocket is refused."""
    sent = await call_asgi(
        receiver,
        {"type": "lifespan", "asgi": {"version": "3.0"}},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    sent = await call_asgi(receiver, {"type": "websocket", "path": "/x"}, [])
    assert sent == [{"type": "websocket.close", "code": 1008}]


# -- construction, secrecy --------------------------------------------------------------------


def test_the_webhook_url_carries_a_fresh_unguessable_token() -> None:
    """``<public_url>/<token>``; a new token per receiver unless one is given."""
    a = WebhookReceiver(public_url="https://example.com/hooks/")
    b = WebhookReceiver(public_url="https://example.com/hooks/")
    token = a.webhook_url.removeprefix("https://example.com/hooks/")
    assert "/" not in token and len(token) >= 43  # 32 random bytes, base64url
    assert a.webhook_url != b.webhook_url
    assert a.callback_url == a.webhook_url + "/callback"
    assert a.public_url == "https://example.com/hooks/"
    shared = "s" * 22 + "_-A9"
    c = WebhookReceiver(public_url="https://example.com", token=shared)
    assert c.webhook_url == f"https://example.com/{shared}"
    assert c.handle(body("t"), f"/{shared}/callback")[0] == 200


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"public_url": "http://localhost:80/hooks"}, am.InvalidRequestError,
         "public_url: must be a public URL the service can reach; 'localhost' is a loopback"),
        ({"public_url": "https://example.com:8000/hooks"}, am.InvalidRequestError,
         "public_url: must use port 80 or 443"),
        ({"public_url": "https://hooks.apimart.ai/x"}, am.InvalidRequestError,
         "public_url: must not point at APIMart itself"),
        ({"public_url": "https://example.com/hooks?x=1"}, am.InvalidRequestError,
         "public_url: must not have a ?query"),
        ({"token": "short-secret"}, ValueError, "22 to 256 characters"),
        ({"token": "has/slash" + "x" * 30}, ValueError, "22 to 256 characters"),
        ({"max_body_size": 0}, ValueError, "max_body_size must be an int >= 1"),
        ({"max_tasks": True}, ValueError, "max_tasks must be an int >= 1"),
    ],
)  # fmt: skip
def test_bad_configuration_is_refused_with_the_field_named(
    kwargs: dict[str, Any], error: type[Exception], fragment: str
) -> None:
    """Errors name the parameter; a rejected token is never echoed."""
    with pytest.raises(error) as info:
        WebhookReceiver(**{"public_url": PUBLIC, **kwargs})
    assert fragment in str(info.value)
    if "token" in kwargs:
        assert kwargs["token"] not in str(info.value)


async def test_the_token_never_reaches_a_log_record_or_repr(
    client: AsyncApimart, caplog: pytest.LogCaptureFixture
) -> None:
    """Accepted, duplicate, ignored and every kind of rejected callback, at DEBUG."""
    receiver = WebhookReceiver(public_url=PUBLIC, max_body_size=2048)
    token = receiver.webhook_url.rsplit("/", 1)[-1]
    _, pushed = await finished_task(client, "log me")
    path = callback_path(receiver)
    transport = httpx.ASGITransport(app=receiver)
    with caplog.at_level(logging.DEBUG, logger="apimart_async"):
        async with httpx.AsyncClient(transport=transport, base_url="https://x.test") as http:
            for content in (pushed, pushed, body("t", "pending"), b"{", b"{}", b" " * 4096):
                await http.post(path, content=content)
            await http.get(path)
            await http.post(f"/hooks/{token[:-2]}/callback", content=pushed)
    assert receiver.stats.rejected_total == 5
    # (httpx's own INFO line for the test client's request shows the URL: not ours.)
    ours = [r for r in caplog.records if r.name.startswith("apimart_async")]
    assert len([r for r in ours if r.name == "apimart_async.webhooks"]) == 8  # each logged ...
    assert not any(token in logging.Formatter().format(r) for r in ours)  # ... without it
    assert any(r.levelno == logging.INFO and "not_a_task" in r.getMessage() for r in ours)
    assert token not in repr(receiver) and "example.com/hooks" in repr(receiver)


def test_the_module_exports_exactly_its_public_names() -> None:
    """``apimart_async.webhooks.__all__`` lists the public API and nothing else."""
    import types

    from apimart_async import webhooks

    public = {
        name
        for name, value in vars(webhooks).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and getattr(value, "__module__", "").startswith("apimart_async")
        and getattr(value, "__module__", "") != "apimart_async"
    }
    assert sorted(webhooks.__all__) == sorted(set(webhooks.__all__))
    assert public <= set(webhooks.__all__), public - set(webhooks.__all__)
    assert all(hasattr(webhooks, name) for name in webhooks.__all__)


# -- a real server ------------------------------------------------------------------------------


def test_served_whole_by_uvicorn_over_real_http(caplog: pytest.LogCaptureFixture) -> None:
    """``uvicorn`` with the receiver as the whole app (lifespan on): real sockets, a real
    HTTP parser. Listeners run in the thread serving the app, as documented."""
    import uvicorn

    from apimart_async.testing._server import _Server, api_origin, bind

    receiver = WebhookReceiver(public_url="https://example.com", max_body_size=1024)
    threads: list[str] = []
    receiver.add_listener(lambda task: threads.append(threading.current_thread().name))
    sock = bind("127.0.0.1", 0)
    config = uvicorn.Config(receiver, lifespan="on", log_config=None, access_log=False)
    server = _Server(config, on_ready=None)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="webhook-server", daemon=True
    )
    thread.start()
    try:
        assert server.ready.wait(15) and server.started
        base = api_origin("127.0.0.1", sock.getsockname()[1])
        path = callback_path(receiver)
        with httpx.Client(base_url=base) as http:
            accepted = http.post(path, content=body("task_1"))
            duplicate = http.post(path, content=body("task_1"))
            too_large = http.post(path, content=body("task_2", pad="x" * 4000))
            not_json = http.post(path, content=b"{nope")
            wrong = http.post("/not-the-token/callback", content=body("task_3"))
            get = http.get(path)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
    assert not thread.is_alive()
    assert [r.status_code for r in (accepted, duplicate, too_large, not_json, wrong, get)] == [
        200, 200, 413, 400, 404, 405,
    ]  # fmt: skip
    assert duplicate.json() == {"status": "duplicate"}
    assert threads == ["webhook-server"]
    assert receiver.get("task_1") is not None and receiver.get("task_2") is None
    # Nothing escaped the app (uvicorn would log "Exception in ASGI application").
    assert not [r for r in caplog.records if r.name.startswith("uvicorn") and r.levelno >= 30]
