"""The batch journal cannot be fooled: bound to its service, self-checked, and a failed
write never loses a paid task id (issue 14, items 4-5, CLI side).

In process against FakeApimart (``Runtime.fake``), or a FakeApimart served over HTTP for
runs against "the real API" (``--base-url``), so the fake's counters prove what was sent.
Fakes that ignore idempotency keys show that the journal, not the key, kept a job from
being paid twice.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from apimart_async.cli import _batch, _journal
from apimart_async.testing import FakeApimart

from .test_cli_batch import cli, jobs, journal, results, submit_keys, write_jobs
from .test_cli_process import served

if TYPE_CHECKING:
    from collections.abc import Iterator

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])


def journal_task_ids(out: Path) -> set[str]:
    """Every task id the journal holds (rows and history)."""
    db = sqlite3.connect(f"{(out / 'journal.sqlite3').as_uri()}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT task_id FROM jobs WHERE task_id IS NOT NULL "
            "UNION SELECT task_id FROM history WHERE task_id IS NOT NULL"
        ).fetchall()
    finally:
        db.close()
    return {row[0] for row in rows}


@pytest.fixture
def http_fake() -> Iterator[tuple[FakeApimart, str]]:
    """A FakeApimart over real HTTP (the "real API" for a batch run), and its URL."""
    fake = FakeApimart(api_key="test")
    with served(fake) as url:
        yield fake, url


# -- bound to one service ------------------------------------------------------------


def test_a_fake_trial_run_is_never_resumed_for_real(tmp_path: Path) -> None:
    """--fake trial run, then a real run in the same folder: refused with status 3 before
    any request, saying to use another folder; the trial's journal is untouched."""
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(3))
    out = tmp_path / "out"
    trial = cli("batch", str(src), "--out", str(out), "--fake", "--fake-latency", "fast")
    assert trial.code == 0, trial.err
    before = journal(out)

    # Nothing listens on port 9: a request would fail; the refusal must come first.
    real = cli(
        "batch", str(src), "--out", str(out), "--api-key", "sk-real",
        "--base-url", "http://127.0.0.1:9",
    )  # fmt: skip
    assert real.code == 3, real.err
    assert "built-in fake service" in real.err and "another --out folder" in real.err
    assert "sk-real" not in real.err and "sk-real" not in real.out
    assert journal(out).keys() == before.keys()
    assert all(journal(out)[job]["state"] == "done" for job in before)


def test_real_then_fake_then_real_never_pays_twice(
    tmp_path: Path, http_fake: tuple[FakeApimart, str]
) -> None:
    """A real batch's folder refuses a --fake run (status 3), and the real batch resumes
    afterwards without submitting anything again."""
    fake, url = http_fake
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(4))
    out = tmp_path / "out"
    real = ("batch", str(src), "--out", str(out), "--api-key", "test", "--base-url", url)
    assert cli(*real, "--time-scale", "0.001").code == 0
    assert fake.stats.tasks_created == 4

    trial = cli("batch", str(src), "--out", str(out), "--fake")
    assert trial.code == 3 and "Run the trial with another --out folder" in trial.err

    (out / "j1_0.png").unlink()  # something for the third run to do
    again = cli(*real, "--time-scale", "0.001")
    assert again.code == 0, again.err
    assert fake.stats.submits == 4 and fake.stats.tasks_created == 4


def test_another_api_key_is_refused_unless_same_account(
    tmp_path: Path, http_fake: tuple[FakeApimart, str]
) -> None:
    """The journal keeps a salted fingerprint of the key (never the key): another key is
    refused before any request; --same-account accepts it (a rotated key)."""
    fake, url = http_fake
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(2))
    out = tmp_path / "out"
    base = ("batch", str(src), "--out", str(out), "--base-url", url, "--time-scale", "0.001")
    assert cli(*base, "--api-key", "test").code == 0
    db = sqlite3.connect(out / "journal.sqlite3")
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    db.close()
    assert meta["service_kind"] == "api" and meta["service_url"] == url
    assert "test" not in meta["account_hash"] and len(meta["account_hash"]) == 16

    requests = fake.stats.requests_total
    other = cli(*base, "--api-key", "sk-other")
    assert other.code == 3 and "another API key" in other.err and "--same-account" in other.err
    assert fake.stats.requests_total == requests  # refused before any request

    (out / "j0_0.png").unlink()
    rotated = cli(*base, "--api-key", "test", "--same-account")
    assert rotated.code == 0, rotated.err  # same key again: nothing to rebind
    moved = cli(*base, "--api-key", "test", "--base-url", "http://127.0.0.1:9")
    assert moved.code == 3 and "its API origin was" in moved.err
    assert fake.stats.requests_total == requests + 1  # only the re-download of j0


# -- whole: missing, empty, damaged, partly dropped -----------------------------------


def _first_run(tmp_path: Path, count: int = 6) -> tuple[FakeApimart, Path, Path]:
    fake = FakeApimart(honour_idempotency=False)  # only the journal can protect
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(count))
    out = tmp_path / "out"
    first = cli("batch", str(src), "--out", str(out), fake=fake)
    assert first.code == 0, first.err
    assert fake.stats.tasks_created == count
    return fake, src, out


@pytest.mark.parametrize("damage", ["zero-length", "deleted", "garbage"])
def test_a_lost_journal_where_results_exist_is_refused_then_rebuilt(
    tmp_path: Path, damage: str
) -> None:
    """Zero-length, deleted or garbage journal next to results: refused (status 3, says
    how to recover), nothing sent; --rebuild-journal rebuilds it from results.jsonl and
    the images, and nothing is paid twice (the fake ignores keys)."""
    fake, src, out = _first_run(tmp_path)
    path = out / "journal.sqlite3"
    for extra in ("-wal", "-shm"):
        Path(f"{path}{extra}").unlink(missing_ok=True)
    if damage == "zero-length":
        path.write_bytes(b"")
    elif damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(b"this is not a database" * 100)
    requests = fake.stats.requests_total

    refused = cli("batch", str(src), "--out", str(out), fake=fake)

    assert refused.code == 3, refused.err
    assert "--rebuild-journal" in refused.err and "pay again" in refused.err
    assert fake.stats.requests_total == requests
    (out / "j2_0.png").unlink()  # one image lost too: downloaded again, not paid again

    rebuilt = cli("batch", str(src), "--out", str(out), "--rebuild-journal", fake=fake)

    assert rebuilt.code == 0, rebuilt.err
    assert "rebuilt the journal" in rebuilt.err
    assert fake.stats.tasks_created == 6 and fake.stats.submits == 6
    assert {r["status"] for r in results(out)} == {"done"}
    assert (out / "j2_0.png").is_file()
    if damage == "garbage":
        assert list(out.glob("journal.sqlite3.damaged-*"))


def test_a_lost_journal_in_an_empty_folder_just_starts(tmp_path: Path) -> None:
    """A zero-length journal with no results next to it costs nothing: the run starts."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "journal.sqlite3").write_bytes(b"")
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(2))
    assert cli("batch", str(src), "--out", str(out), fake=FakeApimart()).code == 0


def _three_then_six_with_an_old_journal(
    tmp_path: Path, fake: FakeApimart, *, keep_results: bool
) -> tuple[Path, Path]:
    """Run 3 jobs, then 6; then put back the journal as it was after 3 (with its
    results.jsonl too when *keep_results*: as after a kill -9 before it was rewritten)."""
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(3))
    out = tmp_path / "out"
    assert cli("batch", str(src), "--out", str(out), fake=fake).code == 0
    saved = tmp_path / "saved"
    saved.mkdir()
    kept = [*out.glob("journal.sqlite3*"), *([out / "results.jsonl"] if keep_results else [])]
    for path in kept:
        shutil.copy2(path, saved / path.name)  # copy2: results.jsonl keeps its stamp
    write_jobs(src, jobs(6))
    assert cli("batch", str(src), "--out", str(out), fake=fake).code == 0
    for path in out.glob("journal.sqlite3*"):
        path.unlink()
    for path in saved.iterdir():
        shutil.copy2(path, out / path.name)
    return src, out


def test_a_partly_dropped_journal_is_caught_by_its_results(tmp_path: Path) -> None:
    """A journal that lost its last commits (an old copy put back, a dropped -wal) while
    results.jsonl records the tasks of later runs: refused; --rebuild-journal adopts
    them, and nothing is sent again (the fake ignores keys)."""
    fake = FakeApimart(honour_idempotency=False)
    src, out = _three_then_six_with_an_old_journal(tmp_path, fake, keep_results=False)

    refused = cli("batch", str(src), "--out", str(out), fake=fake)
    assert refused.code == 3 and "knows less than" in refused.err and "j4" in refused.err

    rebuilt = cli("batch", str(src), "--out", str(out), "--rebuild-journal", fake=fake)
    assert rebuilt.code == 0, rebuilt.err
    assert fake.stats.submits == 6 and fake.stats.tasks_created == 6
    assert journal(out)["j4"]["state"] == "done"


def test_a_journal_behind_its_images_is_refused_then_rebuilt(tmp_path: Path) -> None:
    """kill -9, then the -wal lost: the journal and results.jsonl are both as they were
    three jobs ago, but the images of the later jobs are there. Refused (their tasks
    were paid for); --rebuild-journal adopts the images; nothing is sent again."""
    fake = FakeApimart(honour_idempotency=False)
    src, out = _three_then_six_with_an_old_journal(tmp_path, fake, keep_results=True)
    assert (out / "j5_0.png").is_file()

    refused = cli("batch", str(src), "--out", str(out), fake=fake)
    assert refused.code == 3, refused.err
    assert "have result images but no submit" in refused.err and "(j3, j4, j5)" in refused.err
    assert fake.stats.submits == 6

    rebuilt = cli("batch", str(src), "--out", str(out), "--rebuild-journal", fake=fake)
    assert rebuilt.code == 0, rebuilt.err
    assert fake.stats.submits == 6 and fake.stats.tasks_created == 6
    assert {journal(out)[j]["state"] for j in ("j3", "j4", "j5")} == {"done"}


def _garble_a_task_id(db_file: Path, task_id: str) -> None:
    """Replace one byte of *task_id* in the journal's file with one that is not UTF-8."""
    data = bytearray(db_file.read_bytes())
    at = data.find(task_id.encode())
    assert at >= 0
    data[at + 5] = 0xFF
    db_file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["not_utf8", "random_bytes"])
def test_a_damaged_journal_is_refused_without_a_traceback_then_rebuilt(
    tmp_path: Path, damage: str
) -> None:
    """Bytes of the journal damaged on disk: exit 3 naming the damage, before anything is
    sent (never a traceback halfway); --rebuild-journal sets it aside and rebuilds."""
    import random

    fake = FakeApimart(honour_idempotency=False)
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(4))
    out = tmp_path / "out"
    assert cli("batch", str(src), "--out", str(out), fake=fake).code == 0
    db_file = out / "journal.sqlite3"
    sqlite3.connect(db_file).execute("PRAGMA wal_checkpoint(TRUNCATE)").connection.close()
    if damage == "not_utf8":
        _garble_a_task_id(db_file, journal(out)["j2"]["task_id"])
    else:
        data = bytearray(db_file.read_bytes())
        rng = random.Random(1)
        for _ in range(200):
            data[rng.randrange(100, len(data))] = rng.randrange(256)
        db_file.write_bytes(bytes(data))
    (out / "results.jsonl").touch()  # a later stamp: the journal is read in full

    refused = cli("batch", str(src), "--out", str(out), fake=fake)
    assert refused.code == 3, refused.err
    assert "Traceback" not in refused.err and "--rebuild-journal" in refused.err
    assert fake.stats.requests_total == 4 + 4 + 4  # the first run's only (submit, poll, file)

    rebuilt = cli("batch", str(src), "--out", str(out), "--rebuild-journal", fake=fake)
    assert rebuilt.code == 0, rebuilt.err
    assert fake.stats.submits == 4 and fake.stats.tasks_created == 4
    assert list(out.glob("journal.sqlite3.damaged-*"))


# -- a failed journal write stops submitting and loses no task id ---------------------


class _FullDisk(sqlite3.Connection):
    """A journal connection whose commits fail once armed (SQLITE_FULL, as on a full disk)."""

    armed = False

    def commit(self) -> None:
        if _FullDisk.armed:
            raise sqlite3.OperationalError("database or disk is full")
        super().commit()


@BACKENDS
def test_a_full_disk_stops_submits_and_saves_every_paid_task_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """The disk fills up right after the 6th submit is recorded (so that task's id
    cannot be): submitting stops at once (status 4), every task id at risk is printed
    and written to recovered-task-ids.txt, and the rerun adopts them: no task is lost,
    none is paid twice (the fake ignores keys)."""
    monkeypatch.setattr(
        _journal,
        "_connect",
        lambda path: sqlite3.connect(path, factory=_FullDisk, check_same_thread=False),
    )
    monkeypatch.setattr(_FullDisk, "armed", False)
    fake = FakeApimart(honour_idempotency=False)
    sent: list[int] = []
    original = _batch._Run.on_submit

    def on_submit(self: _batch._Run, key: str, body: bytes) -> None:
        original(self, key, body)  # the submitting row is committed...
        sent.append(fake.stats.submits)
        if len(sent) == 6:
            _FullDisk.armed = True  # ...and then the disk is full

    monkeypatch.setattr(_batch._Run, "on_submit", on_submit)
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(30))
    out = tmp_path / "out"

    ran = cli("--backend", backend, "batch", str(src), "--out", str(out), "-c", "4", fake=fake)

    assert ran.code == 4, ran.err
    assert "database or disk is full" in ran.err and "no further submits" in ran.err
    assert fake.stats.submits <= sent[5] + 4  # only those already on their way
    recovery = out / "recovered-task-ids.txt"
    saved = {
        line.split("\t")[0]
        for line in recovery.read_text().splitlines()
        if line and not line.startswith("#")
    }
    for task_id in saved:
        assert f"paid task {task_id}" in ran.err
    durable = journal_task_ids(out)
    assert saved - durable  # the 6th task's id is only in the recovery file...
    assert set(fake.tasks) <= durable | saved  # ...and none vanished

    monkeypatch.setattr(_FullDisk, "armed", False)
    again = cli("--backend", backend, "batch", str(src), "--out", str(out), fake=fake)

    assert again.code == 0, again.err
    assert "adopted" in again.err and "from a recovery file" in again.err
    assert fake.stats.tasks_created == 30 and not fake.duplicate_keys()
    assert {r["status"] for r in results(out)} == {"done"}


# -- a completion without result URLs is never stranded -------------------------------


class _NoUrls(httpx.AsyncBaseTransport):
    """Strips the result URLs from task answers while *strip* is set."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.strip = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not (self.strip and request.url.path.startswith("/v1/tasks/")):
            return response
        body: Any = json.loads(await response.aread())
        if isinstance(body, dict) and isinstance(body.get("data"), dict):
            body["data"].pop("result", None)
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        return httpx.Response(response.status_code, headers=headers, json=body)


class _FakeWithoutUrls(FakeApimart):
    def __init__(self) -> None:
        super().__init__()
        self.wrapper = _NoUrls(super().transport())

    def transport(self) -> Any:
        return self.wrapper


@BACKENDS
def test_a_completion_without_urls_is_queried_again_on_rerun(tmp_path: Path, backend: str) -> None:
    """The service says 'completed' but lists no result URL: the job is not done, keeps
    its task id, and the rerun queries that task again (no new submit) and finishes."""
    fake = _FakeWithoutUrls()
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(2))
    out = tmp_path / "out"

    first = cli("--backend", backend, "batch", str(src), "--out", str(out), fake=fake)

    assert first.code == 1
    rows = journal(out)
    assert {row["state"] for row in rows.values()} == {"submitted"}
    assert all(row["task_id"] for row in rows.values())
    polls = fake.stats.polls

    fake.wrapper.strip = False
    second = cli("--backend", backend, "batch", str(src), "--out", str(out), fake=fake)

    assert second.code == 0, second.err
    assert fake.stats.submits == 2 and fake.stats.polls > polls
    assert {r["status"] for r in results(out)} == {"done"}


def test_an_old_journal_with_a_url_less_completion_is_requeried(tmp_path: Path) -> None:
    """A journal that recorded 'completed' with no URLs (as older versions did) is not
    stranded: the job is queried again by task id."""
    fake = FakeApimart()
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(1))
    out = tmp_path / "out"
    assert cli("batch", str(src), "--out", str(out), fake=fake).code == 0
    db = sqlite3.connect(out / "journal.sqlite3")
    with db:
        db.execute("UPDATE jobs SET state = 'completed', image_urls = NULL, files = NULL")
    db.close()
    (out / "j0_0.png").unlink()

    ran = cli("batch", str(src), "--out", str(out), fake=fake)

    assert ran.code == 0, ran.err
    assert "completed without URLs (querying again)" in ran.err
    assert fake.stats.submits == 1 and (out / "j0_0.png").is_file()
    assert submit_keys(fake)[0] == journal(out)["j0"]["idempotency_key"]
