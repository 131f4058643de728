"""Key containment: the API key goes in one place only, the Authorization header of
requests to the API origin, across a workload that uses every public call.

A ``Recorder`` transport sits between the client and the fake and keeps every request
(URL, headers, body); every log record is captured at DEBUG; every exception, event,
outcome and repr the workload produced is kept. Then each is searched for the key.
The workload covers uploads, submits, queries, waits, downloads to a result host on
another origin (and on the API origin itself), failures and retries of every kind,
``generate_many`` with events, and the command line's batch journal when the CLI is
installed. The same checks run over real HTTP (``fake.serve()``) for the transports'
own logging.
"""

from __future__ import annotations

import io
import logging
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import apimart_async as am
from apimart_async import AsyncApimart, Limits, PollPolicy
from apimart_async.testing import FakeApimart, Faults, Latency

from .images import png

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio

KEY = "sk-live-CANARY-5f0e9c2a7b1d4e38"
# Pieces that would betray a partly masked or truncated key too.
NEEDLES = (KEY, KEY[8:], "5f0e9c2a7b1d4e38")
API = "https://api.apimart.ai"
GEM = "gemini-3.1-flash-image-preview"
POLL = PollPolicy().scaled(0.001)
LIMITS = Limits(poll_rate=100_000.0, poll_burst=1_000)


def leaks(text: str | bytes) -> bool:
    """Whether *text* holds the key or a telling piece of it."""
    if isinstance(text, bytes):
        return any(n.encode() in text for n in NEEDLES)
    return any(n in text for n in NEEDLES)


@dataclass
class Seen:
    """One request as it left the client."""

    method: str
    url: httpx.URL
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def is_file(self) -> bool:
        """A GET of an upload or result file (never an API call)."""
        return self.url.path.startswith("/f/")


class Recorder(httpx.AsyncBaseTransport):
    """Keeps every request, whole, on its way to *inner*."""

    def __init__(self, inner: httpx.AsyncBaseTransport, seen: list[Seen]) -> None:
        self.inner = inner
        self.seen = seen

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Record, then forward."""
        body = await request.aread()  # streamed uploads are buffered; the fake reads it again
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        self.seen.append(Seen(request.method, request.url, headers, body))
        return await self.inner.handle_async_request(request)


class RecordingFake(FakeApimart):
    """A fake whose transports record what the client sends (for the CLI's own client)."""

    def __init__(self, seen: list[Seen], **kw: Any) -> None:
        super().__init__(api_key=KEY, **kw)
        self.seen = seen

    def transport(self) -> Recorder:  # type: ignore[override]
        """The fake's transport behind a Recorder."""
        return Recorder(super().transport(), self.seen)


@dataclass
class Evidence:
    """Everything a workload left behind that a user, a log or a crash report might see."""

    seen: list[Seen]
    errors: list[BaseException]
    objects: list[Any]
    texts: list[str]


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """*exc*, its causes and contexts, and the members of exception groups, once each."""
    todo, done = [exc], set[int]()
    while todo:
        current = todo.pop()
        if id(current) in done:
            continue
        done.add(id(current))
        yield current
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
        if isinstance(current, BaseExceptionGroup):
            todo += list(current.exceptions)


def assert_contained(evidence: Evidence, caplog: pytest.LogCaptureFixture) -> None:
    """The key is only in Authorization headers of API requests; nowhere else."""
    for req in evidence.seen:
        where = f"{req.method} {req.url}"
        assert not leaks(str(req.url)), where
        assert not leaks(req.body), where
        auth = [v for k, v in req.headers if k.lower() == "authorization"]
        others = [v for k, v in req.headers if k.lower() != "authorization"]
        assert not any(leaks(v) for v in others), where
        api_call = f"{req.url.scheme}://{req.url.host}" == API and not req.is_file
        assert auth == ([f"Bearer {KEY}"] if api_call else []), where
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in caplog.records:
        assert not leaks(formatter.format(record)), record.getMessage()
        assert not leaks(repr(record.args)), record.getMessage()
    assert caplog.records, "DEBUG logging produced no records at all"
    for error in evidence.errors:
        for exc in exception_chain(error):
            text = "".join(traceback.format_exception(exc))
            assert not leaks(text) and not leaks(repr(exc)), repr(exc)
            assert not leaks(repr(vars(exc))), repr(exc)
    for obj in evidence.objects:
        assert not leaks(repr(obj)) and not leaks(str(obj)), type(obj).__name__
    for text in evidence.texts:
        assert not leaks(text), text[:200]


async def _expect(errors: list[BaseException], call: Any) -> None:
    """Await *call*, which must fail; keep its error."""
    try:
        await call
    except Exception as exc:  # noqa: BLE001 - every kind of failure is evidence
        errors.append(exc)
    else:  # pragma: no cover - the workload is built so each of these fails
        raise AssertionError("expected a failure")


async def run_workload(tmp_path: Path, seen: list[Seen]) -> Evidence:
    """Every public call, successes, failures and retries, through recording transports."""
    errors: list[BaseException] = []
    objects: list[Any] = []
    events: list[am.Event] = []
    fake = FakeApimart(api_key=KEY, latency=Latency.fast())

    def client_for(target: FakeApimart, **kw: Any) -> AsyncApimart:
        transport = Recorder(target.transport(), seen)
        return AsyncApimart(api_key=KEY, transport=transport, poll=POLL, limits=LIMITS, **kw)

    async with client_for(fake) as client:
        objects.append(client)
        # Retries of every safe call and of a provably unsent submit.
        fake.script("upload", ["rate_limit", "reset", "malformed_json", None])
        fake.script("submit", [503, "channel_failed", "rate_limit", None])
        fake.script("poll", ["server_error", "reset", "malformed_json", None])
        fake.script("download", ["reset", 502, None])
        image = await client.upload_image(png(seed=1))
        task = await client.submit(model=GEM, prompt="fox", image_urls=[image.url], n=2)
        objects += [image, task, await client.get_task(task.id)]
        done = await client.wait(task, on_event=events.append)
        files = await client.download(done, tmp_path / "one", on_event=events.append)
        objects += [done, files]
        made = await client.generate(
            model=GEM, prompt="generated", image_urls=[png(seed=2)], on_event=events.append
        )
        objects.append(made)
        # Failures of every kind.
        fake.script("submit", ["drop_after_submit"])
        await _expect(errors, client.submit(model=GEM, prompt="ambiguous"))
        fake.script("task", ["task_failed"])
        await _expect(errors, client.generate(model=GEM, prompt="fails", on_event=events.append))
        fake.script("task", ["task_stuck"])
        await _expect(errors, client.generate(model=GEM, prompt="stuck", timeout=0.05))
        await _expect(errors, client.get_task("no-such-task"))
        fake.script("upload", [413])
        await _expect(errors, client.upload_image(png(seed=3), cache=False))
        fake.script("poll", [402])
        await _expect(errors, client.get_task(task.id))
        await _expect(
            errors, client.download(["https://upload.apimart.ai/f/missing.png"], tmp_path)
        )
        await _expect(errors, client.generate(model=GEM, prompt=""))
        await _expect(errors, client.upload_image(tmp_path / "missing.png"))
        # Many at once, with faults, invalid items, events and downloads.
        fake.faults = Faults(server_error=0.1, rate_limit=0.05, reset=0.03, task_failure=0.1)
        items: list[Any] = [{"model": GEM, "prompt": f"batch {i}"} for i in range(40)]
        items += [{"model": GEM, "prompt": ""}, {"model": "nope", "prompt": "x"}, "not a dict"]
        async with client.generate_many(
            items, concurrency=10, download_to=tmp_path / "many", on_event=events.append
        ) as outcomes:
            async for outcome in outcomes:
                objects.append(outcome)
                if outcome.error is not None:
                    errors.append(outcome.error)
    # The service rejects our key: the 401 must not echo or reveal it.
    other = FakeApimart(api_key="some-other-key")
    async with client_for(other) as client:
        await _expect(errors, client.get_task("task_x"))
    # Results served from the API origin itself: still fetched without the key.
    on_api = FakeApimart(api_key=KEY, files_base_url=API)
    async with client_for(on_api) as client:
        task = await client.generate(model=GEM, prompt="files on the api host", n=2)
        objects += [task, await client.download(task, tmp_path / "api-host")]
    assert fake.stats.file_requests_with_auth == 0 and on_api.stats.file_requests_with_auth == 0
    objects += events
    return Evidence(seen, errors, objects, [])


async def test_key_only_in_authorization_to_the_api_origin(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every public call, failure and retry: the key only in Authorization to the API origin."""
    caplog.set_level(logging.DEBUG)
    seen: list[Seen] = []
    evidence = await run_workload(tmp_path, seen)
    assert len(seen) > 100
    assert any(isinstance(e, am.SubmissionUncertainError) for e in evidence.errors)
    assert any(isinstance(e, am.AuthenticationError) for e in evidence.errors)
    files = [s for s in seen if s.is_file]
    assert {s.url.host for s in files} == {"upload.apimart.ai", "api.apimart.ai"}
    assert_contained(evidence, caplog)


async def test_key_contained_over_real_http(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over a real socket (httpx or aiohttp underneath): no log line or error shows the key."""
    caplog.set_level(logging.DEBUG)
    faults = Faults(reset=0.1, server_error=0.1, only=("upload", "poll", "download"))
    fake = FakeApimart(api_key=KEY, faults=faults)
    errors: list[BaseException] = []
    objects: list[Any] = []
    async with fake.serve() as base_url:
        async with AsyncApimart(api_key=KEY, base_url=base_url, poll=POLL, limits=LIMITS) as c:
            task = await c.generate(model=GEM, prompt="over http", image_urls=[png(seed=9)])
            objects += [task, await c.download(task, tmp_path), c]
            await _expect(errors, c.get_task("no-such-task"))
        other = FakeApimart(api_key="another-key")
        async with other.serve() as other_url, AsyncApimart(api_key=KEY, base_url=other_url) as c:
            await _expect(errors, c.get_task("task_x"))
    assert fake.stats.file_requests_with_auth == 0
    assert all(r.authorized for r in fake.requests if r.endpoint != "download")
    assert_contained(Evidence([], errors, objects, []), caplog)


def test_key_never_reaches_the_batch_journal_or_output(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """apimart batch: journal, results, stdout and stderr never hold the key."""
    app = pytest.importorskip("apimart_async.cli._app")
    setup = pytest.importorskip("apimart_async.cli._setup")
    caplog.set_level(logging.DEBUG)
    seen: list[Seen] = []
    fake = RecordingFake(
        seen, faults=Faults(drop_after_submit=0.1, server_error=0.1, task_failure=0.1)
    )
    jobs = tmp_path / "jobs.jsonl"
    (tmp_path / "ref.png").write_bytes(png(seed=5))
    lines = [
        f'{{"model": "{GEM}", "prompt": "p{i}", "image_urls": ["ref.png"]}}' for i in range(20)
    ]
    jobs.write_text("\n".join([*lines, '{"model": "nope", "prompt": "x"}']) + "\n")
    out = tmp_path / "out"
    texts: list[str] = []
    for extra in ([], ["--resubmit-uncertain"]):  # a rerun resumes from the journal
        stdout, stderr = io.StringIO(), io.StringIO()
        argv = ["batch", str(jobs), "--out", str(out), "--progress", "plain", *extra]
        app.run(argv, runtime=setup.Runtime(fake=fake), stdout=stdout, stderr=stderr)
        texts += [stdout.getvalue(), stderr.getvalue()]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.startswith("journal") for p in written)
    for path in written:
        assert not leaks(path.read_bytes()), path
    assert seen
    assert_contained(Evidence(seen, [], [], texts), caplog)


async def test_reprs_of_everything_that_holds_the_key() -> None:
    """The client, its HTTP core, and a borrowed client's wrapper never show the key."""
    async with httpx.AsyncClient() as borrowed:
        client = AsyncApimart(api_key=KEY, http_client=borrowed)
        res = client._res
        for obj in (client, res, res.http, res.http.transport, vars(client)):
            assert not leaks(repr(obj)) and not leaks(str(obj))
        await client.aclose()
    with pytest.raises(ValueError) as info:
        AsyncApimart(api_key=KEY, base_url="ftp://nowhere")
    assert not leaks(str(info.value))
