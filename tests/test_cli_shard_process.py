"""Four shard processes against one real-HTTP fake; one is killed and restarted (issue 20).

As a Kubernetes Indexed Job or a Slurm array runs them: ``apimart batch --shard K/4`` in
four processes at once, sharing one output folder. Shard 1 is killed with SIGKILL
mid-batch and started again, either with an empty folder (a replaced pod on a fresh
disk) or with its folder kept (a shared volume). With a service that honours
idempotency keys, the derived keys make the lost journal harmless: every job exactly
once. With a service that ignores keys, only the journal protects: kept, nothing is
paid twice; lost, exactly the killed shard's already-submitted jobs are paid twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apimart_async.testing import FakeApimart, Latency

from .test_cli_process import ROOT, journal_rows, served, submit_keys, write_jobs

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

JOBS = 40
SHARDS = 4
KILLED = 1


def _fake(*, honour: bool) -> FakeApimart:
    return FakeApimart(
        api_key="test",
        latency=Latency.fixed(50.0, time_scale=0.01).with_request_latency(0.02, 0.06),
        honour_idempotency=honour,
    )


def _start(src: Path, out: Path, url: str, k: int) -> subprocess.Popen[str]:
    env = {**os.environ, "APIMART_API_KEY": "test", "PYTHONPATH": str(ROOT)}
    argv = [
        sys.executable, "-m", "apimart_async.cli", "batch", str(src), "--out", str(out),
        "--shard", f"{k}/{SHARDS}", "--base-url", url, "--time-scale", "0.01",
        "-c", "8", "--progress", "off",
    ]  # fmt: skip
    return subprocess.Popen(
        argv, cwd=src.parent, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _folder(out: Path, k: int) -> Path:
    return out / f"shard-{k}-of-{SHARDS}"


def _wait_for_tasks(folder: Path, count: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = journal_rows(folder).values()
        if sum(task is not None for _, task, _ in rows) >= count and any(
            state != "done" for state, _, _ in rows
        ):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("the shard never got going")


def _run_with_a_kill(
    fake: FakeApimart, tmp_path: Path, *, keep_folder: bool
) -> tuple[Path, Path, dict[str, tuple[str, str | None, str]], dict[int, int]]:
    """Run 4 shards, SIGKILL shard 1 mid-batch, restart it; return what happened."""
    src = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    out = tmp_path / "out"
    with served(fake) as url:
        procs = {k: _start(src, out, url, k) for k in range(SHARDS)}
        _wait_for_tasks(_folder(out, KILLED), 3, procs[KILLED])
        procs[KILLED].send_signal(signal.SIGKILL)
        procs[KILLED].communicate()
        assert procs[KILLED].returncode == -signal.SIGKILL
        at_kill = journal_rows(_folder(out, KILLED))
        if not keep_folder:
            shutil.rmtree(_folder(out, KILLED))  # a replaced pod on an empty disk
        procs[KILLED] = _start(src, out, url, KILLED)
        codes: dict[int, int] = {}
        for k, proc in procs.items():
            _, stderr = proc.communicate(timeout=120)
            codes[k] = proc.returncode
            assert proc.returncode in (0, 1), stderr
    return src, out, at_kill, codes


def _merge(out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "apimart_async.cli", "merge", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _merged(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_keys_make_a_lost_shard_journal_harmless(tmp_path: Path) -> None:
    """Honoured keys: shard 1 restarts on an empty folder and resubmits its jobs under
    the same derived keys; the service replays them. Every job exactly once, no key
    with two tasks, merged results complete with every file present."""
    fake = _fake(honour=True)
    _, out, at_kill, codes = _run_with_a_kill(fake, tmp_path, keep_folder=False)

    assert set(codes.values()) == {0}
    recorded = {key for _, task, key in at_kill.values() if task is not None}
    assert len(recorded) >= 3
    keys = submit_keys(fake)
    assert all(keys.count(key) == 2 for key in recorded)  # sent again after the kill...
    assert fake.stats.replays >= len(recorded)  # ...and answered with the same task
    assert fake.stats.tasks_created == JOBS and not fake.duplicate_keys()
    merge = _merge(out)
    assert merge.returncode == 0, merge.stderr
    rows = _merged(out)
    assert sorted(str(r["id"]) for r in rows) == sorted(f"j{i}" for i in range(JOBS))
    assert all(r["status"] == "done" for r in rows)
    assert all((out / str(f)).is_file() for r in rows for f in r["files"])  # type: ignore[union-attr]


def test_without_keys_a_kept_shard_journal_still_pays_nothing_twice(tmp_path: Path) -> None:
    """Ignored keys, shard folder kept (a shared volume): the restarted shard waits for
    every recorded task by id; a job caught mid-submit is left uncertain, not resent;
    no job is paid twice, and merge lists exactly the uncertain ones."""
    fake = _fake(honour=False)
    _, out, at_kill, _ = _run_with_a_kill(fake, tmp_path, keep_folder=True)

    keys = submit_keys(fake)
    for _, task, key in at_kill.values():
        if task is not None:
            assert keys.count(key) == 1  # never submitted again
    assert not fake.duplicate_keys()
    uncertain = {
        job for job, (state, _, _) in journal_rows(_folder(out, KILLED)).items()
        if state == "uncertain"
    }  # fmt: skip
    assert fake.stats.tasks_created <= JOBS
    merge = _merge(out)
    assert set(merge.stdout.split()) == uncertain
    assert merge.returncode == (1 if uncertain else 0)


def test_without_keys_a_lost_shard_journal_pays_again(tmp_path: Path) -> None:
    """Ignored keys, shard folder lost: what the journal protected is gone. Exactly the
    jobs shard 1 had submitted before the kill are paid twice (same key, two tasks):
    the documented limit when the service ignores keys."""
    fake = _fake(honour=False)
    _, out, at_kill, codes = _run_with_a_kill(fake, tmp_path, keep_folder=False)

    assert set(codes.values()) == {0}
    recorded = {key for _, task, key in at_kill.values() if task is not None}
    duplicates = set(fake.duplicate_keys())
    assert recorded <= duplicates  # every job recorded before the kill: paid twice
    assert duplicates <= {key for _, _, key in at_kill.values()} | recorded
    assert fake.stats.tasks_created == JOBS + len(duplicates)
    assert _merge(out).returncode == 0
