"""``apimart batch``: a file of requests in, a folder of images out, resumable.

The run, in order:

1. the batch file is read once to hash it (the default batch id, see ``_keys``) and
   count its lines; with ``--strict`` every line is then checked and nothing is
   submitted if any is bad;
2. the folder's journal (``DIR/journal.sqlite3``, or ``DIR/shard-K-of-N/`` for a
   shard) is opened and checked before anything is sent (``_selfcheck``): it must
   belong to this service and be whole;
3. the file is streamed: each line is parsed, checked and claimed as it is read (a
   bad line is reported by number and skipped), and the journal decides what the job
   needs:

   ========================  ====================================================
   journal state             this run
   ========================  ====================================================
   (no row) / pending        submit under the job's derived idempotency key
   submitted                 wait for the recorded task id (never resubmitted)
   completed                 download again (if the URLs have not expired); a
                             completion without result URLs is queried again
   done, files missing       download again
   done                      skip
   failed                    retry, one generation on (a new key: a failed task
                             is refunded)
   uncertain / submitting    leave alone; ``--resubmit-uncertain`` resends the
                             journaled body under the same key
   expired                   leave alone (the results are gone)
   ========================  ====================================================

4. ``generate_many`` runs the jobs as they are read (memory stays flat however long
   the file is); the journal records each step (the client's ``SubmittingEvent``
   reports every submit attempt just before it is sent: the ``submitting`` row is
   committed first; a task id is committed as soon as it arrives; other steps ride
   along with the next commit), and each completed task's images are downloaded as
   ``<id>_<n>.<ext>``;
5. ``results.jsonl`` gets one record per line (of this shard; ``RESULT_FIELDS``), and
   a summary is printed: a table on a terminal, tab-separated lines when stdout is
   not one, JSON with ``--json`` (``SUMMARY_FIELDS``).

Spending: ``--max-cost``, ``--max-images`` and ``--price`` go to ``generate_many``
(they count this run's submits); when a limit is reached, or the service answers a
submit with 402 (balance exhausted), 401 (key rejected) or 403, no further line is
read and no further submit starts, while the jobs already submitted are waited for and
downloaded. Jobs not started stay ``pending`` (nothing was sent for them), so the
rerun that follows a top-up or a higher limit submits exactly those. The summary says
what this run spent (the costs the service reported) and how many jobs' costs are
unknown, and ends with one line on what stopped the run and how to resume.

Webhooks (``--webhook-public-url`` and ``--webhook-listen``): a ``WebhookReceiver``
served by uvicorn in this process (``_webhook_server``) gets the finished tasks pushed,
and ``generate_many`` waits on it instead of polling (a rare poll remains as a safety
net for a lost callback). The ``webhook`` field is delivery, not the job: it is left out
of the derived idempotency key, so keys stay the same across runs. With ``--fake`` the
embedded fake sends its callbacks to the listener over real HTTP.

``--dry-run`` reads and checks every line and reports the jobs, images and estimated
cost per model (``_dryrun``), without opening the journal or sending anything but an
optional balance read.

If a journal write fails (disk full, read-only filesystem), submitting stops at once,
and every task id already paid for that the journal may not hold (those of jobs still
in flight, and any that arrive while stopping) is printed on stderr and appended to a
recovery file (see ``_selfcheck``); the next run adopts them.

Exit status: 0 when every line is done, 1 when any is not (also when a spending limit
or a 402 stopped submitting), 2 for usage or configuration errors (also a rejected API
key), 3 when the folder's journal belongs to another service or is damaged (nothing
sent), 4 when a journal write failed mid-run, 128+N when stopped by signal N. A closed
stdout or stderr changes none of this.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel

from apimart_async import (
    ApimartError,
    AuthenticationError,
    BadRequestError,
    BudgetExceededError,
    InsufficientBalanceError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ResultExpiredError,
    SubmissionUncertainError,
    Task,
    TaskCancelledError,
    TaskFailedError,
    TaskStatus,
)
from apimart_async.models import parse_request
from apimart_async.testing import DEFAULT_BASE_URL
from apimart_async.types import CompletedEvent, FailedEvent, SubmittedEvent, SubmittingEvent

from ._errors import describe, explain, facts
from ._jobfile import JobLine, JobReader, LineError, LineRef, check_every_line
from ._journal import JobRecord, Journal, JournalError, JournalWriteError
from ._keys import canonical, derived_key, file_digest, random_key
from ._progress import BatchProgress, counts_table, plain_rows, problems_table
from ._selfcheck import (
    EXIT_JOURNAL_FAILED,
    RESULT_FIELDS,
    RESULTS_NAME,
    RESULTS_STAMP,
    JournalRefused,
    Service,
    bind,
    check_results,
    open_checked,
    results_stamp,
    write_recovery,
)
from ._setup import FAKE_API_KEY, ClientOptions, UsageError, make_client
from ._shard import Shard, parse_shard, shard_folders
from ._signals import exit_status, interruptible

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence

    from anyio.abc import TaskGroup

    from apimart_async import AsyncApimart, Event, OutcomeStream
    from apimart_async.models import BaseImageRequest
    from apimart_async.testing import FakeApimart
    from apimart_async.webhooks import WebhookReceiver

    from ._errors import ErrorFacts
    from ._setup import Runtime
    from ._ui import Ui

__all__ = [
    "RESULTS_NAME",
    "RESULT_FIELDS",
    "SHARD_MANIFEST",
    "SUMMARY_FIELDS",
    "BatchResult",
    "BatchSettings",
    "cmd_batch",
    "run_batch",
]

SHARD_MANIFEST = "shard.json"
WEBHOOK_TOKEN = "webhook_token"
"""Journal meta key: the folder's secret webhook path token."""
MAX_NOTES = 20
MAX_INVALID_NOTES = 50
MAX_PROBLEM_ROWS = 10
MAX_ERROR_CHARS = 200
FLUSH_EVERY = 0.5
"""Seconds between commits of the writes that can wait (completed, done, notes)."""
MAX_UNCOMMITTED = 2000
CHECKPOINT_EVERY = 256
"""Lines read between yields to the event loop (a run of skipped lines stays fair)."""
# Errors after which no further submit starts (jobs already submitted carry on): the
# library stops on the first two itself, and a 401 or 403 would meet every job alike.
_STOPS = (BudgetExceededError, InsufficientBalanceError, AuthenticationError, PermissionDeniedError)
# Errors after which a recorded task will never complete: it ended, or the service does
# not know its id (a task query answers 400 for an unknown id).
_TASK_GONE = (TaskFailedError, TaskCancelledError, BadRequestError, NotFoundError)
_NO_URLS = "completed without result URLs; a rerun queries the task again"
_MEANING = {
    "done": "images in the output folder",
    "failed": "rerun to retry (with a new idempotency key)",
    "uncertain": "submit outcome unknown: not resubmitted (rerun with --resubmit-uncertain)",
    "submitting": "stopped while submitting: uncertain on the next run",
    "submitted": "task still running: rerun to resume it by task id",
    "completed": "not downloaded: rerun to download",
    "expired": "results expired before they were downloaded",
    "pending": "not started: rerun to run",
    "invalid": "invalid lines, skipped",
}
SUMMARY_FIELDS = (
    "jobs_file",
    "folder",
    "results",
    "jobs",
    "counts",
    "images",
    "elapsed",
    "spent",
    "cost_unknown",
    "total_spent",
    "total_cost_unknown",
    "stopped",
    "webhooks",
    "exit_status",
)
"""The keys of the ``--json`` summary, in order."""
# A job whose cost may exist but is not known (for the summary's cost_unknown).
_MAY_COST = ("submitting", "submitted", "completed", "done", "uncertain")


class KeyBodyMismatch(ValueError):
    """A submit would send a derived idempotency key with a body it was not derived for."""


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """What ``apimart batch`` was asked to do."""

    jobs_path: Path
    out: Path
    concurrency: int = 32
    strict: bool = False
    resubmit_uncertain: bool = False
    allow_unknown: bool = False
    kind: str = "batch"
    title: str | None = None
    shard: Shard | None = None
    batch_id: str | None = None
    rebuild: bool = False
    same_account: bool = False
    as_json: bool = False
    dry_run: bool = False
    max_cost: float | None = None
    max_images: int | None = None
    prices: tuple[tuple[str, float], ...] = ()
    """``--price MODEL=USD`` pairs (USD per image), the last one for a model winning."""
    webhook_public_url: str | None = None
    webhook_listen: tuple[str, int] | None = None

    @property
    def folder(self) -> Path:
        """Where this run's journal, results and images go."""
        return self.out / self.shard.folder if self.shard is not None else self.out

    def check_every_line(self) -> Iterator[JobLine | LineError | LineRef]:
        """Every line of the file (of this shard) checked ahead of a run."""
        return check_every_line(
            self.jobs_path,
            allow_unknown=self.allow_unknown,
            wants=self.shard.owns if self.shard is not None else None,
        )


@dataclass(slots=True)
class BatchResult:
    """How a run ended."""

    exit_code: int
    records: dict[str, JobRecord] = field(default_factory=dict[str, JobRecord])
    counts: Counter[str] = field(default_factory=Counter[str])
    fake: FakeApimart | None = None
    elapsed: float = 0.0
    images: int = 0
    summary: dict[str, Any] = field(default_factory=dict[str, Any])
    """The ``--json`` summary (``SUMMARY_FIELDS``)."""


def run_batch(
    settings: BatchSettings,
    options: ClientOptions,
    runtime: Runtime,
    ui: Ui,
    *,
    backend: str = "asyncio",
) -> BatchResult:
    """Run ``apimart batch``; see the module docstring.

    Raises ``UsageError`` (exit 2) and ``JournalRefused`` (exit 3) before any request.
    """
    batch_id, lines = _prepare_file(settings)
    if settings.dry_run:
        from ._dryrun import dry_run

        return BatchResult(dry_run(settings, options, runtime, ui, backend=backend))
    if settings.strict:
        _strict_check(settings, ui)
    _check_layout(settings)
    run = _Run(settings, ui, runtime, backend=backend)
    client: AsyncApimart | None = None
    fake: FakeApimart | None = None
    if runtime.fake is not None or options.fake:
        # The embedded fake keeps its state in the folder: it is created only once the
        # journal has accepted this run (a fake's file never lands in a real batch's).
        service = _fake_service(runtime)
    else:
        client, fake = make_client(options, runtime)
        service = _api_service(options, client)
    with contextlib.ExitStack() as stack:
        run.receiver, run.listener = _webhook_listener(settings, stack)
        try:
            journal, rebuild = open_checked(
                settings.folder,
                shared=settings.shard is not None,
                rebuild=settings.rebuild,
                fresh_ok=settings.kind == "demo",
            )
        except (JournalError, OSError) as exc:
            raise UsageError(str(exc)) from None
        with journal:
            try:
                note = bind(journal, service, same_account=settings.same_account)
                notes = check_results(journal, rebuild=rebuild, images=settings.kind != "demo")
                _record_run(journal, settings, batch_id)
                if settings.webhook_public_url is not None and run.receiver is not None:
                    run.receiver = _journaled_receiver(journal, settings.webhook_public_url)
            except (JournalError, sqlite3.Error) as exc:
                raise JournalRefused(f"cannot use the journal {journal.path}: {exc}") from None
            if client is None:
                client, fake = make_client(options, runtime, state_dir=settings.folder)
            run.fake = fake
            for text in [note, *notes]:
                if text:
                    ui.info(text)
            run.start(journal, batch_id, lines)
            try:
                stopped = anyio.run(run.run, client, backend=backend)
            except KeyboardInterrupt:  # no signal handler could be installed
                stopped = signal.SIGINT
            run.finish_listing(stopped)
            summary = run.write_results()
            result = run.summarize(summary, stopped)
    result.fake = fake
    return result


def _journaled_receiver(journal: Journal, public_url: str) -> WebhookReceiver:
    """The receiver for *public_url* with the folder's own secret path token (drawn on
    the folder's first webhook run, then kept in its journal).

    Every run of the folder then sends the same ``webhook`` URL: a resent body is the
    body its idempotency key was first sent with, and a callback for a task of an
    earlier run still finds the receiver. The token is kept in the journal, which is
    as private as the folder; anyone who can read it could push forged results.
    """
    from apimart_async.webhooks import WebhookReceiver

    token = journal.meta(WEBHOOK_TOKEN)
    if token is None:
        token = secrets.token_urlsafe(32)
        journal.set_meta(WEBHOOK_TOKEN, token)
        journal.commit()
    return WebhookReceiver(public_url=public_url, token=token)


def _fake_service(runtime: Runtime) -> Service:
    fake = runtime.fake
    if fake is not None:
        return Service("fake", fake.base_url.rstrip("/"), fake.api_key)
    return Service("fake", DEFAULT_BASE_URL.rstrip("/"), FAKE_API_KEY)


def _api_service(options: ClientOptions, client: AsyncApimart) -> Service:
    key = options.api_key or os.environ.get("APIMART_API_KEY", "")
    return Service("api", str(client.base_url).rstrip("/"), key.strip())


def _webhook_listener(
    settings: BatchSettings, stack: contextlib.ExitStack
) -> tuple[WebhookReceiver | None, socket.socket | None]:
    """The receiver and its bound socket for ``--webhook-*`` (checked before anything is
    sent), or ``(None, None)``; the socket is closed when *stack* is."""
    public, listen = settings.webhook_public_url, settings.webhook_listen
    if public is None and listen is None:
        return None, None
    if public is None or listen is None:
        given, missing = (
            ("--webhook-listen", "--webhook-public-url")
            if public is None
            else ("--webhook-public-url", "--webhook-listen")
        )
        raise UsageError(
            f"{given} needs {missing} too: the service calls the public URL, which must "
            "reach this process at the listen address"
        )
    from apimart_async.webhooks import WebhookReceiver

    from ._webhook_server import ServerUnavailable, require_server

    try:
        require_server()
    except ServerUnavailable as exc:
        raise UsageError(str(exc)) from None
    try:
        receiver = WebhookReceiver(public_url=public)
    except ValueError as exc:
        text = explain(exc).replace("public_url: ", "", 1)
        raise UsageError(f"--webhook-public-url {public!r}: {text}") from None
    host, port = listen
    try:
        # Bound here, before anything is submitted, so a taken port is a usage error.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise UsageError(f"--webhook-listen: cannot listen on {host}:{port}: {exc}") from None
    stack.callback(sock.close)
    return receiver, sock


def _prepare_file(settings: BatchSettings) -> tuple[str, int]:
    """The batch id and the line count; ``UsageError`` if the file is unusable."""
    path = settings.jobs_path
    try:
        digest, lines, content = file_digest(path)
    except FileNotFoundError:
        raise UsageError(f"batch file {str(path)!r} not found") from None
    except OSError as exc:
        raise UsageError(f"cannot read the batch file {str(path)!r}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"batch file {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
            "save it as UTF-8"
        ) from None
    if not content:
        raise UsageError(f"batch file {str(path)!r} has no jobs (every line is blank)")
    return settings.batch_id or digest, lines


def _strict_check(settings: BatchSettings, ui: Ui) -> None:
    """--strict: check every line (of this shard) before anything else; stop if any is bad."""
    bad = 0
    for item in settings.check_every_line():
        if isinstance(item, LineError):
            bad += 1
            ui.info(str(item))
    if bad:
        raise UsageError(
            f"{bad} invalid line{'s' if bad != 1 else ''} in {str(settings.jobs_path)!r}; "
            "nothing was submitted (--strict)"
        )


def _check_layout(settings: BatchSettings) -> None:
    """A folder holds one unsharded batch or the shards of one N-way split, never both."""
    shards = shard_folders(settings.out)
    if settings.shard is None:
        if shards:
            count = next(iter(shards))[1]
            raise JournalRefused(
                f"{settings.out} holds a batch split into {count} shards (shard-K-of-{count} "
                f"folders): run each with --shard K/{count}, or combine them with "
                f"`apimart merge {settings.out}`"
            )
        return
    others = sorted({n for _, n in shards if n != settings.shard.count})
    if others:
        raise JournalRefused(
            f"{settings.out} holds shards of a {others[0]}-way split; this run asks for "
            f"--shard {settings.shard}. Use the same N as before (jobs are placed by "
            "sha256(id) mod N), or another --out folder"
        )
    if (settings.out / "journal.sqlite3").exists():
        raise JournalRefused(
            f"{settings.out} holds an unsharded batch (journal.sqlite3): run it without "
            "--shard, or use another --out folder for the sharded run"
        )


def _record_run(journal: Journal, settings: BatchSettings, batch_id: str) -> None:
    if journal.meta("kind") is None:
        journal.set_meta("kind", settings.kind)
    journal.set_meta("batch_id", batch_id)
    journal.set_meta("jobs_file", str(settings.jobs_path.resolve()))
    if settings.shard is not None:
        journal.set_meta("shard", str(settings.shard))
    journal.commit()


@dataclass(slots=True)
class _Summary:
    """What ``results.jsonl`` holds, counted as it is written."""

    counts: Counter[str]
    problems: list[tuple[int, str, str, str]]
    rows: int
    spent: float = 0.0
    """USD of every job's reported cost."""
    cost_unknown: int = 0
    """Jobs that may have cost something the service did not report."""

    def add(self, row: dict[str, Any]) -> None:
        """Count one ``results.jsonl`` record."""
        status = str(row["status"])
        self.rows += 1
        self.counts[status] += 1
        if row["cost"] is not None:
            self.spent += float(row["cost"])
        elif status in _MAY_COST:
            self.cost_unknown += 1
        if status != "done" and len(self.problems) <= MAX_PROBLEM_ROWS:
            self.problems.append((row["line"], row["id"] or "-", status, _short(row["error"])))


class _Active:
    """One job between being fed to the pipeline and its outcome."""

    __slots__ = ("expect", "generation", "job", "key", "resume", "sent", "task_id")

    def __init__(
        self,
        job: JobLine,
        key: str,
        *,
        expect: str | None,
        resume: str | None,
        generation: int,
    ) -> None:
        self.job = job
        self.key = key
        self.expect = expect
        """The canonical body the key was derived for (checked before sending)."""
        self.resume = resume
        self.generation = generation
        self.sent: str | None = None
        self.task_id: str | None = None


class _Run:
    """One batch run: the plan, the journal writes, the downloads, the report."""

    def __init__(
        self, settings: BatchSettings, ui: Ui, runtime: Runtime, *, backend: str = "asyncio"
    ) -> None:
        self.settings = settings
        self.ui = ui
        self.runtime = runtime
        self.backend = backend
        self.fake: FakeApimart | None = None
        self.receiver: WebhookReceiver | None = None
        self.listener: socket.socket | None = None
        self.stream: OutcomeStream | None = None
        self.stop: BaseException | None = None
        """What stopped submitting (a limit, a 402, a 401 or 403): no more lines are fed."""
        self.journal: Journal | None = None
        self.reader: JobReader | None = None
        self.batch_id = ""
        self.journal_id = ""
        self.fresh = False
        self.total_estimate = 0
        self.active: dict[int, _Active] = {}
        self.by_key: dict[str, _Active] = {}
        self.fed = 0
        self.plan_counts: Counter[str] = Counter()
        self.invalid = 0
        self.fatal: str | None = None
        self.failure: JournalWriteError | None = None
        self.notes = 0
        self.progress: BatchProgress | None = None
        self.scope: anyio.CancelScope | None = None
        self.group: TaskGroup | None = None
        self.slots: anyio.Semaphore | None = None
        self.elapsed = 0.0
        self.images = 0
        self.read_all = False

    def start(self, journal: Journal, batch_id: str, lines: int) -> None:
        """Attach the journal and open the batch file for streaming."""
        self.journal = journal
        self.journal_id = journal.meta("journal_id") or ""
        # A journal without rows has nothing to look up, line after line (ids are
        # unique within a file, so no row this run creates is looked up again).
        self.fresh = journal.count() == 0
        self.batch_id = batch_id
        shard = self.settings.shard
        self.total_estimate = lines if shard is None else -(-lines // shard.count)
        self.reader = JobReader(
            self.settings.jobs_path,
            journal.registry(),
            allow_unknown=self.settings.allow_unknown,
            wants=shard.owns if shard is not None else None,
        )

    # -- planning, one line at a time -----------------------------------------------

    def _plan(self, job: JobLine) -> _Active | JobRecord | None:
        """What *job* needs: an ``_Active`` to feed, a record to download again, or None."""
        journal = self.journal
        assert journal is not None
        record = None if self.fresh else journal.get(job.id)
        if record is not None:
            record = self._check_changed(journal, record, job)
        state = record.state if record is not None else "pending"
        counts = self.plan_counts
        folder = self.settings.folder
        if state == "done":
            assert record is not None
            if all((folder / name).is_file() for name in record.files):
                counts["skipped"] += 1
                if self.progress is not None:
                    self.progress.counted(done=1)
                return None
            counts["redownload"] += 1
            return record
        if state == "completed":
            assert record is not None
            if record.image_urls:
                counts["redownload"] += 1
                return record
            counts["requery"] += 1  # a completion without URLs is never stranded
            return self._active(
                job, record.idempotency_key, None, record.task_id, record.generation
            )
        if state == "submitting":  # the last run died while this job's submit was in flight
            journal.uncertain(job.id, "the run stopped while this job's submit was in flight", None)
            state = "uncertain"
        if state == "uncertain":
            assert record is not None
            return self._resubmit(job, record)
        if state == "expired":
            self._leave()
            return None
        if state == "submitted":
            assert record is not None
            counts["resumed"] += 1
            return self._active(
                job, record.idempotency_key, None, record.task_id, record.generation
            )
        generation = record.generation if record is not None else 0
        if state == "failed":
            generation = journal.retry(job.id)
            counts["retried"] += 1
        else:
            counts["new"] += 1
        derived = derived_key(self.batch_id, job.id, job.request, generation)
        if derived is None:
            return self._active(job, random_key(), None, None, generation)
        return self._active(job, derived[0], derived[1], None, generation)

    def _active(
        self, job: JobLine, key: str, expect: str | None, resume: str | None, generation: int
    ) -> _Active:
        return _Active(job, key, expect=expect, resume=resume, generation=generation)

    def _leave(self) -> None:
        """Count a job left alone this run (uncertain or expired)."""
        self.plan_counts["left"] += 1
        if self.progress is not None:
            self.progress.counted(failed=1)

    def _resubmit(self, job: JobLine, record: JobRecord) -> _Active | None:
        """An uncertain job: left alone, or resent with the same key and the same body."""
        if not self.settings.resubmit_uncertain:
            self._leave()
            return None
        if record.request_body is not None:
            request = _journaled_request(record.request_body)
            if request is not None:
                self.plan_counts["resubmitted"] += 1
                # Compared as on_submit compares: without the webhook this run adds.
                expect = canonical(self._job_body(record.request_body))
                line = JobLine(job.line, job.id, request, job.fingerprint)
                return self._active(line, record.idempotency_key, expect, None, record.generation)
        derived = derived_key(self.batch_id, job.id, job.request, record.generation)
        if derived is not None and record.idempotency_key in (derived[0], ""):
            # The key stands for this very body: resending it is the same submit.
            self.plan_counts["resubmitted"] += 1
            return self._active(job, derived[0], derived[1], None, record.generation)
        self._note(
            f"line {job.line} ({job.id}): uncertain, and the exact body it was sent with is "
            "unknown: left alone (check the APIMart dashboard)"
        )
        self._leave()
        return None

    def _check_changed(self, journal: Journal, record: JobRecord, job: JobLine) -> JobRecord:
        if record.line == job.line and record.fingerprint == job.fingerprint:
            return record
        if record.fingerprint in (job.fingerprint, "") or record.state in ("pending", "failed"):
            journal.seen(job.id, line=job.line, fingerprint=job.fingerprint)
            return record
        self._note(
            f"warning: line {job.line}: job {job.id!r} changed since it was submitted; keeping "
            "its recorded task (give the line a new id to run it again)"
        )
        journal.seen(job.id, line=job.line, fingerprint=record.fingerprint)
        return record

    # -- journal writes -------------------------------------------------------------

    def on_submit(self, key: str, body: bytes) -> None:
        """A submit attempt under *key* is about to be sent (``SubmittingEvent``); commit
        it first.

        Raising here keeps the submit from being sent: when the journal cannot be
        written, and when the body is not the one a derived key stands for.
        """
        active = self.by_key.get(key)
        journal = self.journal
        if active is None or journal is None:
            return
        if self.failure is not None:
            raise JournalWriteError(f"not sending: the journal cannot be written ({self.failure})")
        text = body.decode("utf-8")
        if text == active.sent:
            return  # a retry of the same submit: already recorded
        if active.expect is not None and canonical(self._job_body(text)) != active.expect:
            raise KeyBodyMismatch(
                f"job {active.job.id}: not sending idempotency key {key} with a body other "
                "than the one it was derived for"
            )
        job = active.job
        try:
            journal.submitting(
                job.id,
                line=job.line,
                fingerprint=job.fingerprint,
                key=key,
                body=text,
                generation=active.generation,
            )
            journal.commit()
        except JournalWriteError as exc:
            self._journal_failed(exc)
            raise
        active.sent = text

    def _job_body(self, text: str) -> object:
        """The submit body *text* without the webhook this run added: delivery, not the
        job, so it is not part of the job's derived key (a line's own one is)."""
        body: object = json.loads(text)
        receiver = self.receiver
        if receiver is None or not isinstance(body, dict):
            return body
        fields = cast("dict[str, object]", body)
        if fields.get("webhook") == receiver.webhook_url:
            return {k: v for k, v in fields.items() if k != "webhook"}
        return fields

    def on_event(self, event: Event) -> None:
        """Record what the client reports, then update the display."""
        if isinstance(event, SubmittingEvent):
            self.on_submit(event.idempotency_key, event.body)
            return
        index = event.job
        active = self.active.get(index) if index is not None else None
        if active is not None and self.journal is not None:
            journal = self.journal
            job = active.job
            try:
                if isinstance(event, SubmittedEvent):
                    active.task_id = event.task_id
                    if self.failure is not None:
                        self._recover([(event.task_id, job.id, active.key)])
                    else:
                        journal.submitted(job.id, event.task_id)
                        journal.commit()  # a task id is durable before anything else
                elif isinstance(event, CompletedEvent):
                    task = event.task
                    if task.image_urls:
                        journal.completed(
                            job.id,
                            task.id,
                            task.image_urls,
                            task.expires_at,
                            cost=task.cost,
                            credits_cost=task.credits_cost,
                        )
                    else:
                        journal.note_error(job.id, _NO_URLS)
                elif isinstance(event, FailedEvent):
                    self._failed(active, event)
            except JournalWriteError as exc:
                lost = active.task_id if isinstance(event, SubmittedEvent) else None
                self._journal_failed(exc, [(lost, job.id, active.key)] if lost else [])
        if self.runtime.on_event is not None:
            self.runtime.on_event(event)

    def _failed(self, active: _Active, event: FailedEvent) -> None:
        journal = self.journal
        assert journal is not None
        job = active.job
        error = event.error
        if (
            isinstance(error, _STOPS)
            and active.sent is None
            and active.resume is None
            and self.stop is not None
        ):
            # A job submitting had already stopped for: nothing was sent for it, so it
            # stays pending (no journal row changes) and the rerun submits it.
            if self.progress is not None:
                self.progress.finished(ok=False, counted=False)
            return
        text = describe(error)
        known = facts(error)
        if isinstance(error, JournalWriteError):
            pass  # the failure itself is reported once, by _journal_failed
        elif isinstance(error, SubmissionUncertainError):
            body = json.dumps(error.request, separators=(",", ":"), ensure_ascii=False)
            journal.uncertain(job.id, text, body, facts=known)
        elif (active.task_id or active.resume) is not None and not isinstance(error, _TASK_GONE):
            # The task exists and may still complete (a timeout, an outage, a completion
            # without URLs): keep it "submitted" so the next run waits for it by id.
            journal.note_error(job.id, text, facts=known)
        elif active.sent is not None or active.resume is not None:
            task = error.task if isinstance(error, TaskFailedError | TaskCancelledError) else None
            journal.failed(
                job.id,
                text,
                event.task_id,
                facts=known,
                cost=task.cost if task is not None else None,
                credits_cost=task.credits_cost if task is not None else None,
            )
        if isinstance(error, _STOPS) and self.stop is None:
            self.stop = error
            self._note(f"stopping: {text}")
            self._note(
                "no further submits start; the jobs already submitted are waited for and downloaded"
            )
            if isinstance(error, BudgetExceededError) and active.sent is None:
                # The job that met the limit was not sent either: it stays pending.
                if self.progress is not None:
                    self.progress.finished(ok=False, counted=False)
                return
        self._finished(job.line, job.id, ok=False, error=text)

    def _journal_failed(
        self, exc: JournalWriteError, lost: Sequence[tuple[str, str, str]] = ()
    ) -> None:
        """A journal write failed: stop submitting, and save every task id at risk."""
        entries = list(lost)
        if self.failure is None:
            self.failure = exc
            for active in self.active.values():
                if active.task_id is not None or active.resume is not None:
                    task = active.task_id or active.resume
                    assert task is not None
                    entry = (task, active.job.id, active.key)
                    if entry not in entries:
                        entries.append(entry)
            self._abort(f"stopping: {exc}; no further submits are sent")
        self._recover(entries)

    def _recover(self, entries: Sequence[tuple[str, str, str]]) -> None:
        if not entries:
            return
        journal = self.journal
        assert journal is not None
        for task, job_id, key in entries:
            self._note(f"paid task {task} (job {job_id}, idempotency key {key})")
        where = write_recovery(journal.directory, self.journal_id, entries)
        if where is None:
            self._note("could not write these task ids to any recovery file: copy them from above")
        else:
            self._note(f"task ids saved to {where} (the next run adopts them)")

    def _abort(self, message: str) -> None:
        if self.fatal is None:
            self.fatal = message
            self._note(message)
            if self.scope is not None:
                self.scope.cancel()

    def _finished(
        self, line: int, job_id: str, *, ok: bool, images: int = 0, error: str = ""
    ) -> None:
        if self.progress is not None:
            self.progress.finished(ok=ok, images=images)
        if not ok:
            self.notes += 1
            if self.notes <= MAX_NOTES:
                self._note(f"line {line} ({job_id}): {error}")
            elif self.notes == MAX_NOTES + 1:
                self._note("further problems are listed at the end")

    def _note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.note(text)
        else:
            self.ui.info(text)

    def _flush(self) -> None:
        """Commit the writes that could wait."""
        journal = self.journal
        if journal is None or self.failure is not None:
            return
        try:
            journal.commit()
        except JournalWriteError as exc:
            self._journal_failed(exc)

    # -- running --------------------------------------------------------------------

    async def run(self, client: AsyncApimart) -> int | None:
        """Run the plan; return the signal number that stopped it, if one did."""
        title = self.settings.title or self.settings.jobs_path.name
        if self.settings.shard is not None:
            title = f"{title} [shard {self.settings.shard}]"
        async with client, contextlib.AsyncExitStack() as stack:
            await self._listen(stack)
            with BatchProgress(
                self.ui,
                title=title,
                total=self.total_estimate,
                limit=self.settings.concurrency,
            ) as progress:
                self.progress = progress
                stopped = await interruptible(
                    partial(self._work, client),
                    on_stop=self._on_stop,
                    on_abort=lambda _: progress.close(),
                    then=client.aclose,  # hearing out submits on the wire is watched too
                )
                self.elapsed = progress.elapsed
                self.images = progress.images
                self.progress = None
        return stopped

    async def _listen(self, stack: contextlib.AsyncExitStack) -> None:
        """Serve the webhook receiver (and, with the embedded fake, send it callbacks)."""
        receiver, sock = self.receiver, self.listener
        if receiver is None or sock is None:
            return
        from ._webhook_server import listen_url, serving

        host, port = sock.getsockname()[:2]
        local = listen_url(str(host), int(port))
        await stack.enter_async_context(serving(receiver, sock, backend=self.backend))
        public = self.settings.webhook_public_url or ""
        self.ui.info(
            f"listening for webhooks on {local}; the service calls {public.rstrip('/')}"
            "/<secret token>/callback, which must reach it"
        )
        if self.fake is not None:
            # The embedded fake calls the public URL: route it to the listener, over
            # real HTTP, as a reverse proxy in front of it would.
            path = urlsplit(public).path.rstrip("/")
            rewrite = {public.rstrip("/"): local + path}
            await stack.enter_async_context(self.fake.webhook_sender(rewrite=rewrite))

    def _on_stop(self, signum: int) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self._note(
            f"{name}: stopping; submits already sent may answer first, so their task ids "
            "are recorded (press Ctrl-C again to quit at once)"
        )

    async def _work(self, client: AsyncApimart) -> None:
        self.scope = anyio.CancelScope()
        self.slots = anyio.Semaphore(self.settings.concurrency)
        with self.scope:
            async with anyio.create_task_group() as ticker:
                ticker.start_soon(self._tick)
                async with anyio.create_task_group() as tg:
                    self.group = tg
                    await self._pipeline(client, tg)
                ticker.cancel_scope.cancel()
        self._flush()

    async def _tick(self) -> None:
        ticks = 0
        while True:
            await anyio.sleep(FLUSH_EVERY)
            self._flush()
            ticks += 1
            if self.progress is not None and ticks % 2 == 0:
                self.progress.tick()

    async def _pipeline(self, client: AsyncApimart, tg: TaskGroup) -> None:
        async with client.generate_many(
            self._feed(client),
            concurrency=self.settings.concurrency,
            on_event=self.on_event,
            allow_unknown=self.settings.allow_unknown,
            idempotency_keys=lambda index, _: self.active[index].key,
            known_tasks=lambda index, _: self.active[index].resume,
            max_cost=self.settings.max_cost,
            max_images=self.settings.max_images,
            prices=dict(self.settings.prices) or None,
            webhook=self.receiver,
        ) as outcomes:
            self.stream = outcomes
            async for outcome in outcomes:
                active = self.active.pop(outcome.index)
                self.by_key.pop(active.key, None)
                task = outcome.task
                if outcome.error is not None or task is None:
                    continue  # reported by its FailedEvent
                if not task.image_urls:
                    self._finished(active.job.line, active.job.id, ok=False, error=_NO_URLS)
                    continue
                assert self.slots is not None
                await self.slots.acquire()
                tg.start_soon(self._download, client, active.job.id, active.job.line, task)

    async def _feed(self, client: AsyncApimart) -> AsyncIterator[BaseImageRequest]:
        """The jobs to run, as the file is read (planned one line at a time)."""
        journal, reader = self.journal, self.reader
        assert journal is not None and reader is not None
        read = 0
        for item in reader:
            read += 1
            if read % CHECKPOINT_EVERY == 0:
                await anyio.lowlevel.checkpoint()
                if journal.uncommitted > MAX_UNCOMMITTED:
                    self._flush()
            if self.fatal is not None or self.stop is not None:
                return
            if isinstance(item, LineError):
                self._invalid(item)
                continue
            if isinstance(item, LineRef):  # pragma: no cover - only after a stop
                continue
            planned = self._plan(item)
            if planned is None:
                continue
            if isinstance(planned, JobRecord):
                assert self.slots is not None and self.group is not None
                await self.slots.acquire()
                if self.progress is not None:
                    self.progress.started()
                self.group.start_soon(self._redownload, client, planned, item.line)
                continue
            index = self.fed
            self.fed += 1
            self.active[index] = planned
            self.by_key[planned.key] = planned
            if self.progress is not None:
                self.progress.started()
            yield planned.job.request
        self.read_all = True
        self._report_plan()

    def _invalid(self, error: LineError) -> None:
        assert self.journal is not None
        self.journal.see_invalid(error.line, error.id, error.message)
        self.invalid += 1
        if self.progress is not None:
            self.progress.counted(failed=1)
        if self.invalid <= MAX_INVALID_NOTES:
            self._note(f"skipping {error}")
        elif self.invalid == MAX_INVALID_NOTES + 1:
            self._note("further invalid lines are listed in results.jsonl")

    def _report_plan(self) -> None:
        counts = self.plan_counts
        if self.progress is not None:
            total = self.invalid + sum(counts.values())
            self.progress.set_total(total)
        earlier = sum(counts[k] for k in ("skipped", "redownload", "resumed", "retried", "requery"))
        if not (earlier or counts["left"] or counts["resubmitted"]):
            return
        parts = [
            f"{counts['skipped']} done earlier" if counts["skipped"] else "",
            f"{counts['resumed']} resumed by task id" if counts["resumed"] else "",
            f"{counts['requery']} completed without URLs (querying again)"
            if counts["requery"]
            else "",
            f"{counts['redownload']} to download again" if counts["redownload"] else "",
            f"{counts['retried']} failed before (retrying)" if counts["retried"] else "",
            f"{counts['resubmitted']} uncertain (resubmitting with the same key)"
            if counts["resubmitted"]
            else "",
            f"{counts['left']} left alone (uncertain or expired)" if counts["left"] else "",
            f"{counts['new']} new" if counts["new"] else "",
        ]
        assert self.journal is not None
        self._note(f"resuming {self.journal.path}: " + ", ".join(p for p in parts if p))

    async def _redownload(self, client: AsyncApimart, record: JobRecord, line: int) -> None:
        task = Task(
            id=record.task_id or "",
            status=TaskStatus.COMPLETED,
            image_urls=record.image_urls,
            expires_at=record.expires_at,
        )
        await self._download(client, record.id, line, task)

    async def _download(self, client: AsyncApimart, job_id: str, line: int, task: Task) -> None:
        journal = self.journal
        assert journal is not None and self.slots is not None
        names = [f"{job_id}_{i}" for i in range(len(task.image_urls))]
        try:
            paths = await client.download(task, self.settings.folder, names=names)
        except ResultExpiredError as exc:
            text = describe(exc)
            self._write(partial(journal.expired, job_id, text, facts=facts(exc)))
            self._finished(line, job_id, ok=False, error=text)
        except (ApimartError, OSError, ValueError) as exc:
            text = describe(exc)
            # It stays "completed": the next run downloads it again.
            self._write(partial(journal.note_error, job_id, text, facts=facts(exc)))
            self._finished(line, job_id, ok=False, error=text)
        else:
            self._write(partial(journal.done, job_id, [p.name for p in paths]))
            self._finished(line, job_id, ok=True, images=len(paths))
        finally:
            self.slots.release()

    def _write(self, write: Callable[[], object]) -> None:
        """A journal write that can wait for the next commit; a failure stops the run."""
        try:
            write()
        except JournalWriteError as exc:
            self._journal_failed(exc)

    # -- reporting ------------------------------------------------------------------

    def finish_listing(self, stopped: int | None) -> None:
        """Claim the lines the run never reached, so results.jsonl lists every line."""
        reader, journal = self.reader, self.journal
        assert reader is not None and journal is not None
        if self.read_all:
            return
        if stopped is not None:
            self.ui.info("listing the lines not reached yet in results.jsonl")
        reader.check = False
        for item in reader:  # valid lines are claimed as they are read: nothing to add
            if isinstance(item, LineError):
                journal.see_invalid(item.line, item.id, item.message)

    def write_results(self) -> _Summary:
        """Write ``results.jsonl`` (one record per line, atomically), streamed."""
        journal = self.journal
        assert journal is not None
        folder = self.settings.folder
        path = folder / RESULTS_NAME
        tmp = path.with_name(f".{RESULTS_NAME}.{os.getpid()}.tmp")
        summary = _Summary(Counter(), [], 0)
        if self.failure is not None:
            # What the journal holds since its last commit is not durable: results.jsonl
            # must not claim more than the journal will hold on the next run.
            self.ui.info(f"{path} not updated: the journal could not be written")
            return summary
        stop = self.stop
        not_started = (f"not started: {explain(stop)}", facts(stop)) if stop else None
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                for line, job_id, line_error, record in journal.lines():
                    row = _result_row(line, job_id, line_error, record, not_started)
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    summary.add(row)
            tmp.replace(path)
            stamp = results_stamp(folder)
            if stamp is not None:
                journal.set_meta(RESULTS_STAMP, stamp)
                journal.commit()
        except OSError as exc:
            self.ui.error(f"cannot write {path}: {exc}")
            tmp.unlink(missing_ok=True)
        except JournalWriteError as exc:
            self.ui.error(str(exc))
        if self.settings.shard is not None:
            self._write_manifest(summary.counts)
        return summary

    def _write_manifest(self, counts: Counter[str]) -> None:
        shard = self.settings.shard
        assert shard is not None
        manifest = {
            "shard": shard.index,
            "of": shard.count,
            "jobs_file": str(self.settings.jobs_path.resolve()),
            "batch_id": self.batch_id,
            "counts": dict(counts),
        }
        path = self.settings.folder / SHARD_MANIFEST
        tmp = path.with_name(f".{SHARD_MANIFEST}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            self.ui.error(f"cannot write {path}: {exc}")

    def summarize(self, summary: _Summary, stopped: int | None) -> BatchResult:
        """Print the summary; return the result with its exit status."""
        assert self.journal is not None
        counts = summary.counts
        folder = self.settings.folder
        if self.failure is not None:
            code = EXIT_JOURNAL_FAILED
        elif stopped is not None:
            code = exit_status(stopped)
        elif self.stop is not None:  # a budget, 402, 401 or 403 stopped the submits
            code = 2 if isinstance(self.stop, AuthenticationError) else 1
        else:
            code = 0 if counts["done"] == summary.rows else 1
        report = self._report(summary, code)
        if self.settings.as_json:
            self.ui.result(json.dumps(report, ensure_ascii=False))
        else:
            self._show(summary)
        rate = self.images / self.elapsed if self.elapsed > 0 else 0.0
        line = (
            f"{self.images} images written in {self.elapsed:.1f}s ({rate:.1f} images/s); "
            f"results: {folder / RESULTS_NAME}"
        )
        if self.settings.as_json:
            self.ui.info(line)
        else:
            self.ui.result(line)
        self.ui.info(_spend_line(report))
        if stopped is not None and self.failure is None:
            self.ui.info(
                f"stopped. The journal is consistent: rerun the same command to resume "
                f"({self.journal.path})"
            )
        elif self.stop is not None and self.failure is None:
            self.ui.error(_stop_line(self.stop, summary.counts["pending"]))
        records: dict[str, JobRecord] = {}
        if summary.rows <= 10_000:  # for callers (the demo); a huge batch keeps memory flat
            for _, job_id, _, record in self.journal.lines():
                if job_id is not None and record is not None:
                    records[job_id] = record
        return BatchResult(code, records, counts, None, self.elapsed, self.images, report)

    def _show(self, summary: _Summary) -> None:
        """The counts and the jobs not done: tables on a terminal, plain lines otherwise."""
        counts = summary.counts
        folder = self.settings.folder
        order = list(_MEANING)
        meaning = dict(_MEANING, done=f"images in {folder}")
        if self.settings.kind == "demo":
            meaning["failed"] = "failed on purpose (injected task failures)"
        rows = [
            (status, str(counts[status]), meaning.get(status, ""))
            for status in sorted(counts, key=lambda s: order.index(s) if s in order else 99)
        ]
        title = f"{self.settings.jobs_path.name} -> {folder}"
        shown = summary.problems[:MAX_PROBLEM_ROWS]
        more = summary.rows - counts["done"] - len(shown)
        if self.ui.stdout.isatty():
            self.ui.show(counts_table(title, rows))
            if shown:
                self.ui.show(problems_table(shown, more=more))
            return
        self.ui.result(title)
        for text in plain_rows(("status", "jobs", "meaning"), rows):
            self.ui.result(text)
        if shown:
            self.ui.result("not done:")
            problems = [(str(line), job, status, error) for line, job, status, error in shown]
            for text in plain_rows(("line", "id", "status", "error"), problems):
                self.ui.result(text)
            if more:
                self.ui.result(f"... and {more} more (see {RESULTS_NAME})")

    def _report(self, summary: _Summary, code: int) -> dict[str, Any]:
        """The ``--json`` summary (``SUMMARY_FIELDS``)."""
        stream = self.stream
        stop = self.stop
        stopped: dict[str, Any] | None = None
        if stop is not None:
            stopped = {
                "error_type": type(stop).__name__,
                "error_code": facts(stop).code,
                "message": explain(stop),
                "not_started": summary.counts["pending"],
            }
        webhooks: dict[str, Any] | None = None
        if self.receiver is not None:
            stats = self.receiver.stats
            webhooks = {
                "received": stats.received,
                "duplicates": stats.duplicates,
                "rejected": stats.rejected_total,
            }
        report: dict[str, Any] = {
            "jobs_file": str(self.settings.jobs_path),
            "folder": str(self.settings.folder),
            "results": str(self.settings.folder / RESULTS_NAME),
            "jobs": summary.rows,
            "counts": dict(summary.counts),
            "images": self.images,
            "elapsed": round(self.elapsed, 3),
            "spent": round(stream.spent, 6) if stream is not None else 0.0,
            "cost_unknown": stream.cost_unknown if stream is not None else 0,
            "total_spent": round(summary.spent, 6),
            "total_cost_unknown": summary.cost_unknown,
            "stopped": stopped,
            "webhooks": webhooks,
            "exit_status": code,
        }
        return report


def _result_row(
    line: int,
    job_id: str | None,
    line_error: str | None,
    record: JobRecord | None,
    not_started: tuple[str, ErrorFacts] | None,
) -> dict[str, Any]:
    """One ``results.jsonl`` record (``RESULT_FIELDS``)."""
    status = "invalid" if line_error is not None else (record.state if record else "pending")
    row: dict[str, Any] = dict.fromkeys(RESULT_FIELDS)
    row.update(line=line, id=job_id, status=status, files=[], urls=[])
    if line_error is not None:
        row.update(error=line_error, error_type="InvalidLine")
        return row
    if record is None:
        if not_started is not None:  # a limit or a 402/401 kept it from starting
            text, known = not_started
            row.update(error=text, error_type=known.type, error_code=known.code)
        return row
    row.update(
        task_id=record.task_id,
        urls=list(record.image_urls),
        expires_at=record.expires_at.isoformat() if record.expires_at else None,
        cost=record.cost,
        credits_cost=record.credits_cost,
    )
    if status == "done":
        row["files"] = list(record.files)
    elif record.error is not None:
        row.update(
            error=record.error,
            error_type=record.error_type,
            error_code=record.error_code,
            request_id=record.request_id,
        )
    elif status == "pending" and not_started is not None:
        text, known = not_started
        row.update(error=text, error_type=known.type, error_code=known.code)
    return row


def _spend_line(report: dict[str, Any]) -> str:
    """What this run (and the whole folder) spent, as the service reported."""
    text = f"spent by this run: {report['spent']:.2f} USD"
    if report["cost_unknown"]:
        text += f" (+ {report['cost_unknown']} job(s) of unknown cost)"
    text += f"; in this folder so far: {report['total_spent']:.2f} USD"
    if report["total_cost_unknown"]:
        text += f" (+ {report['total_cost_unknown']} job(s) of unknown cost)"
    return text


def _stop_line(stop: BaseException, waiting: int) -> str:
    """One line: what stopped submitting, and how to resume."""
    left = f"{waiting} job(s) not started" if waiting else "every job was started"
    rerun = "rerun the same command (finished jobs are skipped; nothing is paid twice)"
    if isinstance(stop, BudgetExceededError):
        if stop.budget == "max_images":
            reached = f"--max-images {stop.limit:g} reached ({stop.spent:g} images submitted)"
            flag = "--max-images"
        else:
            reached = (
                f"--max-cost {stop.limit:.2f} USD reached ({stop.spent:.2f} USD spent, "
                f"{stop.reserved:.2f} USD reserved by submits under way)"
            )
            flag = "--max-cost"
        return f"stopped submitting: {reached}; {left}. To continue, {rerun} with a higher {flag}"
    if isinstance(stop, InsufficientBalanceError):
        return (
            f"stopped submitting: the balance is exhausted ({explain(stop)}); {left}. Top it "
            f"up (see `apimart balance`), then {rerun}"
        )
    if isinstance(stop, AuthenticationError):
        return (
            f"stopped submitting: the API key was rejected ({explain(stop)}); {left}. Fix "
            f"APIMART_API_KEY or --api-key, then {rerun}; another key of the same account "
            "also needs --same-account"
        )
    return (
        f"stopped submitting: {describe(stop)}; {left}. Once the key may use these models, {rerun}"
    )


def _short(error: object) -> str:
    text = " ".join(str(error or "").split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _journaled_request(body: str) -> BaseImageRequest | None:
    """The request exactly as it was last sent (so a resubmit sends the same body)."""
    try:
        data: Any = json.loads(body)
        return parse_request(data, allow_unknown=True)
    except (ValueError, InvalidRequestError):
        return None


def _split_rate(rate: float | None, shard: Shard | None, *, fake: bool) -> float | None:
    """This shard's part of a total poll rate (see ``_shard``)."""
    if shard is None:
        return rate
    if rate is None:
        if fake:
            return None
        from apimart_async import Limits

        rate = Limits().poll_rate
    return rate / shard.count


def cmd_batch(args: argparse.Namespace, runtime: Runtime, ui: Ui) -> int:
    """``apimart batch JOBS.jsonl --out DIR``; see the module docstring."""
    shard: Shard | None = None
    if args.shard is not None:
        try:
            shard = parse_shard(args.shard)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    concurrency: int = args.concurrency if shard is None else shard.share(args.concurrency)
    settings = BatchSettings(
        jobs_path=Path(args.jobs),
        out=Path(args.out),
        concurrency=concurrency,
        strict=args.strict,
        resubmit_uncertain=args.resubmit_uncertain,
        allow_unknown=args.allow_unknown_models,
        shard=shard,
        batch_id=args.batch_id,
        rebuild=args.rebuild_journal,
        same_account=args.same_account,
        as_json=args.json,
        dry_run=args.dry_run,
        max_cost=args.max_cost,
        max_images=args.max_images,
        prices=tuple(args.price or ()),
        webhook_public_url=args.webhook_public_url,
        webhook_listen=args.webhook_listen,
    )
    options = ClientOptions.from_args(args)
    fake = bool(args.fake) or runtime.fake is not None
    rate = _split_rate(options.poll_rps, shard, fake=fake)
    if rate != options.poll_rps:
        from dataclasses import replace

        options = replace(options, poll_rps=rate)
    return run_batch(settings, options, runtime, ui, backend=args.backend).exit_code
