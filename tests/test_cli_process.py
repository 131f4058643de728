"""The real ``apimart`` process: SIGKILL and Ctrl-C mid-batch, and the demo from a wheel.

A batch runs as ``python -m apimart_async.cli`` against a FakeApimart served over real
HTTP from this process, so the fake's own counters prove what the process sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from anyio.from_thread import start_blocking_portal

from apimart_async.testing import FakeApimart, Faults, Latency

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]
GEM = "gemini-3-pro-image-preview"
JOBS = 24

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@contextlib.contextmanager
def served(fake: FakeApimart) -> Iterator[str]:
    """Serve *fake* over HTTP (uvicorn in a thread) and yield its base URL."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(fake.serve()) as url,
    ):
        yield url


def slow_fake() -> FakeApimart:
    """Tasks of 0.5 s and requests of 20-80 ms, so a run can be caught mid-flight."""
    return FakeApimart(
        api_key="test",
        latency=Latency.fixed(50.0, time_scale=0.01).with_request_latency(0.02, 0.08),
    )


def write_jobs(path: Path, count: int) -> Path:
    """A batch file of *count* valid jobs with ids j0, j1, ..."""
    with path.open("w") as fh:
        for i in range(count):
            fh.write(json.dumps({"id": f"j{i}", "model": GEM, "prompt": f"p{i}"}) + "\n")
    return path


def start_batch(src: Path, out: Path, url: str, *extra: str) -> subprocess.Popen[str]:
    """Start ``apimart batch`` in a child process against the fake at *url*."""
    env = {**os.environ, "APIMART_API_KEY": "test", "PYTHONPATH": str(ROOT)}
    argv = [
        sys.executable, "-m", "apimart_async.cli", "batch", str(src), "--out", str(out),
        "--base-url", url, "--time-scale", "0.01", "-c", "8", "--progress", "off", *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        argv, cwd=src.parent, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def journal_rows(out: Path) -> dict[str, tuple[str, str | None, str]]:
    """``{job: (state, task_id, key)}`` from the journal; empty while it does not exist."""
    path = out / "journal.sqlite3"
    if not path.exists():
        return {}
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=1)
        try:
            rows = db.execute("SELECT id, state, task_id, idempotency_key FROM jobs").fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError:  # created but not initialised yet
        return {}
    return {job: (state, task, key) for job, state, task, key in rows}


def wait_for_submits(out: Path, count: int, proc: subprocess.Popen[str]) -> None:
    """Block until *count* jobs have a recorded task id and some are not done yet."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = journal_rows(out).values()
        recorded = [r for r in rows if r[1] is not None]
        if len(recorded) >= count and any(r[0] != "done" for r in rows):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("the batch never got going")


def submit_keys(fake: FakeApimart) -> list[str | None]:
    """The Idempotency-Key of every submit the fake received."""
    return [r.idempotency_key for r in fake.requests if r.endpoint == "submit"]


def test_sigkill_mid_batch_then_rerun_never_pays_twice(tmp_path: Path) -> None:
    """kill -9 after 6 recorded submits; the rerun completes every job, never resubmits
    a job whose task id was recorded, and no idempotency key ever made two tasks."""
    fake = slow_fake()
    src = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    out = tmp_path / "out"
    with served(fake) as url:
        proc = start_batch(src, out, url)
        wait_for_submits(out, 6, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        at_kill = journal_rows(out)
        recorded = {job: row for job, row in at_kill.items() if row[1] is not None}
        assert 6 <= len(recorded) < JOBS

        rerun = start_batch(src, out, url, "--resubmit-uncertain")
        stdout, stderr = rerun.communicate(timeout=60)

    assert rerun.returncode == 0, stderr
    assert "resumed by task id" in stderr or "done earlier" in stderr
    final = journal_rows(out)
    assert all(state == "done" for state, _, _ in final.values())
    keys = submit_keys(fake)
    for job, (_, task_id, key) in recorded.items():
        assert final[job][1] == task_id  # waited for by id...
        assert keys.count(key) == 1  # ...and never submitted again
    assert not fake.duplicate_keys()
    assert fake.stats.tasks_created == JOBS
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == JOBS and all((out / r["files"][0]).is_file() for r in results)
    assert "images written" in stdout


def test_ctrl_c_in_a_real_process_exits_130_with_a_consistent_journal(tmp_path: Path) -> None:
    """SIGINT: the process stops with status 130, no job is left 'submitting', and the
    rerun finishes without a duplicate task."""
    fake = slow_fake()
    src = write_jobs(tmp_path / "jobs.jsonl", 24)
    out = tmp_path / "out"
    with served(fake) as url:
        proc = start_batch(src, out, url)
        wait_for_submits(out, 4, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr
        assert "Ctrl-C: stopping" in stderr and "rerun the same command" in stderr
        states = {state for state, _, _ in journal_rows(out).values()}
        assert "submitting" not in states and "uncertain" not in states

        rerun = start_batch(src, out, url)
        _, stderr = rerun.communicate(timeout=60)

    assert rerun.returncode == 0, stderr
    assert not fake.duplicate_keys() and fake.stats.tasks_created == 24


def test_a_second_ctrl_c_while_submits_are_heard_out_quits_at_once(tmp_path: Path) -> None:
    """Ctrl-C while every submit hangs at the service: the batch waits to hear them out
    (up to the 30 s submit shield); a second Ctrl-C during that wait quits at once
    (status 130), leaving those jobs 'submitting' (uncertain on the next run)."""
    fake = FakeApimart(
        api_key="test", faults=Faults(stall=1.0, stall_seconds=60.0, only=("submit",))
    )
    src = write_jobs(tmp_path / "jobs.jsonl", 4)
    out = tmp_path / "out"
    with served(fake) as url:
        proc = start_batch(src, out, url, "-c", "2")
        deadline = time.monotonic() + 20
        while fake.stats.submits < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)  # hearing out the submits on the wire
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)  # far sooner than the 30 s shield
    assert proc.returncode == 130, stderr
    assert "Ctrl-C: stopping" in stderr and "Traceback" not in stderr
    assert sorted(state for state, _, _ in journal_rows(out).values()) == ["submitting"] * 2


def test_demo_runs_from_a_built_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the wheel, unpack it away from the source tree, run ``apimart demo``: the
    bundled batch file ships in the package and the demo exits 0."""
    import hatchling.build as backend  # the PEP 517 build backend (tests group)

    monkeypatch.chdir(ROOT)
    dist = tmp_path / "dist"
    dist.mkdir()
    wheel = dist / backend.build_wheel(str(dist))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    assert "apimart_async/cli/demo_jobs.jsonl" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "apimart = apimart_async.cli:main" in (site / entry_points).read_text()

    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("APIMART_API_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "apimart_async.cli", "demo", "--jobs", "8", "--time-scale", "0.01"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ran as designed" in done.stderr
    assert "apimart-demo-output" in done.stdout
    assert len(list((work / "apimart-demo-output").glob("*.png"))) >= 6 + 1  # + reference
