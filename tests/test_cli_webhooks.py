"""``apimart batch --webhook-public-url URL --webhook-listen HOST:PORT`` (issue 21).

The batch serves a ``WebhookReceiver`` with uvicorn in its own process and waits on the
pushes instead of polling. Checked in process with the embedded fake, whose callbacks
go to the listener over real HTTP (asyncio and trio: on trio uvicorn runs in a thread),
and through the installed command against a fake served over HTTP, whose server sends
the callbacks itself: the jobs complete with (almost) no task queries, where polling
needs several per job. Also: bad combinations are refused before anything is sent, and
the webhook never enters a job's idempotency key.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from anyio.from_thread import start_blocking_portal

from apimart_async.cli._webhook_server import listen_url, parse_listen
from apimart_async.testing import FakeApimart, Faults, Latency

from .test_cli_batch import cli, jobs, results, write_jobs
from .test_cli_terminal import apimart, env

if TYPE_CHECKING:
    from collections.abc import Iterator

PUBLIC = "https://hooks.example.com/apimart"
BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])
pytest.importorskip("uvicorn")


def realistic() -> FakeApimart:
    """Tasks of realistic length (around 15 service seconds), 100x faster."""
    return FakeApimart(latency=Latency.realistic(time_scale=0.01))


@BACKENDS
def test_pushed_results_end_the_jobs_with_almost_no_task_queries(
    tmp_path: Path, backend: str
) -> None:
    """40 jobs with webhooks: all done, every result pushed once, fewer task queries
    than jobs (the safety-net poll only for pushes a loaded machine delays); the same
    batch polled needs more than one query per job."""
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(40))
    argv = ("--backend", backend, "batch", str(src), "-c", "40", "--json", "--progress", "off")
    hooks = ("--webhook-public-url", PUBLIC, "--webhook-listen", "127.0.0.1:0")

    pushed = realistic()
    ran = cli(*argv, "--out", str(tmp_path / "pushed"), *hooks, fake=pushed)
    polled = realistic()
    plain = cli(*argv, "--out", str(tmp_path / "polled"), fake=polled)

    assert ran.code == 0 and plain.code == 0, ran.err + plain.err
    summary = json.loads(ran.out)
    assert summary["counts"] == {"done": 40}
    assert summary["webhooks"]["received"] == 40 and summary["webhooks"]["rejected"] == 0
    # The receiver's count is the proof; the fake counts a delivery only once it has
    # read the 2xx, which the batch, done at its 40th callback, may not wait for.
    assert pushed.stats.webhook_attempts >= 40
    assert pushed.stats.polls < 40 < polled.stats.polls
    assert json.loads(plain.out)["webhooks"] is None
    listening = re.search(r"listening for webhooks on (http://127\.0\.0\.1:\d+)", ran.err)
    assert listening is not None and f"{PUBLIC}/<secret token>/callback" in ran.err
    assert all(task.webhook and task.webhook.startswith(PUBLIC) for task in pushed.tasks.values())


def test_uncertain_jobs_of_a_webhook_run_are_resubmitted_with_webhooks(tmp_path: Path) -> None:
    """Every answer lost after the service created the task: the jobs are uncertain.
    Rerun with --resubmit-uncertain and the same webhook flags: each job is resent with
    its journaled body (its webhook URL included) and key, and the service replays it."""
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(3))
    out = str(tmp_path / "out")
    hooks = ("--webhook-public-url", PUBLIC, "--webhook-listen", "127.0.0.1:0")
    fake = FakeApimart(
        latency=Latency.fast(), faults=Faults(drop_after_submit=1.0, only=("submit",))
    )
    first = cli("batch", str(src), "--out", out, "--progress", "off", *hooks, fake=fake)
    assert first.code != 0 and fake.stats.tasks_created == 3
    assert {r["status"] for r in results(Path(out))} == {"uncertain"}

    fake.faults = Faults()
    again = cli("batch", str(src), "--out", out, "--progress", "off", "--resubmit-uncertain",
                *hooks, fake=fake)  # fmt: skip
    assert again.code == 0, again.err
    assert fake.stats.tasks_created == 3 and not fake.duplicate_keys()
    assert {r["status"] for r in results(Path(out))} == {"done"}


@BACKENDS
def test_the_webhook_is_not_part_of_a_jobs_idempotency_key(tmp_path: Path, backend: str) -> None:
    """The same file run with webhooks (two folders, two secret tokens) and without:
    every job sends the same key each time; a folder's reruns keep its token."""
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(5))
    hooks = ("--webhook-public-url", PUBLIC, "--webhook-listen", "127.0.0.1:0")
    sent: list[list[str | None]] = []
    urls: list[set[str | None]] = []
    for folder, extra in (("a", hooks), ("b", hooks), ("c", ())):
        fake = FakeApimart(latency=Latency.fast())
        ran = cli("--backend", backend, "batch", str(src), "--out", str(tmp_path / folder),
                  "--progress", "off", *extra, fake=fake)  # fmt: skip
        assert ran.code == 0, ran.err
        submits = [r for r in fake.requests if r.endpoint == "submit"]
        sent.append(sorted(r.idempotency_key for r in submits))
        urls.append({(r.json_body or {}).get("webhook") for r in submits})
    assert sent[0] == sent[1] == sent[2]
    assert len(urls[0]) == len(urls[1]) == 1 and urls[0] != urls[1] and urls[2] == {None}

    fake = FakeApimart(latency=Latency.fast())
    src.write_text(src.read_text() + json.dumps(jobs(6)[5]) + "\n")
    again = cli("--backend", backend, "batch", str(src), "--out", str(tmp_path / "a"),
                "--batch-id", "keep", "--progress", "off", *hooks, fake=fake)  # fmt: skip
    assert again.code == 0, again.err
    assert {
        (r.json_body or {}).get("webhook") for r in fake.requests if r.endpoint == "submit"
    } == urls[0]


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (("--webhook-listen", "127.0.0.1:0"), "--webhook-listen needs --webhook-public-url too"),
        (("--webhook-public-url", PUBLIC), "--webhook-public-url needs --webhook-listen too"),
        (
            ("--webhook-public-url", "http://localhost:8080/x", "--webhook-listen", ":0"),
            "--webhook-public-url 'http://localhost:8080/x': ",
        ),
    ],
)
def test_bad_webhook_flags_are_refused_before_anything_is_sent(
    tmp_path: Path, flags: tuple[str, ...], says: str
) -> None:
    """Exit 2 with the flag named; no request, no folder."""
    fake = FakeApimart()
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(2))
    ran = cli("batch", str(src), "--out", str(tmp_path / "out"), *flags, fake=fake)
    assert ran.code == 2 and says in ran.err, ran.err
    assert fake.stats.requests_total == 0 and not (tmp_path / "out").exists()


def test_a_listen_address_in_use_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """Another process holds the port: exit 2 naming --webhook-listen; nothing sent."""
    fake = FakeApimart()
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(2))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = cli("batch", str(src), "--out", str(tmp_path / "out"), "--webhook-public-url",
                  PUBLIC, "--webhook-listen", f"127.0.0.1:{port}", fake=fake)  # fmt: skip
    assert ran.code == 2 and f"--webhook-listen: cannot listen on 127.0.0.1:{port}" in ran.err
    assert fake.stats.requests_total == 0


def test_listen_addresses_parse_like_host_port() -> None:
    """HOST:PORT, [IPv6]:PORT, :PORT for every interface; bad ones say why."""
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9000") == ("0.0.0.0", 9000)
    assert listen_url("0.0.0.0", 9000) == "http://127.0.0.1:9000"
    assert listen_url("::1", 80) == "http://[::1]:80"
    for text, says in (("8080", "HOST:PORT"), ("h:70000", "0-65535"), ("::1:80", "brackets")):
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_listen(text)


class Listener:
    """The port of the batch's listener, once it said where it listens."""

    def __init__(self) -> None:
        self.port = 0
        self.known = threading.Event()

    def found(self, port: int) -> None:
        """The batch printed its listening address."""
        self.port = port
        self.known.set()

    def rewrite(self, url: str) -> str:
        """Where a callback to PUBLIC really goes (called on the fake server's thread)."""
        self.known.wait(30)  # printed before the first submit: never waits in practice
        return url.replace("https://hooks.example.com", f"http://127.0.0.1:{self.port}", 1)


@contextlib.contextmanager
def served_with_callbacks(fake: FakeApimart, listener: Listener) -> Iterator[str]:
    """Serve *fake* over HTTP, its callbacks routed by *listener*; yield its URL."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(fake.serve(webhook_rewrite=listener.rewrite)) as url,
    ):
        try:
            yield url
        finally:
            listener.known.set()  # never leave the server's thread waiting


def test_the_installed_command_waits_on_pushes_from_a_served_service(tmp_path: Path) -> None:
    """``apimart batch ... --webhook-listen 127.0.0.1:0`` as a process, against a fake
    served over HTTP that calls back (as APIMart would, through a proxy): every job
    done, every result pushed, task queries far fewer than jobs."""
    fake = FakeApimart(api_key="test", latency=Latency.realistic(time_scale=0.01))
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(24))
    out = tmp_path / "out"
    listener = Listener()
    with served_with_callbacks(fake, listener) as url:
        proc = subprocess.Popen(
            [
                *apimart(),
                "batch",
                str(src),
                "--out",
                str(out),
                "--base-url",
                url,
                "--api-key",
                "test",
                "--time-scale",
                "0.01",
                "-c",
                "24",
                "--json",
                "--progress",
                "off",
                "--webhook-public-url",
                PUBLIC,
                "--webhook-listen",
                "127.0.0.1:0",
            ],
            env=env(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                found = re.search(r"listening for webhooks on http://127\.0\.0\.1:(\d+)", line)
                if found:
                    listener.found(int(found[1]))
                    break
            out_text, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    summary = json.loads(out_text)
    assert summary["counts"] == {"done": 24} and summary["webhooks"]["received"] == 24
    assert fake.stats.polls < 6
    assert all(r["status"] == "done" for r in results(out))
