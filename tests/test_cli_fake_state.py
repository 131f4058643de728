"""``--fake`` resumes like the real service (issue 19): the embedded fake keeps its state
in the output folder (``.apimart-fake-state.jsonl``), so a stopped ``batch --fake``
resumes its tasks by id, and ``apimart task ID --fake --download DIR`` finds a task that
``apimart generate --fake --out DIR`` left running.

Through the installed command (Ctrl-C is a real SIGINT to a real process), and in
process on asyncio and trio.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from apimart_async.cli._args import FAKE_STATE_NAME
from apimart_async.testing import FakeApimart

from .test_cli_batch import cli, results
from .test_cli_process import journal_rows, wait_for_submits
from .test_cli_terminal import GEM, apimart, env, write_jobs

posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
# Tasks of 0.6 s (30 service seconds at 1/50): long enough to catch them running.
SLOW = ("--fake", "--fake-latency", "fixed:30", "--time-scale", "0.02")


def kept_state(folder: Path) -> FakeApimart:
    """The fake service a later ``--fake`` run in *folder* would continue."""
    return FakeApimart(state_path=folder / FAKE_STATE_NAME, record_requests=False)


@posix
def test_ctrl_c_then_rerun_with_fake_resumes_the_same_tasks(tmp_path: Path) -> None:
    """SIGINT mid-batch (exit 130), then the same command: the tasks in flight are
    waited for by id (the new process's fake knows them), every job ends done, and the
    folder's fake holds exactly one task per job."""
    src = write_jobs(tmp_path / "jobs.jsonl", 16)
    out = tmp_path / "out"
    argv = [*apimart(), "batch", str(src), "--out", str(out), *SLOW, "-c", "6"]
    proc = subprocess.Popen(
        [*argv, "--progress", "off"],
        env=env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_submits(out, 4, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    running = {
        job: task for job, (state, task, _) in journal_rows(out).items() if state == "submitted"
    }
    assert running, "no task was left running to resume"
    assert (out / FAKE_STATE_NAME).is_file()

    rerun = subprocess.run(
        [*argv, "--progress", "off"],
        env=env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(running)} resumed by task id" in rerun.stderr
    rows = {r["id"]: r for r in results(out)}
    assert all(r["status"] == "done" for r in rows.values())
    assert all(rows[job]["task_id"] == task for job, task in running.items())
    fake = kept_state(out)
    assert len(fake.tasks) == 16 and not fake.duplicate_keys()


@posix
def test_a_generate_interrupted_with_fake_is_picked_up_by_the_task_it_names(
    tmp_path: Path,
) -> None:
    """Ctrl-C while ``generate --fake`` waits: it names ``apimart task ID --wait
    --download OUT --fake``; that command, run as printed, finds the task in the
    folder's fake and downloads its image."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            *apimart(),
            "generate",
            "-m",
            GEM,
            "-p",
            "x",
            "--out",
            str(out),
            *SLOW,
            "--progress",
            "plain",
        ],
        env=env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "submitted; waiting" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(seen) + rest
    hint = next(line for line in rest.splitlines() if "may still complete" in line)
    command = shlex.split(hint.split(": ", 1)[1])
    assert command[:2] == ["apimart", "task"] and command[-1] == "--fake"

    done = subprocess.run(
        [*apimart(), *command[1:], "--time-scale", "0.02"],
        env=env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    task_id = command[2]
    assert "status:  completed" in done.stdout
    assert (out / f"{task_id}_0.png").is_file()
    assert list(kept_state(out).tasks) == [task_id]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_task_with_fake_reads_the_download_folder(tmp_path: Path, backend: str) -> None:
    """A generate that timed out leaves its task in OUT's fake; ``task --fake`` with
    another folder says where the state was looked for; with OUT it waits and saves."""
    out = tmp_path / "out"
    first = cli(
        "--backend", backend, "generate", "-m", GEM, "-p", "x", "--out", str(out),
        "--fake", "--fake-latency", "fixed:100", "--time-scale", "0.01", "--timeout", "0.2",
    )  # fmt: skip
    assert first.code == 1 and "TaskTimeoutError" in first.err
    task_id = next(iter(kept_state(out).tasks))
    assert f"apimart task {task_id} --wait --download {out} --fake" in first.err

    elsewhere = cli(
        "--backend", backend, "task", task_id, "--fake", "--download", str(tmp_path / "x")
    )
    assert elsewhere.code == 1 and f"{FAKE_STATE_NAME} does not exist" in elsewhere.err
    assert "HTTP 400: Invalid task ID" in elsewhere.err

    found = cli(
        "--backend", backend, "task", task_id, "--wait", "--download", str(out), "--fake",
        "--time-scale", "0.01",
    )  # fmt: skip
    assert found.code == 0, found.err
    assert (out / f"{task_id}_0.png").is_file()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_damaged_fake_state_is_a_usage_error_naming_the_file(
    tmp_path: Path, backend: str
) -> None:
    """A state file that is not one: exit 2 before anything runs, naming the file and
    how to start afresh."""
    out = tmp_path / "out"
    out.mkdir()
    (out / FAKE_STATE_NAME).write_text("not a fake state\n")
    src = write_jobs(tmp_path / "jobs.jsonl", 2)
    ran = cli("--backend", backend, "batch", str(src), "--out", str(out), "--fake")
    assert ran.code == 2 and FAKE_STATE_NAME in ran.err and "delete it" in ran.err
