"""FakeApimart's money: prices, a balance drawn down at submit, 402, refunds, balance reads.

Most tests drive the fake with a plain ``httpx.AsyncClient`` (the fake on its own); the
last ones go through the real client, as a budget or 402 test of the client would.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from apimart_async import AsyncApimart, InsufficientBalanceError
from apimart_async.testing import (
    MODELS,
    Balance,
    FakeApimart,
    Fault,
    Faults,
    Latency,
    ManualClock,
    Variants,
)
from tests.conftest import FAST_LIMITS, FAST_POLL

pytestmark = pytest.mark.anyio

API = "https://api.apimart.ai"


def client(fake: FakeApimart, key: str | None = None) -> httpx.AsyncClient:
    """A plain httpx client wired to *fake*, with its key unless told otherwise."""
    headers = {"Authorization": f"Bearer {key or fake.api_key}"}
    return httpx.AsyncClient(transport=fake.transport(), base_url=API, headers=headers)


async def submit(c: httpx.AsyncClient, **body: Any) -> httpx.Response:
    """POST a generation (default: flux-kontext-pro, one image)."""
    payload = {"model": "flux-kontext-pro", "prompt": "a lighthouse", **body}
    return await c.post("/v1/images/generations", json=payload)


async def task_id_of(c: httpx.AsyncClient, **body: Any) -> str:
    """Submit and return the id (list shape: no version header is sent)."""
    response = await submit(c, **body)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["data"][0]["task_id"]
    return task_id


# -- prices and the cost fields ------------------------------------------------------


def test_default_prices_follow_the_price_scrapes() -> None:
    """USD per image from the reference's scrapes (§4): flux 0.032, imagen 0.04, ..."""
    fake = FakeApimart()
    assert fake.price_of("flux-kontext-pro") == 0.032
    assert fake.price_of("imagen-4.0-apimart") == 0.04
    assert fake.price_of("gemini-2.5-flash-image-preview") == 0.0125
    assert fake.price_of("gemini-3.1-flash-image-preview") == 0.015
    assert 0.05 <= fake.price_of("gemini-3-pro-image-preview") <= 0.3
    assert fake.price_of("some-new-model") == 0.05
    assert all(rules.price > 0 for rules in MODELS.values())


def test_prices_can_be_configured_and_bad_ones_are_named() -> None:
    """``prices=`` overrides per model; a negative or non-number price names its model."""
    fake = FakeApimart(prices={"flux-kontext-pro": 0.5, "my-model": 0.25})
    assert fake.price_of("flux-kontext-pro") == 0.5 and fake.price_of("my-model") == 0.25
    assert fake.price_of("flux-kontext-max") == MODELS["flux-kontext-max"].price
    with pytest.raises(ValueError, match=r"prices\['flux-kontext-pro'\]"):
        FakeApimart(prices={"flux-kontext-pro": -1.0})
    with pytest.raises(ValueError, match="prices"):
        FakeApimart(prices={"flux-kontext-pro": float("nan")})
    with pytest.raises(TypeError, match="prices"):
        FakeApimart(prices={"flux-kontext-pro": "1"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="balance"):
        FakeApimart(balance=-0.01)


async def test_completed_task_costs_price_times_n_and_credits_are_ten_times() -> None:
    """A completed task reports cost = price x n (USD) and credits_cost = cost x 10."""
    fake = FakeApimart(latency=Latency.zero(), prices={"gemini-3-pro-image-preview": 0.15})
    async with client(fake) as c:
        task_id = await task_id_of(c, model="gemini-3-pro-image-preview", n=3)
        data = (await c.get(f"/v1/tasks/{task_id}")).json()["data"]
    assert data["status"] == "completed"
    assert data["cost"] == pytest.approx(0.45) and data["credits_cost"] == pytest.approx(4.5)
    assert fake.task(task_id).cost == pytest.approx(0.45)


async def test_cost_fields_can_be_left_out() -> None:
    """``Variants(include_cost=False)``: no cost fields, as older real responses."""
    fake = FakeApimart(latency=Latency.zero(), variants=Variants(include_cost=False))
    async with client(fake) as c:
        data = (await c.get(f"/v1/tasks/{await task_id_of(c)}")).json()["data"]
    assert data["status"] == "completed"
    assert "cost" not in data and "credits_cost" not in data


async def test_unfinished_tasks_carry_no_cost_yet() -> None:
    """Cost fields appear once the task has finished, not while it runs."""
    clock = ManualClock()
    fake = FakeApimart(latency=Latency.fixed(10.0), clock=clock)
    async with client(fake) as c:
        task_id = await task_id_of(c)
        clock.advance(5.0)
        data = (await c.get(f"/v1/tasks/{task_id}")).json()["data"]
    assert data["status"] == "processing" and "cost" not in data


# -- the balance and 402 --------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 7])
async def test_balance_runs_out_after_exactly_k_tasks(k: int) -> None:
    """A balance of k prices pays for exactly k submits; the next is a 402 that creates
    nothing, in the documented envelope."""
    price = 0.0125  # not exact in binary floating point: the ledger counts micro-USD
    fake = FakeApimart(balance=k * price, prices={"flux-kontext-pro": price})
    async with client(fake) as c:
        for _ in range(k):
            await task_id_of(c)
        refused = await submit(c)
        again = await submit(c)
    assert refused.status_code == again.status_code == 402
    error = refused.json()["error"]
    assert error["code"] == 402 and error["type"] == "payment_required"
    assert error["message"].startswith("insufficient balance (request id: ")
    assert fake.stats.tasks_created == k and fake.stats.submits == k + 2
    assert fake.stats.payment_required == 2
    assert fake.balance == Balance(remaining=0.0, used=pytest.approx(k * price))  # type: ignore[arg-type]
    assert fake.balance.exhausted and not fake.balance.unlimited


async def test_n_images_cost_n_prices() -> None:
    """A submit needs price x n: with 3 prices left, n=4 is refused and n=3 accepted."""
    model = "gemini-2.5-flash-image-preview"
    fake = FakeApimart(balance=0.03, prices={model: 0.01})
    async with client(fake) as c:
        refused = await submit(c, model=model, n=4)
        accepted = await submit(c, model=model, n=3)
    assert refused.status_code == 402 and accepted.status_code == 200
    assert fake.stats.tasks_created == 1
    assert fake.balance == Balance(remaining=0.0, used=0.03)


async def test_string_error_codes_for_402() -> None:
    """With observed string codes, the 402 says ``insufficient_balance``."""
    fake = FakeApimart(balance=0.0, variants=Variants(error_code="string"))
    async with client(fake) as c:
        response = await submit(c)
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_balance"


async def test_idempotent_replay_is_not_charged_again() -> None:
    """A replay of a paid submit (same key and body) costs nothing and is not refused."""
    fake = FakeApimart(balance=0.032)
    body = {"model": "flux-kontext-pro", "prompt": "x"}
    async with client(fake) as c:
        first = await c.post("/v1/images/generations", json=body, headers={"Idempotency-Key": "k"})
        again = await c.post("/v1/images/generations", json=body, headers={"Idempotency-Key": "k"})
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotency-replayed"] == "true"
    assert fake.stats.tasks_created == 1 and fake.balance.remaining == 0.0


async def test_failed_task_is_refunded_when_it_fails() -> None:
    """The price is reserved at submit and given back at the moment the task fails;
    the failed task reports cost 0."""
    clock = ManualClock()
    fake = FakeApimart(balance=0.032, latency=Latency.fixed(10.0), clock=clock)
    fake.script("task", [Fault.TASK_FAILED])
    async with client(fake) as c:
        task_id = await task_id_of(c)
        assert fake.balance == Balance(remaining=0.0, used=0.032)
        assert (await submit(c)).status_code == 402  # reserved: nothing left yet
        clock.advance(10.0)
        data = (await c.get(f"/v1/tasks/{task_id}")).json()["data"]
        assert fake.balance == Balance(remaining=0.032, used=0.0)
        assert (await submit(c)).status_code == 200  # the refund pays for the next one
    assert data["status"] == "failed" and data["cost"] == 0 and data["credits_cost"] == 0


async def test_unlimited_by_default_and_used_still_counts() -> None:
    """No balance given: never a 402, and ``used`` adds up what tasks cost."""
    fake = FakeApimart()
    async with client(fake) as c:
        for _ in range(5):
            await task_id_of(c)
    assert fake.balance.unlimited and fake.balance.remaining is None
    assert fake.balance.used == pytest.approx(5 * 0.032)
    assert fake.stats.payment_required == 0


async def test_top_up_lets_a_rerun_continue() -> None:
    """``set_balance`` after a 402 (a top-up) lets the next submits through."""
    fake = FakeApimart(balance=0.0)
    async with client(fake) as c:
        assert (await submit(c)).status_code == 402
        fake.set_balance(1.0)
        assert (await submit(c)).status_code == 200
        fake.set_balance(None)
        assert fake.balance.unlimited
    with pytest.raises(ValueError, match="balance"):
        fake.set_balance(-1.0)


async def test_reads_are_refused_only_when_asked_and_exhausted() -> None:
    """``payment_required_on_reads``: task queries, uploads and schema reads get 402
    while the key has nothing left; balance reads still answer."""
    fake = FakeApimart(balance=0.032, latency=Latency.zero(), payment_required_on_reads=True)
    async with client(fake) as c:
        task_id = await task_id_of(c)  # spends everything
        poll = await c.get(f"/v1/tasks/{task_id}")
        schema = await c.get("/v1/model-schema", params={"model": "flux-kontext-pro"})
        upload = await c.post("/v1/uploads/images", files={"file": ("a.png", b"\x89PNG\r\n\x1a\n")})
        balance = await c.get("/v1/balance")
        fake.payment_required_on_reads = False
        allowed = await c.get(f"/v1/tasks/{task_id}")
    assert poll.status_code == schema.status_code == upload.status_code == 402
    assert poll.json()["error"]["type"] == "payment_required"
    assert balance.status_code == 200 and balance.json()["remain_balance"] == 0
    assert allowed.status_code == 200
    assert fake.stats.payment_required == 3


async def test_reads_answer_while_something_is_left() -> None:
    """A key with money left is not refused reads, even with the flag on."""
    fake = FakeApimart(balance=1.0, latency=Latency.zero(), payment_required_on_reads=True)
    async with client(fake) as c:
        task_id = await task_id_of(c)
        assert (await c.get(f"/v1/tasks/{task_id}")).status_code == 200


# -- balance endpoints -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/balance", "/balance", "/v1/user/balance", "/user/balance"])
async def test_balance_endpoints_and_aliases(path: str) -> None:
    """Key and account balance, with their aliases, in the documented success body."""
    fake = FakeApimart(balance=10.5)
    async with client(fake) as c:
        await task_id_of(c, model="gemini-3-pro-image-preview", n=2, prompt="x")
        response = await c.get(path)
    assert response.status_code == 200
    used = 2 * fake.price_of("gemini-3-pro-image-preview")
    assert response.json() == {
        "success": True,
        "remain_balance": pytest.approx(10.5 - used),
        "used_balance": pytest.approx(used),
        "unlimited_quota": False,
    }
    assert fake.stats.balance_reads == 1


@pytest.mark.parametrize(
    ("shape", "remain", "flag"), [("both", -1, True), ("minus_one", -1, False), ("flag", 0, True)]
)
async def test_unlimited_key_shapes(shape: str, remain: float, flag: bool) -> None:
    """An unlimited key reads ``remain_balance: -1`` and/or ``unlimited_quota: true``."""
    fake = FakeApimart(variants=Variants(unlimited_balance=shape))  # type: ignore[arg-type]
    async with client(fake) as c:
        body = (await c.get("/v1/balance")).json()
    assert body["success"] is True
    assert body["remain_balance"] == remain and body["unlimited_quota"] is flag
    assert body["used_balance"] == 0


async def test_balance_failure_form_is_http_200() -> None:
    """The documented failure: HTTP 200 with ``success: false`` and a message, selectable
    as a probability or a scripted step."""
    fake = FakeApimart(faults={"balance": Faults(balance_failed=1.0)})
    async with client(fake) as c:
        failed = await c.get("/v1/user/balance")
        fake.faults = Faults()
        fake.script("balance", ["balance_failed", None])
        scripted = await c.get("/v1/balance")
        fine = await c.get("/v1/balance")
        # A submit never draws the balance-only fault, whatever its probability.
        fake.faults = Faults(balance_failed=1.0)
        assert (await submit(c)).status_code == 200
    for response in (failed, scripted):
        assert response.status_code == 200
        assert response.json() == {"success": False, "message": "Failed to get token info"}
    assert fine.json()["success"] is True
    assert fake.stats.faults == {"balance_failed": 2} and fake.stats.balance_reads == 3


async def test_balance_reads_take_the_other_request_faults() -> None:
    """Balance reads are a fault endpoint like the others (429 here)."""
    fake = FakeApimart(faults=Faults(rate_limit=1.0, only=("balance",)))
    async with client(fake) as c:
        limited = await c.get("/v1/balance")
        assert (await submit(c)).status_code == 200
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"


async def test_balance_auth_uses_its_observed_401_body() -> None:
    """A wrong key on /v1/balance: the observed body without code and param (§7.2)."""
    fake = FakeApimart(api_key="right")
    async with client(fake, key="wrong") as c:
        response = await c.get("/v1/balance")
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type"} and error["type"] == "apimart_error"
    assert re.fullmatch(r"invalid API key \(request id: req_[0-9a-f]{20}\)", error["message"])


async def test_wrong_method_on_balance_is_405() -> None:
    """Balance is read with GET; a POST is a 405 in the error envelope."""
    fake = FakeApimart()
    async with client(fake) as c:
        response = await c.post("/v1/balance")
    assert response.status_code == 405


async def test_admin_balance_and_snapshot() -> None:
    """``POST /_fake/balance`` sets what is left; the snapshot shows the balance."""
    fake = FakeApimart(balance=0.0)
    async with client(fake) as c:
        assert (await c.post("/_fake/balance", json={"remaining": 0.5})).json() == {"ok": True}
        await task_id_of(c)
        stats = (await c.get("/_fake/stats", params={"tasks": "0"})).json()
        bad = await c.post("/_fake/balance", json={"remaining": -2})
    assert stats["balance"] == {"remaining": 0.468, "used": 0.032, "unlimited": False}
    assert bad.status_code == 400


# -- through the client ---------------------------------------------------------------------


async def test_client_meets_402_after_k_tasks() -> None:
    """The real client gets ``InsufficientBalanceError`` on the (K+1)th submit, with the
    service's message; the fake created exactly K tasks."""
    fake = FakeApimart(api_key="test-key", balance=3 * 0.032)
    async with AsyncApimart(
        api_key="test-key", transport=fake.transport(), poll=FAST_POLL, limits=FAST_LIMITS
    ) as api:
        for _ in range(3):
            await api.generate(model="flux-kontext-pro", prompt="x")
        with pytest.raises(InsufficientBalanceError, match="insufficient balance"):
            await api.submit(model="flux-kontext-pro", prompt="x")
    assert fake.stats.tasks_created == 3 and fake.stats.payment_required == 1


async def test_client_reads_the_cost_of_a_completed_task() -> None:
    """The cost the fake reports reaches the client's ``Task.cost``."""
    fake = FakeApimart(api_key="test-key", prices={"imagen-4.0-apimart": 0.04})
    async with AsyncApimart(
        api_key="test-key", transport=fake.transport(), poll=FAST_POLL, limits=FAST_LIMITS
    ) as api:
        task = await api.generate(model="imagen-4.0-apimart", prompt="x")
    assert task.cost == pytest.approx(0.04)
