"""Every ``apimart`` command with its reader gone: a quiet exit, like other Unix tools.

``apimart models | head -1``, ``apimart models --json | true``, a batch whose log
reader died: the process runs against a pipe whose read end is already closed (the
reader exited before the first write), so its first write meets EPIPE. Whatever the
command, it must end with the status its work earned (0 here), with nothing on the
other stream that looks like a crash (no traceback, no ``BrokenPipeError``, no
"Exception ignored" from the interpreter's last flush, which would also turn the
status into 120).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from apimart_async import AsyncApimart
from apimart_async.testing import FakeApimart

from .images import png
from .test_cli_process import served
from .test_cli_terminal import GEM, apimart, env, write_jobs

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")

COMMANDS = [
    "help",
    "batch-help",
    "version",
    "models",
    "models-json",
    "balance",
    "upload",
    "task",
    "generate",
    "batch",
    "batch-json",
    "dry-run",
    "merge",
    "demo",
]
_CRASH = ("Traceback", "BrokenPipeError", "Exception ignored")


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[FakeApimart, str]]:
    """A fake served over HTTP for the commands that need a real API origin."""
    fake = FakeApimart(api_key="test")
    with served(fake) as url:
        yield fake, url


def _task_id(url: str) -> str:
    async def submit() -> str:
        async with AsyncApimart(api_key="test", base_url=url) as client:
            return (await client.submit(model=GEM, prompt="x")).id

    return anyio.run(submit)


def _argv(name: str, tmp: Path, url: str) -> list[str]:
    """The command line of *name*, its files prepared in *tmp*."""
    api = ["--base-url", url, "--api-key", "test"]
    jobs = write_jobs(tmp / "jobs.jsonl", 3)
    fast = ["--fake", "--fake-latency", "fast", "--progress", "plain"]
    if name == "upload":
        (tmp / "a.png").write_bytes(png())
    if name == "merge":
        shards = tmp / "shards"
        argv = [*apimart(), "batch", str(jobs), "--out", str(shards), "--shard", "0/1", *fast]
        subprocess.run(argv, env=env(), capture_output=True, timeout=60, check=True)
    return {
        "help": ["--help"],
        "batch-help": ["batch", "--help"],
        "version": ["--version"],
        "models": ["models"],
        "models-json": ["models", "--json"],
        "balance": ["balance", *api],
        "upload": ["upload", str(tmp / "a.png"), *api],
        "task": ["task", _task_id(url) if name == "task" else "", "--wait", "--json", *api],
        "generate": ["generate", "-m", GEM, "-p", "x", "--out", str(tmp / "gen"), *fast],
        "batch": ["batch", str(jobs), "--out", str(tmp / "out"), *fast],
        "batch-json": ["batch", str(jobs), "--out", str(tmp / "out"), "--json", *fast],
        "dry-run": ["batch", str(jobs), "--out", str(tmp / "dry"), "--dry-run"],
        "merge": ["merge", str(tmp / "shards")],
        "demo": ["demo", "--jobs", "4", "--time-scale", "0.001", "--out", str(tmp / "demo")],
    }[name]


def _run_with_a_dead_reader(argv: list[str], dead: str, tmp: Path) -> tuple[int, str]:
    """Run ``apimart *argv`` with *dead* (stdout or stderr) a pipe nobody reads any more;
    return the status and what the other stream got."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader exited before the command wrote anything
    other = tmp / "other.txt"
    with other.open("w") as kept:
        streams = {"stdout": kept, "stderr": kept, dead: write_end}
        try:
            done = subprocess.run(
                [*apimart(), *argv], env=env(), cwd=tmp, timeout=120, check=False, **streams
            )
        finally:
            os.close(write_end)
    return done.returncode, other.read_text(encoding="utf-8", errors="replace")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_exits_quietly_when_its_stdout_reader_is_gone(
    name: str, tmp_path: Path, service: tuple[FakeApimart, str]
) -> None:
    """stdout's reader is gone: status 0, and nothing on stderr that looks like a crash."""
    argv = _argv(name, tmp_path, service[1])
    code, err = _run_with_a_dead_reader(argv, "stdout", tmp_path)
    assert code == 0, err
    assert not any(word in err for word in _CRASH), err


# Commands that write to stderr (models and --version write nothing there: no test).
@pytest.mark.parametrize("name", ["generate", "batch", "batch-json", "dry-run", "demo"])
def test_a_command_whose_stderr_reader_is_gone_still_delivers_stdout(
    name: str, tmp_path: Path, service: tuple[FakeApimart, str]
) -> None:
    """stderr's reader is gone: status 0, stdout complete and free of crash traces."""
    argv = _argv(name, tmp_path, service[1])
    code, out = _run_with_a_dead_reader(argv, "stderr", tmp_path)
    assert code == 0, out
    assert out.strip() and not any(word in out for word in _CRASH), out


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("head") is None, reason="bash")
def test_models_into_head_and_json_into_true_in_a_real_shell(tmp_path: Path) -> None:
    """``set -o pipefail; apimart models | head -1`` and ``apimart models --json | true``
    both exit 0, print nothing on stderr, and head gets the header line."""
    command = " ".join(apimart())
    script = (
        "set -o pipefail; "
        f"{command} models | head -1 && {command} models --json | true && "
        f"{command} models --json | head -c 1 >/dev/null"
    )
    done = subprocess.run(
        ["bash", "-c", script],
        env=env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("model\tsizes\t")
    assert done.stderr == ""


def test_argparse_errors_go_through_the_command_streams(tmp_path: Path) -> None:
    """A usage error with stderr's reader gone: status 2, no traceback on stdout."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [*apimart(), "batch", "--no-such-flag"],
            env=env(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=write_end,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        with contextlib.suppress(OSError):
            os.close(write_end)
    assert done.returncode == 2
    assert done.stdout == ""  # the usage went to the dead stderr, quietly
