"""Money you can see and cap: costs, the balance, budgets, and the 402/401 stop.

Against a fake whose balance each task draws down (``FakeApimart(balance=...)``),
with its per-model prices: what a batch spent is reported, a budget is never
exceeded, a 402 or 401 stops submitting at once (the service sees at most the
submits already on the wire), and a rerun with more budget or a topped-up balance
continues without paying twice.
"""

from __future__ import annotations

from typing import Any

import pytest

import apimart_async as am
from apimart_async.testing import FakeApimart, Faults, Latency, Variants
from apimart_async.types import CompletedEvent

from .conftest import ClientFor

pytestmark = pytest.mark.anyio

KEY = "test-key"
GEM = "gemini-3.1-flash-image-preview"
FLUX = "flux-kontext-pro"


def jobs(count: int, model: str = GEM, **fields: Any) -> list[dict[str, Any]]:
    return [{"model": model, "prompt": f"job {i}", **fields} for i in range(count)]


async def run(client: am.AsyncApimart, items: list[Any], **kw: Any) -> tuple[list[am.Outcome], Any]:
    async with client.generate_many(items, **kw) as stream:
        outcomes = [o async for o in stream]
    return sorted(outcomes, key=lambda o: o.index), stream


# -- what things cost ------------------------------------------------------------------------


async def test_costs_reach_outcomes_events_and_the_run_total(client_for: ClientFor) -> None:
    fake = FakeApimart(api_key=KEY)
    price = fake.price_of(GEM)
    events: list[am.Event] = []
    async with client_for(fake) as client:
        outcomes, stream = await run(client, jobs(4, n=2), on_event=events.append)
    assert [o.cost for o in outcomes] == pytest.approx([2 * price] * 4)
    assert [o.credits_cost for o in outcomes] == pytest.approx([20 * price] * 4)
    completed = [e for e in events if isinstance(e, CompletedEvent)]
    assert [e.cost for e in completed] == pytest.approx([2 * price] * 4)
    assert stream.spent == pytest.approx(8 * price) and stream.cost_unknown == 0
    assert stream.stopped is None


async def test_a_cost_the_service_does_not_report_is_none_and_counted(
    client_for: ClientFor,
) -> None:
    fake = FakeApimart(api_key=KEY, variants=Variants(include_cost=False))
    async with client_for(fake) as client:
        outcomes, stream = await run(client, jobs(3))
    assert [o.cost for o in outcomes] == [None, None, None]
    assert stream.spent == 0 and stream.cost_unknown == 3


async def test_a_failed_task_costs_nothing(client_for: ClientFor) -> None:
    fake = FakeApimart(api_key=KEY, faults=Faults(task_failure=1.0))
    async with client_for(fake) as client:
        outcomes, stream = await run(client, jobs(2))
    assert all(isinstance(o.error, am.TaskFailedError) and o.cost == 0 for o in outcomes)
    assert stream.spent == 0


# -- the balance -------------------------------------------------------------------------


async def test_balance_of_the_key_and_the_account(client_for: ClientFor) -> None:
    fake = FakeApimart(api_key=KEY, balance=10.0)
    async with client_for(fake) as client:
        await client.generate(model=GEM, prompt="x")
        key = await client.balance()
        account = await client.balance(account=True)
    price = fake.price_of(GEM)
    assert key.remaining == pytest.approx(10.0 - price) and key.used == pytest.approx(price)
    assert key.unlimited is False
    assert account.remaining == pytest.approx(key.remaining)
    assert [r.path for r in fake.requests if r.endpoint == "balance"] == [
        "/v1/balance",
        "/v1/user/balance",
    ]


@pytest.mark.parametrize("shape", ["minus_one", "flag"])
async def test_an_unlimited_key(client_for: ClientFor, shape: str) -> None:
    fake = FakeApimart(api_key=KEY, variants=Variants(unlimited_balance=shape))  # type: ignore[arg-type]
    async with client_for(fake) as client:
        balance = await client.balance()
    assert balance.unlimited is True and balance.remaining is None


async def test_a_balance_the_service_cannot_give_is_an_error_with_its_message(
    client_for: ClientFor,
) -> None:
    fake = FakeApimart(api_key=KEY)
    fake.script("balance", [am.testing.Fault.BALANCE_FAILED])  # type: ignore[attr-defined]
    async with client_for(fake) as client:
        with pytest.raises(am.BalanceUnavailableError) as info:
            await client.balance()
    assert isinstance(info.value, am.ApimartError)
    assert "Failed to get token info" in str(info.value)


# -- budgets ------------------------------------------------------------------------------


async def test_max_cost_with_prices_stops_before_the_cap(client_for: ClientFor) -> None:
    """Ten jobs, a budget for three and a half: three are submitted, seven refused."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fast())
    price = fake.price_of(GEM)
    async with client_for(fake) as client:
        outcomes, stream = await run(
            client, jobs(10), concurrency=1, max_cost=3.5 * price, prices={GEM: price}
        )
    done = [o for o in outcomes if o.ok]
    refused = [o for o in outcomes if isinstance(o.error, am.BudgetExceededError)]
    assert len(done) == 3 and len(refused) == 7
    assert fake.stats.submits == 3
    assert stream.spent == pytest.approx(3 * price)
    assert isinstance(stream.stopped, am.BudgetExceededError)
    assert stream.stopped.budget == "max_cost" and stream.stopped.limit == 3.5 * price
    assert "max_cost" in str(refused[0].error) and "rerun" in str(refused[0].error)


async def test_a_price_set_too_low_is_corrected_by_what_tasks_cost(client_for: ClientFor) -> None:
    """The user's price is two thirds of the real one: once tasks report their cost, the
    budget counts that, and the cap holds (one job at a time, so nothing was under way
    at the lower price)."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fast())
    price = fake.price_of(GEM)
    async with client_for(fake) as client:
        outcomes, stream = await run(
            client, jobs(30), concurrency=1, max_cost=9.8 * price, prices={GEM: price * 2 / 3}
        )
    # At the user's price a tenth job (9 spent + 2/3) would look affordable.
    assert sum(o.ok for o in outcomes) == 9
    assert stream.spent <= 9.8 * price
    assert isinstance(stream.stopped, am.BudgetExceededError)


async def test_in_flight_submits_count_against_the_budget(client_for: ClientFor) -> None:
    """Many at once: what submits under way may cost counts, so the cap holds."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.05))
    price = fake.price_of(GEM)
    async with client_for(fake) as client:
        outcomes, stream = await run(
            client, jobs(40), concurrency=40, max_cost=5 * price, prices={GEM: price}
        )
    assert sum(o.ok for o in outcomes) == 5 == fake.stats.submits
    assert stream.spent <= 5 * price + 1e-9


async def test_an_unpriced_model_is_probed_one_job_at_a_time(client_for: ClientFor) -> None:
    """No price given: the first job's reported cost prices the rest; never past the cap."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.02))
    price = fake.price_of(GEM)
    async with client_for(fake) as client:
        outcomes, stream = await run(client, jobs(20), concurrency=10, max_cost=4.5 * price)
    assert sum(o.ok for o in outcomes) == 4 == fake.stats.submits
    assert stream.spent == pytest.approx(4 * price)


async def test_max_images(client_for: ClientFor) -> None:
    fake = FakeApimart(api_key=KEY)
    async with client_for(fake) as client:
        outcomes, _ = await run(client, jobs(5, n=2), concurrency=1, max_images=5)
    assert sum(o.ok for o in outcomes) == 2  # 4 images; a third job would make 6
    errors = [o.error for o in outcomes if not o.ok]
    assert all(isinstance(e, am.BudgetExceededError) and e.budget == "max_images" for e in errors)


async def test_a_rerun_with_a_higher_budget_continues_without_paying_twice(
    client_for: ClientFor,
) -> None:
    fake = FakeApimart(api_key=KEY)
    price = fake.price_of(GEM)
    items = jobs(6)
    keys = {i: f"key-{i}" for i in range(6)}
    async with client_for(fake) as client:
        first, _ = await run(
            client,
            items,
            concurrency=1,
            max_cost=2 * price,
            prices={GEM: price},
            idempotency_keys=lambda i, _: keys[i],
        )
        done = {o.index: o.task.id for o in first if o.ok and o.task}
        second, _ = await run(
            client,
            items,
            concurrency=2,
            max_cost=10 * price,
            prices={GEM: price},
            idempotency_keys=lambda i, _: keys[i],
            known_tasks=lambda i, _: done.get(i),
        )
    assert len(done) == 2
    assert all(o.ok for o in second)
    assert fake.stats.tasks_created == 6 and fake.duplicate_keys() == []


async def test_budget_arguments_are_checked() -> None:
    fake = FakeApimart(api_key=KEY)
    async with am.AsyncApimart(api_key=KEY, transport=fake.transport()) as client:
        with pytest.raises(ValueError, match="max_cost"):
            async with client.generate_many(jobs(1), max_cost=-1):
                pass
        with pytest.raises(ValueError, match="prices"):
            async with client.generate_many(jobs(1), prices={GEM: "cheap"}):  # type: ignore[dict-item]
                pass
    assert fake.stats.requests_total == 0


# -- 402 and 401 stop the spending side ----------------------------------------------------


async def test_a_402_stops_submitting_at_once(client_for: ClientFor) -> None:
    """The balance runs out after K tasks: at most K + the submits on the wire reach
    the service, the rest are refused with the 402, the done ones are kept."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.02))
    price = fake.price_of(GEM)
    k, concurrency = 5, 8
    fake.set_balance(k * price + price / 2)
    async with client_for(fake) as client:
        outcomes, stream = await run(client, jobs(60), concurrency=concurrency)
    assert sum(o.ok for o in outcomes) == k
    assert k < fake.stats.submits <= k + concurrency
    assert isinstance(stream.stopped, am.InsufficientBalanceError)
    refused = [o.error for o in outcomes if not o.ok]
    assert all(isinstance(e, am.InsufficientBalanceError) for e in refused)
    # Those never sent carry the 402 that stopped the run as their cause.
    never_sent = [e for e in refused if e is not None and e.__cause__ is stream.stopped]
    assert len(never_sent) >= 60 - fake.stats.submits
    # Topped up, a rerun of the jobs not done continues; nothing is paid twice.
    fake.set_balance(100.0)
    left = [item for o, item in zip(outcomes, jobs(60), strict=True) if not o.ok]
    async with client_for(fake) as client:
        again, _ = await run(client, left, concurrency=concurrency)
    assert all(o.ok for o in again)
    assert fake.stats.tasks_created == 60


async def test_a_401_stops_submitting_at_once(client_for: ClientFor) -> None:
    fake = FakeApimart(api_key=KEY)
    async with client_for(fake, api_key="sk-wrong-key-0123456789") as client:
        outcomes, stream = await run(client, jobs(30), concurrency=4)
    assert all(isinstance(o.error, am.AuthenticationError) for o in outcomes)
    assert fake.stats.submits <= 4
    assert isinstance(stream.stopped, am.AuthenticationError)


async def test_an_unpriced_probe_that_never_settles_does_not_hold_up_its_model(
    client_for: ClientFor,
) -> None:
    """The first job of an unpriced model times out still running: the next job of
    that model becomes the probe instead of waiting forever."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.02))
    fake.script("submit", [None])  # the first task is created normally
    stuck = Faults(task_stuck=1.0)
    async with client_for(fake) as client:
        fake.faults = stuck  # the first task never finishes
        first = client.generate_many(jobs(1), timeout=0.3, max_cost=10.0)
        async with first as stream:
            (outcome,) = [o async for o in stream]
            assert isinstance(outcome.error, am.TaskTimeoutError)
        fake.faults = Faults()
        outcomes, _ = await run(client, jobs(3), concurrency=3, timeout=5.0, max_cost=10.0)
    assert all(o.ok for o in outcomes)
