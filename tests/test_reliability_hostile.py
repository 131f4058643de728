"""Hostile or broken responses: every one ends as a typed error or a sane result.

HTML and truncated bodies, JSON of the wrong type at every level of every body,
numbers JSON can carry but Python chokes on, 10 MB bodies, task ids built to escape
their path segment, result URLs on other schemes or on the API host, downloads that
are not images or too big, and slowloris servers. The rule throughout: the caller sees
the result or an ``ApimartError`` subclass, never a ``KeyError``, ``TypeError``, bare
``ValueError`` or an httpx exception, and no request goes anywhere it should not.
"""

from __future__ import annotations

import copy
import gc
import json
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from anyio.abc import SocketAttribute, SocketStream

import apimart_async as am
from apimart_async import AsyncApimart
from apimart_async._exceptions import status_error_class

from .conftest import FAST_POLL
from .images import png
from .mock import SUBMIT_A, Script, reply, task_body

pytestmark = [
    pytest.mark.anyio,
    # When the client abandons a body mid-stream (over a cap, not an image, cancelled),
    # httpx's inner generators (Response.aiter_raw, its stream's __aiter__) are left to
    # the garbage collector, which trio reports. That part is httpx's; the iterator the
    # client owns is closed (test_rejected_bodies_close_their_stream checks it).
    pytest.mark.filterwarnings("ignore:Async generator .* was garbage collected:ResourceWarning"),
]

KEY = "sk-hostile-0123456789abcdef"
GEN = {"model": "gemini-3-pro-image-preview", "prompt": "a fox"}
MB = 1024 * 1024
API_HOST = "api.apimart.ai"
FILES = "https://files.example"

# Wrong-typed stand-ins for any JSON node (finite numbers only; see the NaN test).
REPLACEMENTS: list[Any] = [
    None,
    True,
    0,
    -1,
    1.5,
    2**63,
    "",
    "xyz",
    [],
    {},
    [None],
    {"x": None},
    "2026-01-01T00:00:00Z",
]


def make(script: Script, **kw: Any) -> AsyncApimart:
    """A client over *script* with the fast poll schedule."""
    kw.setdefault("poll", FAST_POLL)
    return AsyncApimart(api_key=KEY, transport=script.transport(), **kw)


def node_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every node in a JSON document, the root included."""
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from node_paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from node_paths(value, (*prefix, i))


def mutated(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of *doc* with the node at *path* replaced by *value*."""
    if not path:
        return copy.deepcopy(value)
    out = copy.deepcopy(doc)
    node = out
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = copy.deepcopy(value)
    return out


def mutations(doc: Any) -> Iterator[Any]:
    """*doc* with each node, in turn, replaced by each wrong-typed value."""
    for path in node_paths(doc):
        for value in REPLACEMENTS:
            yield mutated(doc, path, value)


class Replies:
    """A Script step answering every request with the body set on it."""

    def __init__(self) -> None:
        self.body: Any = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if isinstance(self.body, bytes):
            return httpx.Response(200, content=self.body)
        return reply(200, self.body)


# -- bodies of the wrong shape ------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>",
        b'{"code": 200, "data": {"id": "task_A", "status": "comp',
        b"",
        b"\xff\xfe\x00garbage",
        b"null",
        b'"a string"',
        b"42",
    ],
)
async def test_unreadable_2xx_bodies_on_every_endpoint(content: bytes) -> None:
    """HTML, truncated, empty, binary or scalar 2xx bodies: typed errors; a submit is uncertain."""
    async with make(Script(reply(200, content))) as client:
        with pytest.raises(am.APIResponseValidationError):
            await client.upload_image(png(), cache=False)
        with pytest.raises(am.APIResponseValidationError):
            await client.get_task("task_A")
        with pytest.raises(am.TaskTimeoutError):  # unreadable polls are retried to the end
            await client.wait("task_A", timeout=0.2)
        with pytest.raises(am.SubmissionUncertainError):  # the task may exist
            await client.submit(GEN)


async def test_task_bodies_with_wrong_types_at_every_level() -> None:
    """Every node of a task body replaced by every wrong type: a Task or a typed error."""
    replies = Replies()
    async with make(Script(replies)) as client:
        for body in mutations(task_body()):
            replies.body = body
            try:
                task = await client.get_task("task_A")
            except am.APIResponseValidationError:
                continue
            assert isinstance(task.id, str) and task.id
            assert isinstance(task.status, am.TaskStatus)
            assert all(isinstance(u, str) for u in task.image_urls)


async def test_upload_bodies_with_wrong_types_at_every_level() -> None:
    """Every node of an upload body replaced: an UploadedImage with an http(s) URL, or typed."""
    good = {
        "url": f"{FILES}/f/image/abc.png",
        "filename": "abc.png",
        "content_type": "image/png",
        "bytes": 70,
        "created_at": 1763088289,
    }
    replies = Replies()
    async with make(Script(replies)) as client:
        for body in [*mutations(good), {"data": good}, {"data": [good]}]:
            replies.body = body
            try:
                image = await client.upload_image(png(), cache=False)
            except am.APIResponseValidationError:
                continue
            assert image.url.startswith(("http://", "https://"))


async def test_submit_bodies_with_wrong_types_are_a_task_or_uncertain() -> None:
    """Every node of a submit body replaced: a Task, or SubmissionUncertainError (never else)."""
    replies = Replies()
    async with make(Script(replies)) as client:
        for body in mutations(SUBMIT_A):
            replies.body = body
            try:
                task = await client.submit(GEN)
            except am.SubmissionUncertainError:
                continue
            assert isinstance(task.id, str) and task.id


@pytest.mark.parametrize(
    "body",
    [
        {},
        [],
        None,
        {"code": 200, "data": []},
        {"code": 200, "data": [{"status": "submitted"}]},
        {"code": 200, "data": [{"task_id": 5}]},
        {"code": 200, "data": {"id": None}},
        {"id": "   "},
    ],
)
async def test_submit_2xx_without_a_task_id_is_uncertain(body: Any) -> None:
    """A 2xx submit whose body names no task is SubmissionUncertainError with the key."""
    async with make(Script(reply(200, body))) as client:
        with pytest.raises(am.SubmissionUncertainError) as info:
            await client.submit(GEN, idempotency_key="job-1")
    assert info.value.idempotency_key == "job-1"


async def test_non_finite_and_huge_numbers_never_escape_as_bare_errors() -> None:
    """NaN, Infinity and 400-digit integers (valid for json.loads) in any numeric field."""
    numbers = ["NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400]
    fields = ["created", "completed", "progress", "estimated_time", "actual_time", "cost"]
    completed = task_body()["data"]
    replies = Replies()
    failures: list[str] = []
    async with make(Script(replies)) as client:
        for field in fields:
            for number in numbers:
                body = {"code": 200, "data": {**completed, field: "NUMBER"}}
                replies.body = json.dumps(body).replace('"NUMBER"', number).encode()
                try:
                    await client.get_task("task_A")
                except am.APIResponseValidationError:
                    pass
                except Exception as exc:  # noqa: BLE001 - collected and reported below
                    failures.append(f"task {field}={number}: {type(exc).__name__}")
        for number in numbers:
            upload = {"url": f"{FILES}/a.png", "created_at": "NUMBER"}
            replies.body = json.dumps(upload).replace('"NUMBER"', number).encode()
            try:
                await client.upload_image(png(), cache=False)
            except am.APIResponseValidationError:
                pass
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append(f"upload created_at={number}: {type(exc).__name__}")
    assert failures == []


@pytest.mark.parametrize("status", [400, 404, 429, 500])
@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>error</body></html>",
        b"",
        b"null",
        b"[]",
        b'"just a string"',
        b'{"error": 5}',
        b'{"error": []}',
        b'{"error": {"message": 5, "code": [1], "type": {}, "param": null}}',
        b'{"error": {"code": {"nested": true}}}',
        b'{"message": ["x"], "msg": {}}',
        b'{"error": {"message": "' + b"x" * 100_000 + b'"}}',
    ],
)
async def test_error_bodies_of_every_shape_map_to_their_status(status: int, body: bytes) -> None:
    """Whatever an error body looks like, the error is the status's class with a message."""
    async with make(Script(reply(status, body)), max_retries=0) as client:
        with pytest.raises(am.APIStatusError) as info:
            await client.get_task("task_A")
    assert isinstance(info.value, status_error_class(status))
    assert info.value.status_code == status and str(info.value)


async def test_error_code_that_only_looks_numeric() -> None:
    """An error code such as '²' is kept as a string, not a crash."""
    body = {"error": {"code": "²", "message": "odd"}}
    async with make(Script(reply(400, body)), max_retries=0) as client:
        with pytest.raises(am.BadRequestError):
            await client.get_task("task_A")


# -- size caps ----------------------------------------------------------------------


class Endless(httpx.AsyncByteStream):
    """*total* bytes in 64 KB chunks, counting what was actually read."""

    def __init__(self, total: int, head: bytes = b'{"pad": "') -> None:
        self.total = total
        self.head = head
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunk = b"x" * (64 * 1024)
        yield self.head
        self.sent = len(self.head)
        while self.sent < self.total:
            yield chunk
            self.sent += len(chunk)

    async def aclose(self) -> None:
        """Nothing to release."""


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_ten_megabyte_api_body_is_refused_at_the_cap(declared: bool) -> None:
    """A 10 MB JSON body hits the default 4 MB cap without being read whole."""
    stream = Endless(10 * MB)
    headers = {"content-length": str(10 * MB)} if declared else {}
    script = Script(lambda request: httpx.Response(200, headers=headers, stream=stream))
    async with make(script, max_retries=0) as client:
        with pytest.raises(am.APIResponseValidationError, match="cap"):
            await client.get_task("task_A")
    assert stream.sent <= 4 * MB + 64 * 1024


def _file_route(body_for: dict[str, httpx.Response | Any]) -> Any:
    """A Script step answering the given URLs (a Response, or a function of the request)."""

    def route(request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url in body_for:
            answer = body_for[url]
            if isinstance(answer, httpx.Response):  # a fresh copy per request
                return httpx.Response(
                    answer.status_code, headers=answer.headers, content=answer.content
                )
            return answer(request)
        return reply(404, b"not found")

    return route


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_download_larger_than_the_cap_leaves_no_file(tmp_path: Path, declared: bool) -> None:
    """A result image over the download cap is refused early and leaves nothing behind."""
    stream = Endless(10 * MB, head=png()[:16])
    headers = {"content-length": str(10 * MB)} if declared else {}
    url = f"{FILES}/big.png"
    script = Script(
        _file_route({url: lambda request: httpx.Response(200, headers=headers, stream=stream)})
    )
    async with make(script, max_retries=0, max_download_bytes=MB) as client:
        with pytest.raises(am.APIResponseValidationError, match="cap"):
            await client.download([url], tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert stream.sent <= 2 * MB


@pytest.mark.parametrize(
    "content",
    [b"<html>403 Forbidden</html>", b'{"error": "expired"}', b"", b"GIF8", b"\x89PNG\r\n"],
)
async def test_download_that_is_not_an_image_leaves_no_file(tmp_path: Path, content: bytes) -> None:
    """HTML, JSON, empty or cut-off results fail typed; nothing is written."""
    url = f"{FILES}/r.png"
    script = Script(_file_route({url: httpx.Response(200, content=content)}))
    async with make(script, max_retries=0) as client:
        with pytest.raises(am.APIResponseValidationError):
            await client.download([url], tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["api-over-cap", "download-not-image", "download-over-cap"])
async def test_rejected_bodies_close_their_stream(tmp_path: Path, case: str) -> None:
    """The body iterator the client abandons mid-stream is closed, not left to the GC."""
    # httpx's own inner generators (aiter_raw, the stream's __aiter__) cannot be closed
    # from outside without draining the body, so trio still reports those; the one the
    # client iterates, Response.aiter_bytes, must be closed (contextlib.aclosing).
    url = f"{FILES}/r.png"
    if case == "api-over-cap":
        script = Script(lambda request: httpx.Response(200, stream=Endless(2 * MB)))
    elif case == "download-not-image":
        script = Script(_file_route({url: lambda r: httpx.Response(200, stream=Endless(MB))}))
    else:
        big = Endless(4 * MB, head=png()[:16])
        script = Script(_file_route({url: lambda r: httpx.Response(200, stream=big)}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with make(script, max_retries=0, max_response_bytes=MB, max_download_bytes=MB) as c:
            try:
                if case == "api-over-cap":
                    await c.get_task("task_A")
                else:
                    await c.download([url], tmp_path)
            except am.APIResponseValidationError:
                pass
        gc.collect()
    warned = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert [m for m in warned if "Response.aiter_bytes" in m] == []


# -- ids and URLs that try to go somewhere else ----------------------------------------

EVIL_IDS = [
    "../../v1/balance",
    "a/b",
    "..",
    ".",
    "a?b=c#d",
    "%2e%2e%2f",
    "task 1",
    "täsk/ü",
    "..\\..\\x",
    ".hidden",
]


@pytest.mark.parametrize("task_id", EVIL_IDS)
async def test_server_supplied_task_ids_stay_one_segment_and_one_folder(
    tmp_path: Path, task_id: str
) -> None:
    """An id from the service is URL-encoded into one segment and cannot leave dest/."""
    dest = tmp_path / "out"

    def route(request: httpx.Request) -> httpx.Response:
        if request.url.host != API_HOST:
            return httpx.Response(200, content=png())
        if request.method == "POST":
            return reply(200, {"code": 200, "data": [{"status": "submitted", "task_id": task_id}]})
        return reply(200, task_body(task_id, urls=(f"{FILES}/r.png",)))

    script = Script(route)
    async with make(script) as client:
        task = await client.generate(GEN)
        paths = await client.download(task, dest)
    assert task.id == task_id
    expected = b"/v1/tasks/" + quote(task_id, safe="").replace(".", "%2E").encode()
    polls = [r for r in script.requests if r.method == "GET" and r.url.host == API_HOST]
    assert polls and all(r.url.raw_path == expected for r in polls)
    assert [p.parent for p in paths] == [dest]
    assert all(not p.name.startswith(".") for p in paths)
    assert sorted(p.name for p in dest.iterdir()) == [p.name for p in paths]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://files.example/r.png",
        "javascript:alert(1)",
        "data:image/png;base64,iVBORw0KGgo=",
        "//files.example/r.png",
        "/v1/balance",
        "gopher://files.example/",
    ],
)
async def test_result_urls_on_other_schemes_are_never_fetched(tmp_path: Path, url: str) -> None:
    """A result URL that is not http(s) is refused before any request, in download and batches."""
    script = Script(reply(200, task_body(urls=(url,))))
    async with make(script) as client:
        task = await client.get_task("task_A")
        with pytest.raises(am.APIResponseValidationError, match="scheme"):
            await client.download(task, tmp_path)
        async with client.generate_many(
            [GEN], known_tasks=lambda i, r: "task_A", download_to=tmp_path
        ) as outcomes:
            [outcome] = [o async for o in outcomes]
    assert isinstance(outcome.error, am.APIResponseValidationError)
    assert all(r.url.host == API_HOST for r in script.requests)
    assert list(tmp_path.iterdir()) == []


async def test_result_url_on_the_api_host_gets_no_key(tmp_path: Path) -> None:
    """A result URL (or a redirect) pointing at the API host is fetched without the key."""
    on_api = f"https://{API_HOST}/v1/uploads/images/steal.png"
    via_redirect = f"{FILES}/hop.png"
    script = Script(
        _file_route(
            {
                "https://api.apimart.ai/v1/tasks/task_A": reply(
                    200, task_body(urls=(on_api, via_redirect))
                ),
                on_api: httpx.Response(200, content=png()),
                via_redirect: httpx.Response(302, headers={"location": on_api}),
            }
        )
    )
    async with make(script) as client:
        task = await client.get_task("task_A")
        paths = await client.download(task, tmp_path)
    assert len(paths) == 2
    fetched = [r for r in script.requests if r.url.path != "/v1/tasks/task_A"]
    assert len(fetched) == 3  # on_api, the redirect, and where it led
    for r in fetched:
        assert "authorization" not in r.headers
        assert KEY not in str(r.url) and KEY.encode() not in r.content


async def test_redirect_of_a_result_to_another_scheme_is_a_typed_error(tmp_path: Path) -> None:
    """A result host redirecting to file:// fails as an ApimartError and writes nothing."""
    url = f"{FILES}/r.png"
    script = Script(
        _file_route({url: httpx.Response(302, headers={"location": "file:///etc/passwd"})})
    )
    async with make(script, max_retries=0) as client:
        with pytest.raises(am.ApimartError):
            await client.download([url], tmp_path)
    assert list(tmp_path.iterdir()) == []


def _gzip_garbage(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200, headers={"content-encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip at all")
    )


@pytest.mark.parametrize("case", ["api-bad-gzip", "download-bad-gzip", "download-redirect-loop"])
async def test_httpx_errors_beyond_transport_errors_are_typed(tmp_path: Path, case: str) -> None:
    """A body that fails to decode, or a redirect loop, is an ApimartError."""
    url = f"{FILES}/r.png"
    loop = httpx.Response(302, headers={"location": url})
    routes = {"download-bad-gzip": _gzip_garbage, "download-redirect-loop": loop}
    script = Script(_gzip_garbage if case == "api-bad-gzip" else _file_route({url: routes[case]}))
    async with make(script, max_retries=0) as client:
        with pytest.raises(am.ApimartError):
            if case == "api-bad-gzip":
                await client.get_task("task_A")
            else:
                await client.download([url], tmp_path)


# -- slowloris ----------------------------------------------------------------------


async def _trickle(stream: SocketStream) -> None:
    """Answer any request with headers, then one byte every 50 ms, forever."""
    try:
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive()
        await stream.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
        )
        while True:
            await stream.send(b" ")
            await anyio.sleep(0.05)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
        pass
    finally:
        await stream.aclose()


async def _slowloris(actions: list[str], timeout: float, folder: Path) -> dict[str, bool]:
    """Run *actions* at once against a trickling server; which ended (typed) within 1.5 s."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    base = f"http://127.0.0.1:{port}"
    ended: dict[str, bool] = {}

    async def run(client: AsyncApimart, action: str) -> None:
        with anyio.move_on_after(1.5) as guard:
            with pytest.raises(am.ApimartError):
                if action == "get_task":
                    await client.get_task("task_A")
                elif action == "wait":
                    await client.wait("task_A", timeout=0.5)
                else:
                    await client.download([f"{base}/r.png"], folder)
        ended[action] = not guard.cancelled_caught

    async with anyio.create_task_group() as server:
        server.start_soon(listener.serve, _trickle)
        client = AsyncApimart(
            api_key=KEY, base_url=base, timeout=timeout, poll=FAST_POLL, max_retries=0
        )
        async with client, anyio.create_task_group() as tg:
            for action in actions:
                tg.start_soon(run, client, action)
        server.cancel_scope.cancel()
    await listener.aclose()
    return ended


async def test_slowloris_poll_is_bounded_by_the_wait_deadline(tmp_path: Path) -> None:
    """A trickling task query cannot hold wait() past its deadline (TaskTimeoutError)."""
    assert await _slowloris(["wait"], 0.2, tmp_path) == {"wait": True}


async def test_slowloris_response_is_bounded_by_the_request_timeout(tmp_path: Path) -> None:
    """A body trickling in under the read timeout still ends: one request has a deadline."""
    ended = await _slowloris(["get_task", "download"], 0.2, tmp_path)
    assert ended == {"get_task": True, "download": True}
