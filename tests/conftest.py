"""Shared fixtures: every async test runs on asyncio and trio, with instant retries."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx
import pytest
import stamina

from apimart_async import AsyncApimart, Limits, PollPolicy, _http
from apimart_async.testing import FakeApimart

# Poll 1,000x faster than the real schedule, against a fake whose tasks last ms.
FAST_POLL = PollPolicy().scaled(0.001)
# The default poll budget (50/s) is for real latencies; fake tasks last milliseconds.
FAST_LIMITS = Limits(poll_rate=100_000.0, poll_burst=1_000)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each async test once per backend."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _stamina_testing() -> Iterator[None]:
    """No backoff sleeps; up to 5 attempts so retry paths are exercised."""
    with stamina.set_testing(True, attempts=5, cap=True):
        yield


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up a developer's real key or base URL."""
    monkeypatch.delenv("APIMART_API_KEY", raising=False)
    monkeypatch.delenv("APIMART_BASE_URL", raising=False)


@pytest.fixture
def fake() -> FakeApimart:
    """A fresh in-process fake service with fast tasks."""
    return FakeApimart(api_key="test-key")


@pytest.fixture
async def client(fake: FakeApimart) -> AsyncIterator[AsyncApimart]:
    """A client wired to the fake, polling on the scaled-down schedule."""
    async with AsyncApimart(
        api_key="test-key", transport=fake.transport(), poll=FAST_POLL, limits=FAST_LIMITS
    ) as c:
        yield c


# -- key containment, suite-wide ---------------------------------------------------------

_POLICED_LENGTH = 8  # shorter keys ("test") are too common a word to police
_IN_API_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("_IN_API_CALL", default=False)


@pytest.fixture(autouse=True)
def _key_containment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every request and DEBUG log record: a key only in Authorization to its API origin.

    API calls bypass ``httpx.AsyncClient.send`` (they go straight to the transport), so
    the exchange factories of ``_http`` are watched too; downloads go through ``send``.
    """
    keys: dict[str, str] = {}  # key -> its client's API origin
    problems: list[str] = []

    def origin(url: httpx.URL) -> str:
        port = url.port or (443 if url.scheme == "https" else 80)
        return f"{url.scheme}://{url.host}:{port}"

    def check(url: str, headers: Iterable[tuple[str, str]], body: object) -> None:
        parsed = httpx.URL(url)
        for key, api_origin in keys.items():
            if key in url:
                problems.append(f"key in URL {url}")
            if isinstance(body, bytes | bytearray) and key.encode() in body:
                problems.append(f"key in the body of {url}")
            for name, value in headers:
                if key in value and not (
                    name.lower() == "authorization"
                    and _IN_API_CALL.get()
                    and origin(parsed) == api_origin
                ):
                    problems.append(f"key in header {name!r} of {url}")

    core_init = _http.HttpCore.__init__

    def init(self: Any, client: Any, *, api_key: str, base_url: httpx.URL, **kw: Any) -> None:
        if len(api_key) >= _POLICED_LENGTH:
            keys[api_key] = origin(httpx.URL(str(base_url)))
        core_init(self, client, api_key=api_key, base_url=base_url, **kw)

    def watched(make: Any) -> Any:
        def factory(target: Any) -> Any:
            exchange = make(target)

            async def watched_exchange(
                method: str, url: str, headers: dict[str, str], content: Any, timeout: Any, cap: int
            ) -> Any:
                token = _IN_API_CALL.set(True)
                try:
                    check(url, headers.items(), content)
                    return await exchange(method, url, headers, content, timeout, cap)
                finally:
                    _IN_API_CALL.reset(token)

            return watched_exchange

        return factory

    send = httpx.AsyncClient.send

    async def watched_send(self: httpx.AsyncClient, request: httpx.Request, **kw: Any) -> Any:
        body = request.content if isinstance(request.stream, httpx.ByteStream) else None
        check(str(request.url), request.headers.multi_items(), body)
        return await send(self, request, **kw)

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = logging.Formatter().format(record)
            problems.extend(f"key in a log record of {record.name}" for k in keys if k in text)

    monkeypatch.setattr(_http.HttpCore, "__init__", init)
    monkeypatch.setattr(_http, "via_transport", watched(_http.via_transport))
    monkeypatch.setattr(_http, "via_client", watched(_http.via_client))
    monkeypatch.setattr(httpx.AsyncClient, "send", watched_send)
    root = logging.getLogger()
    handler, level = Watch(logging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    if problems:
        pytest.fail("API key leaked:\n" + "\n".join(sorted(set(problems))), pytrace=False)
