"""``apimart batch`` streams its file and shrugs off closed output pipes (issue 14, item 5).

Streaming: jobs start before the rest of the file is read, and duplicate ids are still
found however far apart. Closed pipes: real processes whose stdout or stderr reader
goes away (``2>&1 | head -1``, a closed descriptor) still finish every job, keep the
journal, and exit 0, never with a traceback.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from apimart_async.cli._app import run
from apimart_async.cli._setup import Runtime
from apimart_async.testing import FakeApimart, Latency
from apimart_async.types import Event, SubmittedEvent

from .test_cli_batch import GEM, cli, jobs, journal, results, write_jobs
from .test_cli_process import ROOT, served

if TYPE_CHECKING:
    from collections.abc import Iterator

posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes and descriptors")


def test_jobs_start_before_the_rest_of_the_file_is_read(tmp_path: Path) -> None:
    """The first submit happens while the last line (a bad one) is still unread: the
    file is streamed, not validated whole first; the bad line is reported later."""
    src = write_jobs(tmp_path / "jobs.jsonl", [*jobs(300), "{broken"])
    err = io.StringIO()
    at_first_submit: list[str] = []

    def look(event: Event) -> None:
        if isinstance(event, SubmittedEvent) and not at_first_submit:
            at_first_submit.append(err.getvalue())

    code = run(
        ["batch", str(src), "--out", str(tmp_path / "out"), "-c", "2", "--progress", "off"],
        runtime=Runtime(fake=FakeApimart(), on_event=look),
        stdout=io.StringIO(),
        stderr=err,
    )

    assert code == 1  # the broken line
    assert "line 301" not in at_first_submit[0]
    assert "line 301: not valid JSON" in err.getvalue()
    assert [r["status"] for r in results(tmp_path / "out")].count("done") == 300


def test_duplicate_ids_far_apart_are_still_found(tmp_path: Path) -> None:
    """An id reused 2,000 lines later is an error on the later line (ids are claimed in
    an on-disk table, not a set in memory); derived ids still skip taken ones."""
    lines: list[Any] = [*jobs(2000)]
    lines.append({"id": "j7", "model": GEM, "prompt": "again"})
    lines.append({"model": GEM, "prompt": "same"})
    lines.append({"model": GEM, "prompt": "same"})
    src = write_jobs(tmp_path / "jobs.jsonl", lines)

    ran = cli("batch", str(src), "--out", str(tmp_path / "out"), "-c", "64", fake=FakeApimart())

    assert ran.code == 1
    assert "line 2001: id: 'j7' is already used on line 8" in ran.err
    rows = results(tmp_path / "out")
    assert len(rows) == 2003
    derived = [r["id"] for r in rows[-2:]]
    assert derived[1] == derived[0] + "-2"


def test_strict_reads_the_whole_file_before_sending_anything(tmp_path: Path) -> None:
    """--strict keeps its promise with a streamed file: a bad last line stops the run
    before any request."""
    fake = FakeApimart()
    src = write_jobs(
        tmp_path / "jobs.jsonl", [*jobs(50), {"id": "j3", "model": GEM, "prompt": "x"}]
    )
    ran = cli("batch", str(src), "--out", str(tmp_path / "out"), "--strict", fake=fake)
    assert ran.code == 2 and "line 51: id: 'j3' is already used on line 4" in ran.err
    assert fake.stats.requests_total == 0 and not (tmp_path / "out").exists()


# -- closed pipes, in real processes --------------------------------------------------


@pytest.fixture
def http_fake() -> Iterator[tuple[FakeApimart, str]]:
    """A FakeApimart over HTTP with tasks of about 0.1 s, so a batch takes a moment."""
    fake = FakeApimart(
        api_key="test", latency=Latency.fixed(10.0, time_scale=0.01).with_request_latency(0, 0.01)
    )
    with served(fake) as url:
        yield fake, url


def _argv(src: Path, out: Path, url: str, progress: str) -> list[str]:
    return [
        sys.executable, "-m", "apimart_async.cli", "batch", str(src), "--out", str(out),
        "--base-url", url, "--time-scale", "0.01", "-c", "4", "--progress", progress,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "APIMART_API_KEY": "test", "PYTHONPATH": str(ROOT)}


def _all_done(out: Path, count: int) -> None:
    rows = journal(out)
    assert len(rows) == count and {row["state"] for row in rows.values()} == {"done"}
    assert len(results(out)) == count


@posix
@pytest.mark.parametrize("progress", ["plain", "bar"])
def test_head_dash_1_changes_nothing_but_the_output(
    tmp_path: Path, http_fake: tuple[FakeApimart, str], progress: str
) -> None:
    """``apimart batch ... 2>&1 | head -1``: the reader leaves after one line; the batch
    finishes every job, keeps the journal and exits 0."""
    fake, url = http_fake
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(16))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _argv(src, out, url, progress),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # head -1 exits
    assert proc.wait(timeout=60) == 0
    _all_done(out, 16)
    assert fake.stats.tasks_created == 16


@posix
@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_a_closed_stream_ends_with_the_status_the_jobs_earned(
    tmp_path: Path, http_fake: tuple[FakeApimart, str], closed: str
) -> None:
    """One stream's reader is gone from the start (the other goes to a file): exit 0,
    the other stream intact, and no traceback or "Exception ignored" anywhere."""
    _, url = http_fake
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(8))
    out = tmp_path / "out"
    kept = (tmp_path / "kept.txt").open("w")
    streams: dict[str, Any] = {"stdout": kept, "stderr": kept}
    streams[closed] = subprocess.PIPE
    proc = subprocess.Popen(_argv(src, out, url, "plain"), env=_env(), **streams)
    pipe = proc.stdout if closed == "stdout" else proc.stderr
    assert pipe is not None
    pipe.close()
    code = proc.wait(timeout=60)
    kept.close()
    text = (tmp_path / "kept.txt").read_text()
    assert code == 0, text
    assert "Traceback" not in text and "Exception ignored" not in text
    assert ("images written" in text) == (closed == "stderr")
    _all_done(out, 8)


@posix
def test_stdout_closed_at_start_is_not_an_error(
    tmp_path: Path, http_fake: tuple[FakeApimart, str]
) -> None:
    """``apimart batch ... >&-`` (no stdout at all): the batch runs and exits 0."""
    _, url = http_fake
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(4))
    out = tmp_path / "out"
    done = subprocess.run(
        _argv(src, out, url, "plain"),
        env=_env(),
        stdout=subprocess.DEVNULL,  # then closed in the child, before Python starts
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.close(1),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    _all_done(out, 4)
    assert json.loads((out / "results.jsonl").read_text().splitlines()[0])["status"] == "done"
