"""A batch whose folder turns read-only mid-run, in a real process (issue 14, item 4).

The output folder and its files are made immutable (``chattr +i``, which binds root
too, as a filesystem remounted read-only would) while ``apimart batch`` is
submitting: the next journal commit fails for real. The batch must stop submitting at
once (exit status 4), print every task id at risk, and, since the folder cannot take
the recovery file, write it to the working directory; the rerun, once the folder is
writable again, adopts those ids, and no task is lost or paid twice (the fake ignores
idempotency keys, so only the batch's own records protect).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .test_cli_process import journal_rows, served, slow_fake, start_batch, wait_for_submits
from .test_cli_process import write_jobs as write_numbered_jobs

if TYPE_CHECKING:
    from collections.abc import Iterator


def _chattr(flag: str, path: Path) -> bool:
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    done = subprocess.run([chattr, "-R", flag, str(path)], capture_output=True, check=False)
    return done.returncode == 0


def _can_freeze(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    if os.geteuid() != 0 or not _chattr("+i", probe):
        return False
    try:
        (probe / "x").touch()
    except OSError:
        return True
    finally:
        _chattr("-i", probe)
    return False


@contextlib.contextmanager
def frozen(path: Path) -> Iterator[None]:
    """Make *path* and everything in it immutable for the block.

    SQLite's ``-shm`` file stays writable: it is shared memory (mmap), and a write to
    an immutable mapping is a SIGBUS, which no read-only filesystem would cause (the
    kernel does not remount a filesystem read-only under a file open for writing).
    """
    assert _chattr("+i", path)
    shm = path / "journal.sqlite3-shm"
    if shm.exists():
        assert _chattr("-i", shm)
    try:
        yield
    finally:
        _chattr("-i", path)


def test_a_folder_turning_read_only_stops_submits_and_keeps_every_task_id(
    tmp_path: Path,
) -> None:
    """Immutable folder mid-batch: exit 4, task ids on stderr and in a recovery file in
    the working directory; the rerun adopts them: every job done, none paid twice."""
    if sys.platform == "win32" or not _can_freeze(tmp_path):
        pytest.skip("needs root and chattr +i on this filesystem to make a folder read-only")
    fake = slow_fake()
    fake.honour_idempotency = False
    src = write_numbered_jobs(tmp_path / "jobs.jsonl", 24)
    out = tmp_path / "out"
    with served(fake) as url:
        proc = start_batch(src, out, url, "-c", "4")
        wait_for_submits(out, 4, proc)
        with frozen(out):
            _, stderr = proc.communicate(timeout=60)
            submits_at_exit = fake.stats.submits
        assert proc.returncode == 4, stderr
        assert "cannot write the journal" in stderr and "no further submits" in stderr
        recovery = list(tmp_path.glob("apimart-*-recovered-task-ids.txt"))
        assert len(recovery) == 1 and not (out / "recovered-task-ids.txt").exists()
        saved = {
            line.split("\t")[0]
            for line in recovery[0].read_text().splitlines()
            if line and not line.startswith("#")
        }
        assert saved and all(f"paid task {task}" in stderr for task in saved)
        assert str(recovery[0]) in stderr
        recorded = {task for _, task, _ in journal_rows(out).values() if task}
        assert set(fake.tasks) <= recorded | saved  # none vanished
        assert fake.stats.submits == submits_at_exit  # and nothing went out after

        rerun = start_batch(src, out, url)
        _, stderr = rerun.communicate(timeout=60)

    assert rerun.returncode == 0, stderr
    assert all(state == "done" for state, _, _ in journal_rows(out).values())
    assert fake.stats.tasks_created == 24 and not fake.duplicate_keys()
