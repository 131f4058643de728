"""Money on the command line (issue 18): ``apimart balance``, ``batch --max-cost
--max-images --price``, a 402 or 401 that stops submitting, and ``batch --dry-run``.

In process against FakeApimart (whose balance each task's price draws down, 402 once it
cannot pay), on asyncio and trio; then through the installed command with ``--fake``,
whose state (and balance) lives in the output folder. The rule checked throughout: a
rerun after a stop continues where the stop left off and never pays twice (one task
per job, no idempotency key that made two tasks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apimart_async.testing import FakeApimart

from .test_cli_batch import cli, jobs, results, write_jobs
from .test_cli_fake_state import kept_state
from .test_cli_terminal import GEM, piped

FLUX = "flux-kontext-pro"
BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])


def statuses(out: Path) -> dict[str, int]:
    """How many jobs of ``out/results.jsonl`` have each status."""
    counted: dict[str, int] = {}
    for row in results(out):
        counted[row["status"]] = counted.get(row["status"], 0) + 1
    return counted


def one_task_per_job(fake: FakeApimart, count: int) -> None:
    """Nothing was paid twice: *count* tasks for *count* jobs, no key made two."""
    assert fake.stats.tasks_created == count
    assert fake.duplicate_keys() == []
    prompts = [task.prompt for task in fake.tasks.values()]
    assert len(set(prompts)) == count


# -- apimart balance --------------------------------------------------------------------


@BACKENDS
def test_balance_shows_the_key_and_the_account(backend: str) -> None:
    """Text and JSON for a limited key, the account (--account), and an unlimited key."""
    fake = FakeApimart(balance=12.5)
    ran = cli("--backend", backend, "balance", fake=fake)
    assert ran.code == 0 and ran.out == "key: 12.50 USD left (0.00 USD used)\n", ran.err
    ran = cli("--backend", backend, "balance", "--account", "--json", fake=fake)
    data = json.loads(ran.out)
    assert data == {"scope": "account", "remaining": 12.5, "used": 0.0, "unlimited": False,
                    "unit": None}  # fmt: skip
    assert fake.stats.balance_reads == 2 and fake.stats.requests_total == 2
    ran = cli("--backend", backend, "balance", "--json", fake=FakeApimart())
    assert json.loads(ran.out)["unlimited"] is True and json.loads(ran.out)["remaining"] is None


@BACKENDS
def test_balance_failures_say_what_the_service_said(backend: str) -> None:
    """The 200-with-success:false form exits 1 with the service's message; a rejected
    key exits 2 saying where the key comes from."""
    fake = FakeApimart(balance=1.0)
    fake.script("balance", ["balance_failed"])
    ran = cli("--backend", backend, "balance", fake=fake)
    assert ran.code == 1 and "BalanceUnavailableError" in ran.err
    assert "could not report the balance: Failed to get token info" in ran.err
    fake.script("balance", [401])
    ran = cli("--backend", backend, "balance", fake=fake)
    assert ran.code == 2 and "APIMART_API_KEY or --api-key" in ran.err and ran.out == ""


# -- spending limits --------------------------------------------------------------------


@BACKENDS
def test_max_images_stops_submitting_and_a_rerun_continues(tmp_path: Path, backend: str) -> None:
    """--max-images 4 over 10 one-image jobs: 4 tasks, the rest pending (nothing sent
    for them), exit 1 with one line saying how to continue; the rerun with a higher
    limit submits exactly the other 6."""
    fake = FakeApimart()
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(10))
    out = tmp_path / "out"
    argv = ("--backend", backend, "batch", str(src), "--out", str(out), "-c", "2")

    ran = cli(*argv, "--max-images", "4", "--progress", "off", fake=fake)

    assert ran.code == 1, ran.err
    assert statuses(out) == {"done": 4, "pending": 6}
    last = ran.err.strip().splitlines()[-1]
    assert last.startswith("apimart: error: stopped submitting: --max-images 4 reached")
    assert "6 job(s) not started" in last and "with a higher --max-images" in last
    pending = [r for r in results(out) if r["status"] == "pending"]
    assert all(r["error_type"] == "BudgetExceededError" for r in pending)
    assert fake.stats.tasks_created == 4

    again = cli(*argv, "--max-images", "100", "--json", fake=fake)

    assert again.code == 0, again.err
    summary = json.loads(again.out)
    assert summary["counts"] == {"done": 10} and summary["stopped"] is None
    assert summary["spent"] == pytest.approx(6 * fake.price_of(GEM))
    assert summary["total_spent"] == pytest.approx(10 * fake.price_of(GEM))
    one_task_per_job(fake, 10)


@BACKENDS
def test_max_cost_with_prices_stops_and_reports_what_was_spent(
    tmp_path: Path, backend: str
) -> None:
    """--max-cost 0.50 at 0.15 USD per image: three jobs fit, the fourth could go over;
    the JSON summary reports the stop and the spend; a higher limit finishes the rest."""
    fake = FakeApimart()
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(8))
    out = tmp_path / "out"
    argv = ("--backend", backend, "batch", str(src), "--out", str(out), "-c", "1", "--json")
    price = ("--price", f"{GEM}=0.15")

    ran = cli(*argv, "--max-cost", "0.50", *price, fake=fake)

    assert ran.code == 1, ran.err
    summary = json.loads(ran.out)
    assert summary["counts"] == {"done": 3, "pending": 5}
    assert summary["spent"] == pytest.approx(0.45) and summary["cost_unknown"] == 0
    stopped = summary["stopped"]
    assert stopped["error_type"] == "BudgetExceededError" and stopped["not_started"] == 5
    assert "--max-cost 0.50 USD reached" in stopped["message"]
    assert "stopped submitting: --max-cost 0.50 USD reached" in ran.err

    again = cli(*argv, "--max-cost", "10", *price, fake=fake)
    assert again.code == 0, again.err
    assert json.loads(again.out)["total_spent"] == pytest.approx(8 * 0.15)
    one_task_per_job(fake, 8)


@BACKENDS
def test_a_402_stops_submitting_and_a_rerun_after_a_top_up_finishes(
    tmp_path: Path, backend: str
) -> None:
    """The balance pays for 5 tasks of 30: at most 5 + (submits on the wire) submit
    attempts, the jobs already submitted are downloaded, exit 1 with one line naming
    the balance; after a top-up the rerun finishes without paying twice."""
    concurrency = 4
    fake = FakeApimart(balance=5 * FakeApimart().price_of(GEM))
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(30))
    out = tmp_path / "out"
    argv = ("--backend", backend, "batch", str(src), "--out", str(out), "-c", str(concurrency))

    ran = cli(*argv, "--progress", "off", fake=fake)

    assert ran.code == 1
    assert fake.stats.tasks_created == 5
    assert fake.stats.submits <= 5 + concurrency
    counted = statuses(out)
    assert counted["done"] == 5 and counted["failed"] >= 1 and counted["pending"] >= 20
    refused = [r for r in results(out) if r["status"] == "failed"]
    assert all(r["error_type"] == "InsufficientBalanceError" for r in refused)
    last = ran.err.strip().splitlines()[-1]
    assert last.startswith("apimart: error: stopped submitting: the balance is exhausted")
    assert "`apimart balance`" in last and "rerun the same command" in last

    fake.set_balance(None)  # topped up
    again = cli(*argv, "--progress", "off", fake=fake)

    assert again.code == 0, again.err
    assert statuses(out) == {"done": 30}
    one_task_per_job(fake, 30)


@BACKENDS
def test_a_401_stops_submitting_but_finishes_what_was_submitted(
    tmp_path: Path, backend: str
) -> None:
    """The key is refused on the third submit: the first two jobs are still downloaded,
    exit 2, one line on fixing the key; the rerun with a working key finishes."""
    fake = FakeApimart()
    fake.script("submit", [None, None, 401])
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(6))
    out = tmp_path / "out"
    argv = ("--backend", backend, "batch", str(src), "--out", str(out), "-c", "1")

    ran = cli(*argv, "--progress", "off", fake=fake)

    assert ran.code == 2
    assert statuses(out) == {"done": 2, "failed": 1, "pending": 3}
    assert "stopped submitting: the API key was rejected" in ran.err
    assert "APIMART_API_KEY or --api-key" in ran.err.strip().splitlines()[-1]
    again = cli(*argv, "--progress", "off", fake=fake)
    assert again.code == 0, again.err
    one_task_per_job(fake, 6)


# -- dry run ----------------------------------------------------------------------------


@BACKENDS
def test_dry_run_counts_jobs_and_images_per_model_and_sends_nothing(
    tmp_path: Path, backend: str
) -> None:
    """One line per model with its jobs and images, the estimated cost when every model
    has a price, exit 0; nothing sent but one balance read; the folder is not touched."""
    lines = [*jobs(3, n=2), {"model": FLUX, "prompt": "x"}, {"model": FLUX, "prompt": "y"}]
    src = write_jobs(tmp_path / "jobs.jsonl", [*lines, "{broken"])
    out = tmp_path / "out"
    fake = FakeApimart(balance=2.0)
    argv = ("--backend", backend, "batch", str(src), "--out", str(out), "--dry-run")

    ran = cli(*argv, "--price", f"{GEM}=0.15", "--price", f"{FLUX}=0.04", fake=fake)

    assert ran.code == 0, ran.err
    assert ran.out.splitlines() == [
        f"{GEM}: 3 job(s), 6 image(s), 0.90 USD at 0.15 USD/image",
        f"{FLUX}: 2 job(s), 2 image(s), 0.08 USD at 0.04 USD/image",
        "invalid lines: 1 (a run skips them)",
        "estimated cost: 0.98 USD",
        "balance: 2.00 USD left (0.00 USD used)",
    ]
    assert "line 6: not valid JSON" in ran.err
    assert fake.stats.requests_total == fake.stats.balance_reads == 1
    assert not out.exists()

    ran = cli(*argv, "--price", f"{GEM}=0.15", "--json", fake=fake)
    report = json.loads(ran.out)
    assert report["estimated_cost"] is None and report["jobs"] == 5 and report["images"] == 8
    assert [m["model"] for m in report["models"]] == [GEM, FLUX]
    assert f"no --price for {FLUX}" in ran.err
    assert fake.stats.submits == 0 and not out.exists()

    strict = cli(*argv, "--strict", fake=fake)
    assert strict.code == 2 and "a run with --strict would submit nothing" in strict.err


def test_dry_run_without_a_key_through_the_installed_command(tmp_path: Path) -> None:
    """No key: the file is still checked and counted (exit 0); the balance is skipped."""
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(4, n=3))
    done = piped(
        "batch", str(src), "--out", str(tmp_path / "out"), "--dry-run", "--price",
        f"{GEM}=0.1", cwd=tmp_path,
    )  # fmt: skip
    assert done.code == 0, done.err
    assert done.out.splitlines() == [
        f"{GEM}: 4 job(s), 12 image(s), 1.20 USD at 0.1 USD/image",
        "estimated cost: 1.20 USD",
    ]
    assert "balance not checked: no API key" in done.err
    assert not (tmp_path / "out").exists()


def test_fake_balance_402_then_top_up_through_the_installed_command(tmp_path: Path) -> None:
    """``--fake --fake-balance``: the embedded fake (its state in the folder) refuses
    what the balance cannot pay; the rerun with a higher --fake-balance finishes, and
    the folder's fake state shows one task per job, no key used twice."""
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(12))
    out = tmp_path / "out"
    argv = ("batch", str(src), "--out", str(out), "--fake", "--fake-latency", "fast", "-c", "3")

    first = piped(*argv, "--fake-balance", "0.6", "--json", cwd=tmp_path)  # 4 tasks of 0.15

    assert first.code == 1, first.err
    summary = json.loads(first.out)
    assert summary["counts"]["done"] == 4 and summary["stopped"]["error_type"] == (
        "InsufficientBalanceError"
    )
    assert "stopped submitting: the balance is exhausted" in first.err

    second = piped(*argv, "--fake-balance", "100", "--json", cwd=tmp_path)

    assert second.code == 0, second.err
    assert json.loads(second.out)["counts"] == {"done": 12}
    state = kept_state(out)
    assert len(state.tasks) == 12
    keys = [task.idempotency_key for task in state.tasks.values()]
    assert len(set(keys)) == 12
