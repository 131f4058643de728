"""Shared fixtures: every async test runs on asyncio and trio, with instant retries."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import stamina

from apimart_async import AsyncApimart, Limits, PollPolicy
from apimart_async.testing import FakeApimart, FakeTransport

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
async def client(fake: FakeApimart, client_for: ClientFor) -> AsyncIterator[AsyncApimart]:
    """A client wired to the fake, polling on the scaled-down schedule."""
    async with client_for(fake) as c:
        yield c


async def until(predicate: Callable[[], object], *, timeout: float = 5.0) -> None:
    """Wait until *predicate()* is true (something another task reports), or fail."""
    import anyio

    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the condition is not ours to signal
            await anyio.sleep(0.002)


# -- OpenTelemetry, suite-wide -----------------------------------------------------------
#
# The SDK (tests group only) is installed as the global provider once per session, so
# every client in every test traces and counts: the key-containment check below reads
# every span, and tests/test_telemetry.py reads the trees. Clients decide when they are
# created, so this must happen before any test builds one.

SPANS: Any = None  # the in-memory span exporter, or None without the SDK
METRICS: Any = None  # the in-memory metric reader


def _install_telemetry() -> None:
    global SPANS, METRICS
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        return
    SPANS = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(SPANS))
    trace.set_tracer_provider(provider)
    METRICS = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[METRICS]))


_install_telemetry()


# -- building clients ---------------------------------------------------------------------


ClientFor = Callable[..., AsyncApimart]


@pytest.fixture
def client_for() -> ClientFor:
    """``client_for(fake, **kw)``: a client on *fake*'s in-process transport, polling fast.

    Keyword arguments override the defaults (fast poll schedule, a poll budget for
    tasks that last milliseconds).
    """

    def make(fake: FakeApimart, **kw: Any) -> AsyncApimart:
        kw.setdefault("api_key", fake.api_key)
        kw.setdefault("poll", FAST_POLL)
        kw.setdefault("limits", FAST_LIMITS)
        if "http_client" not in kw and "base_url" not in kw:
            kw.setdefault("transport", fake.transport())
        return AsyncApimart(**kw)

    return make


# -- key containment, suite-wide ---------------------------------------------------------

_POLICED_LENGTH = 8  # shorter keys ("test") are too common a word to police


@pytest.fixture(autouse=True)
def _key_containment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every in-process request and every log record: a key only in ``Authorization``
    on an API path (``/v1/...``), never in a URL, a body, another header or a log line.

    Observed at the public transport boundary (the fake's in-process transport and
    ``httpx.MockTransport``), so it holds whatever path a request took inside the
    client. Keys are learned from the ``Authorization`` headers of API requests.
    """
    keys: set[str] = set()
    problems: list[str] = []

    def check(request: httpx.Request) -> None:
        url = str(request.url)
        auth = request.headers.get("authorization", "")
        api_path = "/v1/" in request.url.path
        if auth.startswith("Bearer ") and len(auth) - 7 >= _POLICED_LENGTH:
            if api_path:
                keys.add(auth[7:])
            else:
                problems.append(f"Authorization sent to a non-API URL {url}")
        body = request.content if isinstance(request.stream, httpx.ByteStream) else b""
        for key in keys:
            if key in url:
                problems.append(f"key in URL {url}")
            if key.encode() in body:
                problems.append(f"key in the body of {url}")
            for name, value in request.headers.items():
                if key in value and name.lower() != "authorization":
                    problems.append(f"key in header {name!r} of {url}")

    def watched(cls: Any) -> None:
        handle = cls.handle_async_request

        async def handle_async_request(self: Any, request: httpx.Request) -> Any:
            check(request)
            return await handle(self, request)

        monkeypatch.setattr(cls, "handle_async_request", handle_async_request)

    watched(FakeTransport)
    watched(httpx.MockTransport)

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = logging.Formatter().format(record) + repr(vars(record))
            problems.extend(f"key in a log record of {record.name}" for k in keys if k in text)

    root = logging.getLogger()
    handler, level = Watch(logging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    if SPANS is not None:
        SPANS.clear()
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    for span in SPANS.get_finished_spans() if SPANS is not None else ():
        text = repr(dict(span.attributes or {})) + repr(
            [(e.name, dict(e.attributes or {})) for e in span.events]
        )
        problems.extend(f"key in span {span.name}" for k in keys if k in text)
    if problems:
        pytest.fail("API key leaked:\n" + "\n".join(sorted(set(problems))), pytrace=False)
