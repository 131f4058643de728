"""Shared fixtures: every async test runs on asyncio and trio, with instant retries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import stamina

from apimart_async import AsyncApimart, Limits, PollPolicy
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
