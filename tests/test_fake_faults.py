"""FakeApimart's fault injection: every fault kind, scripts, probabilities and scoping.

The property that matters most for a paid API: faults that say "nothing was done"
(connect error, reset, 429, 5xx, channel failure, error in a 200) never create a
task, while the ambiguous ones (drop after submit, stall, malformed body) do.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from apimart_async.testing import FakeApimart, Fault, Faults, Latency, Variants

pytestmark = pytest.mark.anyio

API = "https://api.apimart.ai"
BODY = {"model": "imagen-4.0-apimart", "prompt": "a lighthouse"}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each async test once per backend."""
    return str(request.param)


def client(fake: FakeApimart, **kwargs: Any) -> httpx.AsyncClient:
    """A plain httpx client wired to *fake* with the right key."""
    return httpx.AsyncClient(
        transport=fake.transport(),
        base_url=API,
        headers={"Authorization": f"Bearer {fake.api_key}"},
        **kwargs,
    )


async def submit(c: httpx.AsyncClient, **headers: str) -> httpx.Response:
    """POST the standard generation body."""
    return await c.post("/v1/images/generations", json=BODY, headers=headers)


async def submit_id(c: httpx.AsyncClient) -> str:
    """Submit and return the new task's id."""
    response = await submit(c)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["data"][0]["task_id"]
    return task_id


# -- transport-level faults ----------------------------------------------------------


async def test_connect_error_never_reaches_the_service() -> None:
    """connect_error raises httpx.ConnectError; nothing is recorded, counted or created."""
    fake = FakeApimart()
    fake.script("submit", [Fault.CONNECT_ERROR])
    async with client(fake) as c:
        with pytest.raises(httpx.ConnectError):
            await submit(c)
    assert fake.stats.requests_total == 0 and fake.stats.submits == 0
    assert fake.requests == [] and len(fake.tasks) == 0
    assert fake.stats.faults == {"connect_error": 1}


async def test_reset_is_seen_but_not_acted_on() -> None:
    """reset raises httpx.ReadError after the service saw the request; no task exists."""
    fake = FakeApimart()
    fake.script("submit", ["reset"])
    async with client(fake) as c:
        with pytest.raises(httpx.ReadError):
            await submit(c)
    assert fake.stats.submits == 1 and fake.stats.tasks_created == 0
    (record,) = fake.requests
    assert record.fault == "reset" and record.status is None
    assert fake.stats.in_flight == 0 and fake.stats.status_counts == {}


async def test_drop_after_submit_creates_the_task() -> None:
    """drop_after_submit: the task exists but the answer is lost (RemoteProtocolError)."""
    fake = FakeApimart()
    fake.script("submit", ["drop_after_submit"])
    async with client(fake) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await submit(c, **{"Idempotency-Key": "job-1"})
        # The safe retry: same key, same body -> the task created by the lost attempt.
        again = await submit(c, **{"Idempotency-Key": "job-1"})
    (task_id,) = fake.tasks
    assert again.json()["data"][0]["task_id"] == task_id
    assert again.headers["idempotency-replayed"] == "true"
    assert fake.stats.tasks_created == 1 and fake.duplicate_keys() == []
    assert fake.requests[0].task_id == task_id and fake.requests[0].fault == "drop_after_submit"


async def test_drop_after_submit_without_idempotency_pays_twice() -> None:
    """With keys ignored, retrying a dropped submit creates a second paid task."""
    fake = FakeApimart(honour_idempotency=False)
    fake.script("submit", ["drop_after_submit"])
    async with client(fake) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await submit(c, **{"Idempotency-Key": "job-1"})
        await submit(c, **{"Idempotency-Key": "job-1"})
    assert fake.stats.tasks_created == 2 and fake.duplicate_keys() == ["job-1"]


async def test_stall_trips_the_read_timeout_in_process() -> None:
    """A stalled answer trips a short read timeout as httpx.ReadTimeout."""
    fake = FakeApimart(faults=Faults(stall_seconds=30.0))
    fake.script("poll", ["stall"])
    async with client(fake) as c:
        task_id = await submit_id(c)
        with pytest.raises(httpx.ReadTimeout):
            await c.get(f"/v1/tasks/{task_id}", timeout=httpx.Timeout(5.0, read=0.02))
        assert (await c.get(f"/v1/tasks/{task_id}")).status_code == 200
    assert fake.stats.in_flight == 0 and fake.stats.faults == {"stall": 1}
    assert fake.task(task_id).polls == 2  # the stalled poll was processed


async def test_short_stall_is_answered() -> None:
    """A stall shorter than the timeout just delays a normal answer; a submit still creates."""
    fake = FakeApimart(faults=Faults(stall_seconds=0.005))
    fake.script("submit", ["stall"])
    async with client(fake) as c:
        response = await submit(c)
    assert response.status_code == 200 and fake.stats.tasks_created == 1


# -- error answers (nothing done) ----------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(0.01, "1"), (0.0, "0"), (2.0, "2"), (2.5, "3"), (None, None)],
)
async def test_rate_limit_carries_whole_seconds_retry_after(
    retry_after: float | None, header: str | None
) -> None:
    """429 with the configured Retry-After as whole delta-seconds (fractions rounded up,
    as HTTP allows only integers), or none; no task created."""
    fake = FakeApimart(faults=Faults(retry_after=retry_after))
    fake.script("submit", ["rate_limit"])
    async with client(fake) as c:
        response = await submit(c)
    assert response.status_code == 429
    assert response.headers.get("retry-after") == header
    error = response.json()["error"]
    assert error["code"] == 429 and error["type"] == "rate_limit_error"
    assert fake.stats.tasks_created == 0 and fake.stats.status_counts == {429: 1}


async def test_server_error_statuses() -> None:
    """server_error answers one of the configured 5xx statuses in the real envelope."""
    fake = FakeApimart(faults=Faults(server_error=1.0, server_error_statuses=(502,)))
    async with client(fake) as c:
        response = await submit(c)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == 502 and error["type"] == "bad_gateway"
    assert "(request id: req_" in error["message"]
    assert fake.stats.tasks_created == 0


async def test_server_error_draws_from_500_502_503() -> None:
    """By default all three statuses come up, and nothing is created."""
    fake = FakeApimart(faults=Faults(server_error=1.0), seed=3)
    async with client(fake) as c:
        statuses = {(await submit(c)).status_code for _ in range(60)}
    assert statuses == {500, 502, 503}
    assert fake.stats.tasks_created == 0 and fake.stats.faults == {"server_error": 60}


async def test_channel_failed_is_get_channel_failed() -> None:
    """channel_failed: 500 or 400 with code ``get_channel_failed`` (string, whatever variant)."""
    fake = FakeApimart(faults=Faults(channel_failed=1.0), seed=1)
    async with client(fake) as c:
        responses = [await submit(c) for _ in range(30)]
    assert {r.status_code for r in responses} == {400, 500}
    for r in responses:
        error = r.json()["error"]
        assert error["code"] == "get_channel_failed" and error["type"] == "apimart_error"
        assert error["message"].startswith("Please wait and try again later.")
    assert fake.stats.tasks_created == 0


async def test_error_inside_a_200() -> None:
    """error_in_200: HTTP 200 whose body is an error envelope; no task created."""
    fake = FakeApimart()
    fake.script("submit", ["error_in_200"])
    async with client(fake) as c:
        response = await submit(c)
    assert response.status_code == 200
    assert set(response.json()) == {"error"}
    assert fake.stats.tasks_created == 0


@pytest.mark.parametrize(
    ("status", "kind"),
    [(402, "payment_required"), (403, "permission_error"), (504, "server_error")],
)
async def test_scripted_statuses(status: int, kind: str) -> None:
    """An HTTP status in a script answers that status in the documented envelope."""
    fake = FakeApimart()
    fake.script("submit", [status])
    async with client(fake) as c:
        response = await submit(c)
    assert response.status_code == status
    assert response.json()["error"]["type"] == kind
    assert fake.stats.faults == {f"http_{status}": 1} and fake.stats.tasks_created == 0


async def test_error_code_variants_apply_to_http_errors() -> None:
    """``error_code="string"``/``"plain"`` change the HTTP error bodies too."""
    strings = FakeApimart(variants=Variants(error_code="string"))
    plain = FakeApimart(variants=Variants(error_code="plain"))
    for fake in (strings, plain):
        fake.script("submit", [429])
    async with client(strings) as c:
        s = (await submit(c)).json()["error"]
    async with client(plain) as c:
        p = (await submit(c)).json()["error"]
    assert s["code"] == "rate_limit_exceeded" and s["type"] == "apimart_error" and s["param"] == ""
    assert isinstance(p, str) and p.startswith("Rate limit exceeded")


# -- processed, then mangled ---------------------------------------------------------


async def test_malformed_json_is_unparseable_but_the_task_exists() -> None:
    """malformed_json: a 200 with truncated JSON or an HTML page; the submit did act."""
    fake = FakeApimart(faults=Faults(malformed_json=1.0, only=("submit",)), seed=5)
    kinds = set()
    async with client(fake) as c:
        for _ in range(12):
            response = await submit(c)
            assert response.status_code == 200
            kinds.add(response.headers["content-type"].split(";")[0])
            with pytest.raises(ValueError):
                json.loads(response.content)
    assert kinds == {"application/json", "text/html"}
    assert fake.stats.tasks_created == 12


# -- scripts -------------------------------------------------------------------------


async def test_script_is_consumed_one_step_per_request() -> None:
    """``script("submit", ["reset", None, "rate_limit"])`` plays in order, then normal."""
    fake = FakeApimart(faults=Faults(server_error=1.0, only=("poll",)))
    fake.script("submit", ["reset", None, "rate_limit"])
    assert fake.pending_script("submit") == 3
    async with client(fake) as c:
        with pytest.raises(httpx.ReadError):
            await submit(c)
        assert (await submit(c)).status_code == 200
        assert (await submit(c)).status_code == 429
        assert fake.pending_script("submit") == 0
        assert (await submit(c)).status_code == 200
    assert fake.stats.tasks_created == 2
    assert [r.fault for r in fake.requests] == ["reset", None, "rate_limit", None]


async def test_scripts_on_upload_poll_and_download() -> None:
    """Each endpoint has its own script queue."""
    fake = FakeApimart(latency=Latency.zero())
    fake.script("upload", [500])
    fake.script("poll", [Fault.RATE_LIMIT])
    fake.script("download", [Fault.RESET])
    async with client(fake) as c:
        png = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
        assert (
            await c.post("/v1/uploads/images", files={"file": ("a.png", png)})
        ).status_code == 500
        task_id = await submit_id(c)
        assert (await c.get(f"/v1/tasks/{task_id}")).status_code == 429
        data = (await c.get(f"/v1/tasks/{task_id}")).json()["data"]
        with pytest.raises(httpx.ReadError):
            await c.get(data["result"]["images"][0]["url"][0])
    assert fake.stats.faults == {"http_500": 1, "rate_limit": 1, "reset": 1}


@pytest.mark.parametrize(
    ("endpoint", "steps"),
    [
        ("submit", ["no_such_fault"]),
        ("submit", ["task_failed"]),
        ("task", ["reset"]),
        ("task", [500]),
        ("nowhere", [None]),
        ("poll", [200]),
        ("poll", [True]),
    ],
)
def test_bad_scripts_are_rejected(endpoint: str, steps: list[Any]) -> None:
    """Unknown faults, fates on request endpoints (and vice versa), non-errors are refused."""
    with pytest.raises((ValueError, TypeError)):
        FakeApimart().script(endpoint, steps)


# -- probabilities -------------------------------------------------------------------


async def test_probabilities_are_seeded_and_roughly_right() -> None:
    """p=0.3 gives about 30% faults, and the same seed gives the same sequence."""

    async def statuses(seed: int) -> list[int]:
        fake = FakeApimart(faults=Faults(server_error=0.3), seed=seed, record_requests=False)
        async with client(fake) as c:
            out = [(await submit(c)).status_code for _ in range(200)]
        assert out.count(200) == fake.stats.tasks_created
        assert 200 - out.count(200) == fake.stats.faults["server_error"]
        return out

    first, again, other = await statuses(11), await statuses(11), await statuses(12)
    assert first == again and first != other
    assert 30 <= sum(s >= 500 for s in first) <= 90


async def test_faults_scoped_with_only() -> None:
    """``only=("poll",)`` leaves submits alone and hits every poll."""
    fake = FakeApimart(faults=Faults(server_error=1.0, only=("poll",)))
    async with client(fake) as c:
        task_id = await submit_id(c)
        assert (await c.get(f"/v1/tasks/{task_id}")).status_code >= 500


async def test_faults_per_endpoint_mapping() -> None:
    """A mapping gives each endpoint its own Faults (missing endpoints: none)."""
    fake = FakeApimart(faults={"submit": Faults(rate_limit=1.0), "poll": Faults()})
    async with client(fake) as c:
        assert (await submit(c)).status_code == 429
        fake.faults = Faults()
        task_id = await submit_id(c)
        assert (await c.get(f"/v1/tasks/{task_id}")).status_code == 200
    assert fake.faults == Faults()


async def test_drop_after_submit_probability_only_hits_submits() -> None:
    """``drop_after_submit=1.0`` drops every submit but no poll or upload."""
    fake = FakeApimart(faults=Faults(drop_after_submit=1.0))
    async with client(fake) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await submit(c)
        (task_id,) = fake.tasks
        assert (await c.get(f"/v1/tasks/{task_id}")).status_code == 200


@pytest.mark.parametrize(
    ("faults", "status"),
    [
        (Faults(task_failure=1.0, failure_reason="nsfw"), "failed"),
        (Faults(task_stuck=1.0), "processing"),
        (Faults(task_unknown_status=1.0, unknown_status="mystery"), "mystery"),
    ],
)
async def test_task_fate_probabilities(faults: Faults, status: str) -> None:
    """Per-task probabilities decide each new task's fate."""
    fake = FakeApimart(latency=Latency.zero(), faults=faults)
    async with client(fake) as c:
        task_id = await submit_id(c)
        data = (await c.get(f"/v1/tasks/{task_id}")).json()["data"]
    assert data["status"] == status
    if status == "failed":
        assert data["error"]["message"] == "nsfw"
    assert sum(fake.stats.faults.values()) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate_limit": 1.5},
        {"reset": -0.1},
        {"reset": 0.6, "stall": 0.6},
        {"task_failure": 0.7, "task_stuck": 0.7},
        {"only": ("everywhere",)},
        {"server_error_statuses": ()},
        {"retry_after": -1.0},
        {"retry_after": float("inf")},
        {"balance_failed": 1.5},
    ],
)
def test_invalid_faults_are_rejected(kwargs: dict[str, Any]) -> None:
    """Out-of-range or over-committed probabilities and unknown endpoints are errors."""
    with pytest.raises(ValueError):
        Faults(**kwargs)


def test_faults_from_json() -> None:
    """``Faults.from_dict`` turns JSON lists into tuples and rejects unknown keys."""
    faults = Faults.from_dict(
        {"rate_limit": 0.1, "only": ["submit"], "server_error_statuses": [503]}
    )
    assert faults == Faults(rate_limit=0.1, only=("submit",), server_error_statuses=(503,))
    with pytest.raises(ValueError, match="unknown"):
        Faults.from_dict({"rate_limits": 0.1})
    with pytest.raises(ValueError):
        FakeApimart(faults={"everywhere": Faults()})  # type: ignore[dict-item]
