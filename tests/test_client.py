"""The core client against exact response shapes (scripted ``httpx.MockTransport``)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import apimart_async as am
from apimart_async import AsyncApimart, TaskStatus
from apimart_async._retry import Retrier, is_transient, submit_retryable

from .conftest import FAST_POLL, until
from .mock import SUBMIT_A, SUBMIT_B, SUBMIT_C, SUBMIT_D, Script, reply, task_body

pytestmark = pytest.mark.anyio

KEY = "sk-test-SECRET-0123456789"
GEN = {"model": "gemini-3-pro-image-preview", "prompt": "a red fox"}


def make(script: Script, **kw: Any) -> AsyncApimart:
    """A client over *script* with the fast poll schedule."""
    kw.setdefault("poll", FAST_POLL)
    return AsyncApimart(api_key=KEY, transport=script.transport(), **kw)


# -- construction and lifecycle -------------------------------------------------------


def test_missing_key_is_a_clear_error() -> None:
    """No key anywhere fails at construction and says how to set one."""
    with pytest.raises(ValueError, match="APIMART_API_KEY"):
        AsyncApimart()


async def test_env_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Key and base URL come from the environment when not passed."""
    monkeypatch.setenv("APIMART_API_KEY", KEY)
    monkeypatch.setenv("APIMART_BASE_URL", "https://api.example.test/prefix")
    script = Script(reply(200, task_body()))
    async with AsyncApimart(transport=script.transport()) as client:
        await client.get_task("task_A")
    request = script.requests[0]
    assert str(request.url) == "https://api.example.test/prefix/v1/tasks/task_A"
    assert request.headers["authorization"] == f"Bearer {KEY}"


async def test_repr_never_shows_key() -> None:
    """The key is not in repr() or str() of the client."""
    async with make(Script(reply())) as client:
        assert KEY not in repr(client)
        assert "api.apimart.ai" in repr(client)


async def test_aclose_is_idempotent_and_blocks_reuse() -> None:
    """aclose twice is fine; any call afterwards is a clear RuntimeError."""
    client = make(Script(reply(200, task_body())))
    await client.aclose()
    await client.aclose()
    assert client.is_closed
    with pytest.raises(RuntimeError, match="closed"):
        await client.get_task("task_A")
    with pytest.raises(RuntimeError, match="closed"):
        async with client:
            pass


async def test_borrowed_http_client_stays_open() -> None:
    """A client passed in by the caller is used but never closed by us."""
    script = Script(reply(200, task_body()))
    borrowed = httpx.AsyncClient(transport=script.transport())
    async with AsyncApimart(api_key=KEY, http_client=borrowed) as client:
        await client.get_task("task_A")
    assert not borrowed.is_closed
    await borrowed.aclose()


def test_http_client_and_transport_are_exclusive() -> None:
    """Passing both is ambiguous and refused."""
    with pytest.raises(ValueError, match="either"):
        AsyncApimart(
            api_key=KEY, http_client=httpx.AsyncClient(), transport=httpx.MockTransport(reply)
        )


# -- submit shapes and body -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "task_id", "status"),
    [
        (SUBMIT_A, "task_A", TaskStatus.SUBMITTED),
        (SUBMIT_B, "task_B", TaskStatus.PENDING),
        (SUBMIT_C, "task_C", TaskStatus.SUBMITTED),
        (SUBMIT_D, "task_D", TaskStatus.SUBMITTED),
        ({"code": 200, "data": [{"id": "task_E"}]}, "task_E", TaskStatus.SUBMITTED),
        ({"task_id": "task_F"}, "task_F", TaskStatus.SUBMITTED),
    ],
)
async def test_every_submit_shape(body: Any, task_id: str, status: TaskStatus) -> None:
    """Submit accepts shapes A-D of the reference and the defensive variants."""
    async with make(Script(reply(200, body))) as client:
        task = await client.submit(**GEN)
    assert (task.id, task.status) == (task_id, status)


async def test_submit_sends_json_key_and_no_local_fields() -> None:
    """The body is exact JSON with n as an int; an Idempotency-Key is sent."""
    script = Script(reply(200, SUBMIT_A))
    async with make(script) as client:
        await client.submit({**GEN, "n": 2, "image_urls": ["https://x.test/a.png"]})
    request = script.requests[0]
    assert json.loads(request.content) == {
        **GEN,
        "n": 2,
        "image_urls": ["https://x.test/a.png"],
    }
    assert request.headers["idempotency-key"].startswith("apimart-async-")
    assert request.headers["content-type"] == "application/json"


async def test_submit_accepts_kwargs_dict_and_model() -> None:
    """Kwargs, a dict and a model instance produce the same body."""
    from apimart_async.models import parse_request

    script = Script(reply(200, SUBMIT_A))
    async with make(script) as client:
        await client.submit(**GEN)
        await client.submit(GEN)
        await client.submit(parse_request(GEN))
    bodies = script.bodies()
    assert bodies[0] == bodies[1] == bodies[2] == GEN


async def test_submit_with_local_image_is_refused_before_io() -> None:
    """submit requires URLs; a Path entry is a ValueError and nothing is sent."""
    script = Script(reply(200, SUBMIT_A))
    async with make(script) as client:
        with pytest.raises(ValueError):
            await client.submit(**GEN, image_urls=[Path("ref.png")])
    assert script.requests == []


async def test_caller_idempotency_key_is_used_and_checked() -> None:
    """A caller's key goes out verbatim; a malformed one is refused before I/O."""
    script = Script(reply(200, SUBMIT_A))
    async with make(script) as client:
        await client.submit(GEN, idempotency_key="job-42")
        with pytest.raises(ValueError, match="idempotency_key"):
            await client.submit(GEN, idempotency_key="has space")
    assert [r.headers["idempotency-key"] for r in script.requests] == ["job-42"]


# -- task shapes ----------------------------------------------------------------------


async def test_task_urls_list_and_string_variants_flatten_in_order() -> None:
    """url as list and url as string both flatten into image_urls, every image."""
    urls = [f"https://upload.apimart.ai/f/image/t_{i}.png" for i in range(3)]
    script = Script(
        reply(200, task_body(urls=urls, url_shape="list")),
        reply(200, task_body(urls=urls, url_shape="string")),
    )
    async with make(script) as client:
        a = await client.get_task("task_A")
        b = await client.get_task("task_A")
    assert a.image_urls == b.image_urls == tuple(urls)
    assert a.status is TaskStatus.COMPLETED
    assert a.cost == 0.15 and a.credits_cost == 1.5 and a.estimated_time == 60
    assert a.expires_at is not None and a.expires_at.timestamp() > time.time() + 3600


@pytest.mark.parametrize(
    ("error", "message", "code"),
    [
        ({"code": 500, "message": "upstream 404", "type": "task_failed"}, "upstream 404", 500),
        ({"code": "task_failed", "message": "policy", "param": ""}, "policy", "task_failed"),
        ({"code": "", "message": "empty code"}, "empty code", None),
        ("plain string reason", "plain string reason", None),
    ],
)
async def test_task_error_variants(error: Any, message: str, code: Any) -> None:
    """error as an object with int/str/empty code, or as a plain string."""
    script = Script(reply(200, task_body(status="failed", error=error)))
    async with make(script) as client:
        task = await client.get_task("task_A")
    assert task.status is TaskStatus.FAILED
    assert task.error is not None
    assert (task.error.message, task.error.code) == (message, code)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("submitted", TaskStatus.SUBMITTED),
        ("pending", TaskStatus.PENDING),
        ("processing", TaskStatus.PROCESSING),
        ("in_progress", TaskStatus.IN_PROGRESS),
        ("completed", TaskStatus.COMPLETED),
        ("failed", TaskStatus.FAILED),
        ("cancelled", TaskStatus.CANCELLED),
        ("canceled", TaskStatus.CANCELLED),
        ("SUCCEEDED", TaskStatus.COMPLETED),
        ("warming_up", TaskStatus.UNKNOWN),
    ],
)
async def test_status_vocabulary(raw: str, status: TaskStatus) -> None:
    """Every documented status and the defensive aliases; unknown is non-terminal."""
    body = task_body(status="processing")
    body["data"]["status"] = raw
    async with make(Script(reply(200, body))) as client:
        task = await client.get_task("t")
    assert task.status is status
    assert task.is_terminal == (
        status in {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}
    )


async def test_unknown_fields_never_break_parsing() -> None:
    """Extra fields anywhere are ignored and kept in raw."""
    body = task_body(novel_field={"x": [1, 2]})
    body["extra_top"] = True
    async with make(Script(reply(200, body))) as client:
        task = await client.get_task("task_A")
    assert task.raw["novel_field"] == {"x": [1, 2]}


async def test_task_id_is_path_encoded() -> None:
    """Ids with / or .. stay one encoded path segment, never path injection."""
    script = Script(reply(200, task_body("weird")))
    async with make(script) as client:
        await client.get_task("../../v1/balance")
        await client.get_task("a/b")
    paths = [r.url.raw_path for r in script.requests]
    assert paths[0] == b"/v1/tasks/%2E%2E%2F%2E%2E%2Fv1%2Fbalance"
    assert paths[1] == b"/v1/tasks/a%2Fb"


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, am.BadRequestError),
        (401, am.AuthenticationError),
        (402, am.InsufficientBalanceError),
        (403, am.PermissionDeniedError),
        (404, am.NotFoundError),
        (409, am.ConflictError),
        (413, am.PayloadTooLargeError),
        (422, am.APIStatusError),
        (429, am.RateLimitError),
        (500, am.ServerError),
        (502, am.ServerError),
        (503, am.ServerError),
    ],
)
async def test_status_to_error_class(status: int, cls: type[am.APIStatusError]) -> None:
    """One table maps status to class; fields come from the envelope."""
    body = {
        "error": {
            "code": "",
            "message": "invalid API key (request id: 2026110112345)",
            "param": "",
            "type": "apimart_error",
        }
    }
    async with make(Script(reply(status, body))) as client:
        with pytest.raises(cls) as info:
            await client.get_task("t")
    err = info.value
    assert type(err) is cls
    assert err.status_code == status
    assert err.request_id == "2026110112345"
    assert err.type == "apimart_error" and err.code is None


async def test_error_inside_200_body_is_an_error() -> None:
    """An error envelope in a 2xx body raises, classed by its int code."""
    body = {"error": {"code": 402, "message": "insufficient balance", "type": "payment_required"}}
    async with make(Script(reply(200, body))) as client:
        with pytest.raises(am.InsufficientBalanceError, match="insufficient balance"):
            await client.get_task("t")


async def test_string_code_is_kept() -> None:
    """get_channel_failed arrives as a string code and is kept on the error."""
    body = {
        "error": {
            "message": "Please wait (request id: r1)",
            "type": "apimart_error",
            "param": "",
            "code": "get_channel_failed",
        }
    }
    async with make(Script(reply(400, body)), max_retries=0) as client:
        with pytest.raises(am.BadRequestError) as info:
            await client.get_task("t")
    assert info.value.code == "get_channel_failed"


@pytest.mark.parametrize(
    "content",
    [b"<html><body>502 Bad Gateway</body></html>", b'{"code": 200, "data": {"id": "t', b"[1, 2]"],
)
async def test_unparseable_bodies(content: bytes) -> None:
    """HTML, truncated JSON and wrong shapes raise APIResponseValidationError with an excerpt."""
    async with make(Script(reply(200, content))) as client:
        with pytest.raises(am.APIResponseValidationError) as info:
            await client.get_task("t")
    assert info.value.excerpt


async def test_oversized_body_is_capped() -> None:
    """A body over the cap is refused without being buffered whole."""
    huge = b'{"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    async with make(Script(reply(200, huge)), max_response_bytes=1024 * 1024) as client:
        with pytest.raises(am.APIResponseValidationError, match="cap"):
            await client.get_task("t")


# -- retries --------------------------------------------------------------------------


async def test_task_query_retries_transient_failures() -> None:
    """Connection errors, 502, 429 and HTML bodies are retried for task queries."""
    script = Script(
        httpx.ConnectError("refused"),
        reply(502, "<html>bad gateway</html>"),
        reply(429, {"error": {"message": "slow down"}}, **{"Retry-After": "0"}),
        reply(200, "<html>oops</html>"),
        reply(200, task_body()),
    )
    async with make(script) as client:
        task = await client.get_task("task_A")
    assert task.status is TaskStatus.COMPLETED
    assert len(script.requests) == 5


async def test_4xx_is_not_retried() -> None:
    """A 400 on a task query is final after one request."""
    script = Script(
        reply(
            400,
            {"error": {"code": 400, "message": "无效的任务ID", "type": "invalid_request_error"}},
        )
    )
    async with make(script) as client:
        with pytest.raises(am.BadRequestError):
            await client.get_task("nope")
    assert len(script.requests) == 1


@pytest.mark.parametrize(
    "first",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow connect"),
        reply(429, {"error": {"message": "rate"}}, **{"Retry-After": "0"}),
        reply(503, {"error": {"message": "Please wait and try again later"}}),
        reply(500, {"error": {"message": "Please wait", "code": "get_channel_failed"}}),
        reply(400, {"error": {"message": "Please wait", "code": "get_channel_failed"}}),
    ],
)
async def test_submit_retries_only_when_nothing_was_done(first: Any) -> None:
    """Provably-not-acted failures are retried with the same key and body."""
    script = Script(first, reply(200, SUBMIT_A))
    async with make(script) as client:
        task = await client.submit(GEN)
    assert task.id == "task_A"
    assert len(script.requests) == 2
    keys = {r.headers["idempotency-key"] for r in script.requests}
    assert len(keys) == 1
    assert script.requests[0].content == script.requests[1].content


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("peer closed connection without sending complete message body"),
        httpx.ReadError("connection reset"),
        reply(500, {"error": {"message": "internal"}}),
        reply(502, "<html>bad gateway</html>"),
        reply(504, {"error": {"message": "gateway timeout"}}),
        reply(200, "<html>not json</html>"),
    ],
)
async def test_ambiguous_submit_is_sent_once_and_uncertain(failure: Any) -> None:
    """When the outcome is unknown the submit is never resent; the key is reported."""
    script = Script(failure, reply(200, SUBMIT_A))
    async with make(script) as client:
        with pytest.raises(am.SubmissionUncertainError) as info:
            await client.submit(GEN, idempotency_key="job-7")
    assert len(script.requests) == 1
    err = info.value
    assert err.idempotency_key == "job-7"
    assert err.request == GEN
    assert isinstance(err.__cause__, am.ApimartError)


async def test_retry_uncertain_submits_opt_in_reuses_key() -> None:
    """With the opt-in, an ambiguous submit is resent with the same key and body."""
    script = Script(httpx.ReadTimeout("read timed out"), reply(200, SUBMIT_A))
    async with make(script, retry_uncertain_submits=True) as client:
        task = await client.submit(GEN)
    assert task.id == "task_A"
    assert len({r.headers["idempotency-key"] for r in script.requests}) == 1
    assert len(script.requests) == 2


async def test_submit_4xx_is_final_and_not_uncertain() -> None:
    """A 400 on submit means nothing was created: raised as is, sent once."""
    script = Script(
        reply(400, {"error": {"code": 400, "message": "bad size", "type": "invalid_request_error"}})
    )
    async with make(script) as client:
        with pytest.raises(am.BadRequestError):
            await client.submit(GEN)
    assert len(script.requests) == 1


async def test_retry_after_is_honoured_and_capped() -> None:
    """The wait is the server's (seconds or HTTP date), capped; else exponential."""
    policy = am.RetryPolicy(wait_initial=0.5, wait_jitter=0.0, wait_max=20.0, retry_after_max=60.0)
    retrier = Retrier(policy, is_transient, "task query")
    assert retrier.backoff(1, am.RateLimitError("slow", retry_after=7.5, status_code=429)) == 7.5
    assert retrier.backoff(1, am.RateLimitError("slow", retry_after=3600, status_code=429)) == 60.0
    no_hint = am.RateLimitError("slow", retry_after=None, status_code=429)
    assert [retrier.backoff(n, no_hint) for n in (1, 2, 3, 7)] == [0.5, 1.0, 2.0, 20.0]
    server = am.ServerError(
        "busy", status_code=503, headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}
    )
    assert retrier.backoff(1, server) == 0.0  # a date in the past means "now"
    assert not is_transient(am.BadRequestError("no", status_code=400))
    submit = submit_retryable(retry_uncertain=False)
    assert not submit(am.ServerError("x", status_code=500))
    assert submit(am.ServerError("x", status_code=500, code="get_channel_failed"))
    assert submit_retryable(retry_uncertain=True)(am.ServerError("x", status_code=500))


async def test_retry_after_longer_than_deadline_is_not_slept() -> None:
    """A Retry-After past the caller's deadline raises at once instead of sleeping."""
    import anyio

    script = Script(reply(429, {"error": {"message": "later"}}, **{"Retry-After": "3600"}))
    async with make(script) as client:
        with anyio.fail_after(5):
            with anyio.move_on_after(2):
                with pytest.raises(am.RateLimitError):
                    await client.get_task("t")
    assert len(script.requests) == 1


# -- wait -----------------------------------------------------------------------------


async def test_wait_polls_until_completed() -> None:
    """wait returns the completed task after non-terminal polls."""
    script = Script(
        reply(200, task_body(status="pending")),
        reply(200, task_body(status="processing")),
        reply(200, task_body()),
    )
    events: list[Any] = []
    async with make(script) as client:
        task = await client.wait("task_A", on_event=events.append)
    assert task.status is TaskStatus.COMPLETED
    assert [e.kind for e in events] == ["progress", "progress", "progress", "completed"]


async def test_wait_failed_cancelled_and_timeout() -> None:
    """failed → TaskFailedError with reason; cancelled → TaskCancelledError; deadline → TaskTimeoutError."""
    failed = task_body(
        status="failed", error={"code": "task_failed", "message": "policy violation"}
    )
    async with make(Script(reply(200, failed))) as client:
        with pytest.raises(am.TaskFailedError) as info:
            await client.wait("task_A")
    assert info.value.reason == "policy violation"
    assert info.value.task_id == "task_A" and info.value.task is not None

    async with make(Script(reply(200, task_body(status="cancelled")))) as client:
        with pytest.raises(am.TaskCancelledError):
            await client.wait("task_A")

    async with make(Script(reply(200, task_body(status="processing")))) as client:
        with pytest.raises(am.TaskTimeoutError) as tinfo:
            await client.wait("task_A", timeout=0.5)  # room for polls on a loaded machine
    assert isinstance(tinfo.value, TimeoutError)
    assert tinfo.value.task_id == "task_A"


async def test_pipeline_deadline_names_the_stage_it_interrupted() -> None:
    """Queued for a submit slot: never sent, APITimeoutError; polling: TaskTimeoutError."""
    release = anyio.Event()

    async def held_submit(request: httpx.Request) -> httpx.Response:
        await release.wait()  # the first generate holds the only submit slot meanwhile
        return reply(200, SUBMIT_A)

    script = Script(held_submit, *[reply(200, task_body(status="processing"))] * 200)
    async with make(script, limits=am.Limits(submits=1)) as client, anyio.create_task_group() as tg:
        tg.start_soon(lambda: client.submit(model="imagen-4.0-apimart", prompt="first"))
        await until(lambda: script.requests)
        with anyio.fail_after(5), pytest.raises(am.APITimeoutError) as info:
            await client.generate(model="imagen-4.0-apimart", prompt="p", timeout=0.05)
        assert not isinstance(info.value, am.TaskTimeoutError)
        assert info.value.sent is False and "waiting to submit" in str(info.value)
        assert len(script.requests) == 1  # only the first submit was ever sent
        release.set()
    async with make(script) as client:
        with pytest.raises(am.TaskTimeoutError) as tinfo:
            await client.generate(model="imagen-4.0-apimart", prompt="p", timeout=0.05)
    assert tinfo.value.task is not None and tinfo.value.task.status is TaskStatus.PROCESSING
    assert tinfo.value.timeout == 0.05


async def test_wait_unknown_status_polls_until_deadline() -> None:
    """An unknown status is not terminal: polling continues until the deadline."""
    body = task_body(status="processing")
    body["data"]["status"] = "queued_upstream"
    script = Script(reply(200, body))
    async with make(script) as client:
        with pytest.raises(am.TaskTimeoutError) as info:
            await client.wait("task_A", timeout=0.5)  # room for polls on a loaded machine
    assert info.value.task is not None and info.value.task.status is TaskStatus.UNKNOWN
    assert len(script.requests) > 1


async def test_wait_survives_a_persistent_outage() -> None:
    """Polls failing past their retries do not end the wait; the task is found later."""
    outage = [reply(503, {"error": {"message": "down"}})] * 12
    script = Script(*outage, reply(200, task_body()))
    async with make(script) as client:
        task = await client.wait("task_A", timeout=5)
    assert task.status is TaskStatus.COMPLETED


# -- key containment ------------------------------------------------------------------


async def test_key_only_goes_to_the_api_origin(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Result downloads carry no Authorization; logs and errors never hold the key."""
    from .images import png

    def route(request: httpx.Request) -> httpx.Response:
        if request.url.host == "upload.apimart.ai":
            return httpx.Response(200, content=png(), headers={"content-type": "image/png"})
        if request.url.path.startswith("/v1/tasks/task_A"):
            return reply(200, task_body())
        return reply(401, {"error": {"message": "invalid API key (request id: r)"}})

    script = Script(route)
    caplog.set_level(logging.DEBUG)
    borrowed = httpx.AsyncClient(
        transport=script.transport(), headers={"Authorization": "Bearer other"}
    )
    async with AsyncApimart(api_key=KEY, http_client=borrowed, poll=FAST_POLL) as client:
        task = await client.get_task("task_A")
        files = await client.download(task, tmp_path)
        with pytest.raises(am.AuthenticationError) as info:
            await client.get_task("other")
    await borrowed.aclose()
    assert [f.name for f in files] == ["task_A_0.png"]
    api = [r for r in script.requests if r.url.host == "api.apimart.ai"]
    files_host = [r for r in script.requests if r.url.host != "api.apimart.ai"]
    assert api and files_host
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in api)
    assert all("authorization" not in r.headers for r in files_host)
    assert KEY not in caplog.text
    assert KEY not in str(info.value) and KEY not in repr(info.value)


async def test_a_large_result_streams_to_disk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, client_for: Any
) -> None:
    """Past the in-memory size a result streams into its temporary file; the file
    placed is the whole image either way."""
    from apimart_async import _download
    from apimart_async.testing import RESULT_PNG, FakeApimart

    fake = FakeApimart(api_key="test-key")
    async with client_for(fake) as client:
        task = await client.generate(model="imagen-4.0-apimart", prompt="p")
        small = await client.download(task, tmp_path / "memory")
        monkeypatch.setattr(_download, "IN_MEMORY", 16)  # every chunk after the first: file
        large = await client.download(task, tmp_path / "streamed")
    assert small[0].read_bytes() == large[0].read_bytes() == RESULT_PNG
    assert [p.name for p in (tmp_path / "streamed").iterdir()] == [large[0].name]
