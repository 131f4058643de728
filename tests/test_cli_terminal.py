"""The installed ``apimart`` command on a terminal and through a pipe (issue 19).

Each test runs the real console script (``apimart`` next to this interpreter, with
this source tree first on ``PYTHONPATH``), once with stdout a pipe and once on a
pseudo-terminal of 80 columns, where the output is meant to differ: ``models`` is one
block per model on a terminal and tab-separated lines otherwise, and the batch summary
is a table on a terminal and plain tab-separated lines otherwise. The helpers here are
shared by the other process tests of the command.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from apimart_async.cli._batch import SUMMARY_FIELDS
from apimart_async.cli._models import JSON_KEYS, TSV_HEADER
from apimart_async.cli._selfcheck import RESULT_FIELDS
from apimart_async.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
GEM = "gemini-3-pro-image-preview"
posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX terminals and pipes")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_BOX = re.compile(r"[\u2500-\u257f]")  # box-drawing characters


def apimart() -> list[str]:
    """The installed console script (``python -m apimart_async.cli`` if there is none)."""
    script = Path(sys.executable).with_name("apimart")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "apimart_async.cli"]


def env(**extra: str) -> dict[str, str]:
    """The environment of a child command: this tree first, no key, no base URL."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("APIMART_")}
    base.pop("COLUMNS", None)
    return {**base, "PYTHONPATH": str(ROOT), **extra}


@dataclass
class Done:
    """A finished child command."""

    code: int
    out: str
    err: str


def piped(*argv: str, cwd: Path, timeout: float = 120, **extra: str) -> Done:
    """Run ``apimart *argv`` with stdout and stderr pipes (no terminal)."""
    done = subprocess.run(
        [*apimart(), *argv],
        cwd=cwd,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Done(done.returncode, done.stdout, done.stderr)


def in_terminal(*argv: str, cwd: Path, columns: int = 80, timeout: float = 120) -> Done:
    """Run ``apimart *argv`` on a pseudo-terminal of *columns* columns (stdin, stdout
    and stderr all on it); ``out`` is everything shown, ANSI sequences removed."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [*apimart(), *argv],
        cwd=cwd,
        env=env(COLUMNS=str(columns), TERM="xterm-256color"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return Done(code, _ANSI.sub("", text), "")


def write_jobs(path: Path, count: int, **extra: object) -> Path:
    """A batch file of *count* valid jobs with ids j0, j1, ..."""
    with path.open("w", encoding="utf-8") as fh:
        for i in range(count):
            fh.write(json.dumps({"id": f"j{i}", "model": GEM, "prompt": f"p{i}", **extra}) + "\n")
    return path


# -- models -----------------------------------------------------------------------------


@posix
def test_models_on_a_terminal_is_one_block_per_model_within_80_columns(tmp_path: Path) -> None:
    """On an 80-column terminal every model id starts its own block, every line fits,
    no value is cut into 3-letter shreds, and no internal reference (§) shows."""
    done = in_terminal("models", cwd=tmp_path)
    assert done.code == 0, done.out
    lines = done.out.splitlines()
    assert max(len(line) for line in lines) <= 80
    starts = [line for line in lines if line and not line.startswith(" ")]
    assert starts[: len(MODELS)] == list(MODELS)
    assert "§" not in done.out and "res\nolu" not in done.out
    assert "  resolution   1K, 2K, 4K" in done.out  # a label and its whole value
    assert "--allow-unknown-models" in done.out


@posix
def test_models_piped_is_one_tab_separated_line_per_model(tmp_path: Path) -> None:
    """Through a pipe: a header and one line per model, same columns on every line,
    lists comma-separated; no box drawing, no padding, no § reference."""
    done = piped("models", cwd=tmp_path)
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert lines[0].split("\t") == list(TSV_HEADER)
    rows = [line.split("\t") for line in lines[1:]]
    assert [row[0] for row in rows] == list(MODELS)
    assert all(len(row) == len(TSV_HEADER) for row in rows)
    gemini = dict(zip(TSV_HEADER, rows[list(MODELS).index(GEM)], strict=True))
    assert gemini["resolutions"] == "1K,2K,4K" and gemini["n"] == "1-4"
    assert not _BOX.search(done.out) and "  " not in done.out and "§" not in done.out


@posix
def test_models_json_is_the_same_on_a_terminal_and_through_a_pipe(tmp_path: Path) -> None:
    """``--json``: one object per model id with exactly the documented keys, whatever
    stdout is (on a terminal, the pretty-printed JSON is all that is shown)."""
    data = json.loads(piped("models", "--json", cwd=tmp_path).out)
    assert [entry["model"] for entry in data] == list(MODELS)
    assert all(tuple(entry) == JSON_KEYS for entry in data)
    imagen = next(e for e in data if e["model"] == "imagen-4.0-apimart")
    assert imagen["max_images"] == 0 and "§" not in imagen["notes"]
    on_terminal = json.loads(in_terminal("models", "--json", cwd=tmp_path).out)
    assert on_terminal == data


# -- the batch summary ------------------------------------------------------------------


@posix
def test_batch_summary_is_plain_when_piped_and_a_table_on_a_terminal(tmp_path: Path) -> None:
    """The same batch: piped, the summary is tab-separated lines with no box drawing
    and no padding; on a terminal, a table (and a live progress display)."""
    src = write_jobs(tmp_path / "jobs.jsonl", 4)
    with (tmp_path / "jobs.jsonl").open("a") as fh:
        fh.write('{"id": "bad", "model": "no-such-model", "prompt": "x"}\n')
    argv = ("batch", str(src), "--fake", "--fake-latency", "fast")

    done = piped(*argv, "--out", str(tmp_path / "piped"), cwd=tmp_path)
    assert done.code == 1, done.err  # the invalid line
    assert "status\tjobs\tmeaning" in done.out.splitlines()
    assert "done\t4\timages in " in done.out and "invalid\t1\t" in done.out
    assert "5\tbad\tinvalid\tmodel: unknown model" in done.out
    assert not _BOX.search(done.out) and "  " not in done.out

    shown = in_terminal(*argv, "--out", str(tmp_path / "tty"), cwd=tmp_path)
    assert shown.code == 1, shown.out
    summary = shown.out.split(" -> ", 1)[1].split("images written", 1)[0]
    assert re.search(r"^done +\u2502 +4 \u2502", summary, re.MULTILINE), shown.out
    assert "\t" not in summary  # a drawn, padded table, not tab-separated lines
    assert "in flight" in shown.out  # the live progress display was on the terminal


@posix
def test_batch_json_summary_and_result_records_through_the_installed_command(
    tmp_path: Path,
) -> None:
    """``--json``: stdout is one JSON object with the documented keys, its counts map
    each results.jsonl status to its number of jobs; every record has every field."""
    src = write_jobs(tmp_path / "jobs.jsonl", 3, n=2)
    with src.open("a") as fh:
        fh.write("{broken\n")
    out = tmp_path / "out"
    done = piped("batch", str(src), "--out", str(out), "--fake", "--json", cwd=tmp_path)
    assert done.code == 1, done.err
    summary = json.loads(done.out)
    assert tuple(summary) == SUMMARY_FIELDS
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(tuple(r) == RESULT_FIELDS for r in records)
    counted: dict[str, int] = {}
    for record in records:
        counted[record["status"]] = counted.get(record["status"], 0) + 1
    assert summary["counts"] == counted == {"done": 3, "invalid": 1}
    assert summary["jobs"] == 4 and summary["images"] == 6 and summary["exit_status"] == 1
    done_rows = [r for r in records if r["status"] == "done"]
    assert all(len(r["urls"]) == 2 and r["expires_at"] and r["cost"] > 0 for r in done_rows)
    assert summary["spent"] == pytest.approx(sum(r["cost"] for r in done_rows))
    assert summary["total_spent"] == pytest.approx(summary["spent"])
    assert summary["cost_unknown"] == 0 and summary["stopped"] is None
    broken = next(r for r in records if r["status"] == "invalid")
    assert broken["error_type"] == "InvalidLine" and "not valid JSON" in broken["error"]
    assert "images written" in done.err and "images written" not in done.out
