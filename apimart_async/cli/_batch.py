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
   reports every submit attempt just before it is sent: the ``submitting`` row is committed first; a task id is
   committed as soon as it arrives; other steps ride along with the next commit), and
   each completed task's images are downloaded as ``<id>_<n>.<ext>``;
5. ``results.jsonl`` gets one record per line (of this shard), and a summary is
   printed.

If a journal write fails (disk full, read-only filesystem), submitting stops at once,
and every task id already paid for that the journal may not hold (those of jobs still
in flight, and any that arrive while stopping) is printed on stderr and appended to a
recovery file (see ``_selfcheck``); the next run adopts them.

Exit status: 0 when every line is done, 1 when any is not, 2 for usage or
configuration errors (also a rejected API key), 3 when the folder's journal belongs to
another service or is damaged (nothing sent), 4 when a journal write failed mid-run,
128+N when stopped by signal N. A closed stdout or stderr changes none of this.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from apimart_async import (
    ApimartError,
    AuthenticationError,
    BadRequestError,
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
from apimart_async.types import CompletedEvent, FailedEvent, SubmittedEvent, SubmittingEvent

from ._jobfile import IdRegistry, JobLine, JobReader, LineError, LineRef
from ._journal import JobRecord, Journal, JournalError, JournalWriteError
from ._keys import canonical, derived_key, file_digest, random_key
from ._progress import BatchProgress, counts_table, problems_table
from ._selfcheck import (
    EXIT_JOURNAL_FAILED,
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
from ._setup import ClientOptions, UsageError, make_client
from ._shard import Shard, parse_shard, shard_folders
from ._signals import exit_status, interruptible

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator, Callable, Sequence

    from anyio.abc import TaskGroup

    from apimart_async import AsyncApimart, Event
    from apimart_async.models import BaseImageRequest
    from apimart_async.testing import FakeApimart

    from ._setup import Runtime
    from ._ui import Ui

__all__ = [
    "RESULTS_NAME",
    "SHARD_MANIFEST",
    "BatchResult",
    "BatchSettings",
    "cmd_batch",
    "describe",
    "run_batch",
]

SHARD_MANIFEST = "shard.json"
MAX_NOTES = 20
MAX_INVALID_NOTES = 50
MAX_PROBLEM_ROWS = 10
MAX_ERROR_CHARS = 200
FLUSH_EVERY = 0.5
"""Seconds between commits of the writes that can wait (completed, done, notes)."""
MAX_UNCOMMITTED = 2000
CHECKPOINT_EVERY = 256
"""Lines read between yields to the event loop (a run of skipped lines stays fair)."""
_FATAL = (AuthenticationError, PermissionDeniedError, InsufficientBalanceError)
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

    @property
    def folder(self) -> Path:
        """Where this run's journal, results and images go."""
        return self.out / self.shard.folder if self.shard is not None else self.out


@dataclass(slots=True)
class BatchResult:
    """How a run ended."""

    exit_code: int
    records: dict[str, JobRecord] = field(default_factory=dict[str, JobRecord])
    counts: Counter[str] = field(default_factory=Counter[str])
    fake: FakeApimart | None = None
    elapsed: float = 0.0
    images: int = 0


def describe(exc: BaseException) -> str:
    """An error as one line: its class and message."""
    text = " ".join(str(exc).split()) or "no details"
    return f"{type(exc).__name__}: {text}"


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
    run = _Run(settings, ui, runtime)
    client, fake = make_client(options, runtime)
    service = _service(options, fake, client)
    batch_id, lines = _prepare_file(settings)
    if settings.strict:
        _strict_check(settings, ui)
    _check_layout(settings)
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
            notes = check_results(journal, rebuild=rebuild)
            _record_run(journal, settings, batch_id)
        except (JournalError, sqlite3.Error) as exc:
            raise JournalRefused(f"cannot use the journal {journal.path}: {exc}") from None
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


def _service(options: ClientOptions, fake: FakeApimart | None, client: AsyncApimart) -> Service:
    if fake is not None:
        return Service("fake", fake.base_url.rstrip("/"), fake.api_key)
    key = options.api_key or os.environ.get("APIMART_API_KEY", "")
    return Service("api", str(client.base_url).rstrip("/"), key.strip())


def _prepare_file(settings: BatchSettings) -> tuple[str, int]:
    """The batch id and the newline count; ``UsageError`` if the file is unusable."""
    path = settings.jobs_path
    try:
        digest, newlines, content = file_digest(path)
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
    return settings.batch_id or digest, newlines + 1


def _strict_check(settings: BatchSettings, ui: Ui) -> None:
    """--strict: check every line (of this shard) before anything else; stop if any is bad."""
    db = sqlite3.connect("")  # a private temporary database: flat memory
    try:
        reader = JobReader(
            settings.jobs_path,
            IdRegistry(db),
            allow_unknown=settings.allow_unknown,
            wants=settings.shard.owns if settings.shard is not None else None,
        )
        bad = 0
        for item in reader:
            if isinstance(item, LineError):
                bad += 1
                ui.info(str(item))
    finally:
        db.close()
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
    counts: Counter[str]
    problems: list[tuple[int, str, str, str]]
    rows: int


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

    def __init__(self, settings: BatchSettings, ui: Ui, runtime: Runtime) -> None:
        self.settings = settings
        self.ui = ui
        self.runtime = runtime
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
        self.fatal_code = 1
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
                expect = canonical(json.loads(record.request_body))
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
        if active.expect is not None and canonical(json.loads(text)) != active.expect:
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
                        journal.completed(job.id, task.id, task.image_urls, task.expires_at)
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
        text = describe(error)
        if isinstance(error, JournalWriteError):
            pass  # the failure itself is reported once, by _journal_failed
        elif isinstance(error, SubmissionUncertainError):
            body = json.dumps(error.request, separators=(",", ":"), ensure_ascii=False)
            journal.uncertain(job.id, text, body)
        elif (active.task_id or active.resume) is not None and not isinstance(error, _TASK_GONE):
            # The task exists and may still complete (a timeout, an outage, a completion
            # without URLs): keep it "submitted" so the next run waits for it by id.
            journal.note_error(job.id, text)
        elif active.sent is not None or active.resume is not None:
            journal.failed(job.id, text, event.task_id)
        self._finished(job.line, job.id, ok=False, error=text)
        if isinstance(error, _FATAL):
            self.fatal_code = 2 if isinstance(error, AuthenticationError) else 1
            self._abort(f"stopping: {text}")

    def _journal_failed(
        self, exc: JournalWriteError, lost: Sequence[tuple[str, str, str]] = ()
    ) -> None:
        """A journal write failed: stop submitting, and save every task id at risk."""
        entries = list(lost)
        if self.failure is None:
            self.failure = exc
            self.fatal_code = EXIT_JOURNAL_FAILED
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
        async with client:
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
                )
                self.elapsed = progress.elapsed
                self.images = progress.images
                self.progress = None
        return stopped

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
        ) as outcomes:
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
            if self.fatal is not None:
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
            self._write(partial(journal.expired, job_id, text))
            self._finished(line, job_id, ok=False, error=text)
        except (ApimartError, OSError, ValueError) as exc:
            text = describe(exc)
            self._write(partial(journal.note_error, job_id, text))  # stays "completed"
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
        counts: Counter[str] = Counter()
        problems: list[tuple[int, str, str, str]] = []
        rows = 0
        if self.failure is not None:
            # What the journal holds since its last commit is not durable: results.jsonl
            # must not claim more than the journal will hold on the next run.
            self.ui.info(f"{path} not updated: the journal could not be written")
            return _Summary(counts, problems, rows)
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                for line, job_id, line_error, record in journal.lines():
                    status = (
                        "invalid"
                        if line_error is not None
                        else (record.state if record is not None else "pending")
                    )
                    error = (
                        line_error
                        if line_error is not None
                        else (record.error if record is not None and status != "done" else None)
                    )
                    row = {
                        "line": line,
                        "id": job_id,
                        "status": status,
                        "task_id": record.task_id if record is not None else None,
                        "files": list(record.files)
                        if record is not None and status == "done"
                        else [],
                        "error": error,
                    }
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    rows += 1
                    counts[status] += 1
                    if status != "done" and len(problems) <= MAX_PROBLEM_ROWS:
                        problems.append((line, job_id or "-", status, _short(error)))
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
            self._write_manifest(counts)
        return _Summary(counts, problems, rows)

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
        order = list(_MEANING)
        meaning = dict(_MEANING, done=f"images in {folder}")
        if self.settings.kind == "demo":
            meaning["failed"] = "failed on purpose (injected task failures)"
        table_rows = [
            (status, str(counts[status]), meaning.get(status, ""))
            for status in sorted(counts, key=lambda s: order.index(s) if s in order else 99)
        ]
        self.ui.show(counts_table(f"{self.settings.jobs_path.name} -> {folder}", table_rows))
        problems = summary.problems
        if problems:
            shown = problems[:MAX_PROBLEM_ROWS]
            more = summary.rows - counts["done"] - len(shown)
            self.ui.show(problems_table(shown, more=more))
        rate = self.images / self.elapsed if self.elapsed > 0 else 0.0
        self.ui.result(
            f"{self.images} images written in {self.elapsed:.1f}s ({rate:.1f} images/s); "
            f"results: {folder / RESULTS_NAME}"
        )
        if self.failure is not None:
            code = EXIT_JOURNAL_FAILED
        elif stopped is not None:
            self.ui.info(
                f"stopped. The journal is consistent: rerun the same command to resume "
                f"({self.journal.path})"
            )
            code = exit_status(stopped)
        elif self.fatal is not None:
            code = self.fatal_code
        else:
            code = 0 if counts["done"] == summary.rows else 1
        records: dict[str, JobRecord] = {}
        if summary.rows <= 10_000:  # for callers (the demo); a huge batch keeps memory flat
            for _, job_id, _, record in self.journal.lines():
                if job_id is not None and record is not None:
                    records[job_id] = record
        return BatchResult(code, records, counts, None, self.elapsed, self.images)


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
    )
    options = ClientOptions.from_args(args)
    fake = bool(args.fake) or runtime.fake is not None
    rate = _split_rate(options.poll_rps, shard, fake=fake)
    if rate != options.poll_rps:
        from dataclasses import replace

        options = replace(options, poll_rps=rate)
    return run_batch(settings, options, runtime, ui, backend=args.backend).exit_code
