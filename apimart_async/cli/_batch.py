"""``apimart batch``: a file of requests in, a folder of images out, resumable.

The run, in order:

1. every line of the batch file is parsed and validated (nothing is submitted yet); a
   bad line is reported by number and skipped, or stops the run under ``--strict``;
2. the journal (``DIR/journal.sqlite3``) decides what each job needs:

   ========================  ====================================================
   journal state             this run
   ========================  ====================================================
   (new) / pending           submit under the job's journaled idempotency key
   submitted                 wait for the recorded task id (never resubmitted)
   completed, or done with   download again (if the URLs have not expired)
   files missing
   done                      skip
   failed                    retry under a fresh key (a failed task is refunded)
   uncertain / submitting    leave alone; ``--resubmit-uncertain`` resends the
                             journaled body under the same key
   expired                   leave alone (the results are gone)
   ========================  ====================================================

3. ``generate_many`` runs the jobs; the journal records each step as it happens
   (``SubmittingEvent`` marks ``submitting`` just before a submit is sent, events mark
   ``submitted``/``completed``/``failed``/``uncertain``), and each completed task's
   images are downloaded as ``<id>_<n>.<ext>``;
4. ``DIR/results.jsonl`` gets one record per input line, and a summary is printed.

Exit status: 0 when every line is done, 1 when any is not, 2 for usage or
configuration errors (also a rejected API key), 128+N when stopped by signal N.
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

from ._jobfile import JobFile, JobLine, read_jobs
from ._journal import JobRecord, Journal, JournalError
from ._progress import BatchProgress, counts_table, problems_table
from ._setup import ClientOptions, UsageError, make_client
from ._signals import exit_status, interruptible

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator

    from anyio.abc import TaskGroup

    from apimart_async import AsyncApimart, Event
    from apimart_async.models import BaseImageRequest
    from apimart_async.testing import FakeApimart

    from ._setup import Runtime
    from ._ui import Ui

__all__ = ["RESULTS_NAME", "BatchResult", "BatchSettings", "cmd_batch", "describe", "run_batch"]

RESULTS_NAME = "results.jsonl"
MAX_NOTES = 20
MAX_PROBLEM_ROWS = 10
MAX_ERROR_CHARS = 200
_FATAL = (AuthenticationError, PermissionDeniedError, InsufficientBalanceError)
# Errors after which a recorded task will never complete: it ended, or the service does
# not know its id (a task query answers 400 for an unknown id).
_TASK_GONE = (TaskFailedError, TaskCancelledError, BadRequestError, NotFoundError)
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
    """Run ``apimart batch``; see the module docstring. Raises ``UsageError``."""
    run = _Run(settings, ui, runtime)
    client, fake = make_client(options, runtime)
    jobfile = _read(settings)
    _report_invalid(jobfile, ui, strict=settings.strict)
    try:
        journal = Journal.open(settings.out)
    except (JournalError, OSError) as exc:
        raise UsageError(str(exc)) from None
    with journal:
        if journal.meta("kind") is None:
            journal.set_meta("kind", settings.kind)
        run.plan(jobfile, journal)
        try:
            stopped = anyio.run(run.run, client, backend=backend)
        except KeyboardInterrupt:  # no signal handler could be installed
            stopped = signal.SIGINT
        results = run.write_results(jobfile)
        result = run.summarize(jobfile, results, stopped)
    result.fake = fake
    return result


def _read(settings: BatchSettings) -> JobFile:
    path = settings.jobs_path
    try:
        jobfile = read_jobs(path, allow_unknown=settings.allow_unknown)
    except FileNotFoundError:
        raise UsageError(f"batch file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the batch file {str(path)!r}: {exc}") from None
    if not jobfile.lines:
        raise UsageError(f"batch file {str(path)!r} has no jobs (every line is blank)")
    return jobfile


def _report_invalid(jobfile: JobFile, ui: Ui, *, strict: bool) -> None:
    for error in jobfile.errors:
        ui.info(("" if strict else "skipping ") + str(error))
    if strict and jobfile.errors:
        count = len(jobfile.errors)
        raise UsageError(
            f"{count} invalid line{'s' if count != 1 else ''} in {str(jobfile.path)!r}; "
            "nothing was submitted (--strict)"
        )


class _Run:
    """One batch run: the plan, the journal writes, the downloads, the report."""

    def __init__(self, settings: BatchSettings, ui: Ui, runtime: Runtime) -> None:
        self.settings = settings
        self.ui = ui
        self.runtime = runtime
        self.journal: Journal | None = None
        self.planned: list[JobLine] = []
        self.items: list[BaseImageRequest] = []
        self.resume: list[str | None] = []
        self.redownload: list[JobLine] = []
        self.by_key: dict[str, str] = {}
        self.skipped = 0
        self.left = 0
        self.fatal: str | None = None
        self.fatal_code = 1
        self.notes = 0
        self.progress: BatchProgress | None = None
        self.scope: anyio.CancelScope | None = None
        self.elapsed = 0.0
        self.images = 0

    # -- planning -------------------------------------------------------------------

    def plan(self, jobfile: JobFile, journal: Journal) -> None:
        """Decide what every job needs from its journal state (see the module docstring)."""
        self.journal = journal
        out = self.settings.out
        resumed = retried = resubmitted = new = 0
        unknown = [job for job in jobfile.jobs if journal.get(job.id) is None]
        journal.add([(job.id, job.line, job.fingerprint) for job in unknown])
        fresh = {job.id for job in unknown}
        for job in jobfile.jobs:
            record = journal[job.id]
            if job.id not in fresh:
                record = self._check_changed(journal, record, job)
            item: BaseImageRequest = job.request
            resume: str | None = None
            state = record.state
            if state == "done" and all((out / name).is_file() for name in record.files):
                self.skipped += 1
                continue
            if state in ("done", "completed"):
                self.redownload.append(job)
                continue
            if state == "submitting":  # the last run died while this submit was in flight
                record = journal.uncertain(
                    job.id, "the run stopped while this job's submit was in flight", None
                )
                state = record.state
            if state == "uncertain":
                if not self.settings.resubmit_uncertain:
                    self.left += 1
                    continue
                item = _journaled_request(record) or item
                resubmitted += 1
            elif state == "expired":
                self.left += 1
                continue
            elif state == "submitted":
                resume = record.task_id
                resumed += 1
            elif state == "failed":
                record = journal.retry(job.id)
                retried += 1
            else:
                new += 1
            self.planned.append(job)
            self.items.append(item)
            self.resume.append(resume)
            self.by_key[record.idempotency_key] = job.id
        earlier = self.skipped + len(self.redownload) + resumed + retried + resubmitted
        if earlier or self.left:
            parts = [
                f"{self.skipped} done earlier" if self.skipped else "",
                f"{resumed} resumed by task id" if resumed else "",
                f"{len(self.redownload)} to download again" if self.redownload else "",
                f"{retried} failed before (retrying)" if retried else "",
                f"{resubmitted} uncertain (resubmitting with the same key)" if resubmitted else "",
                f"{self.left} left alone (uncertain or expired)" if self.left else "",
                f"{new} new" if new else "",
            ]
            self.ui.info(f"resuming {journal.path}: " + ", ".join(p for p in parts if p))

    def _check_changed(self, journal: Journal, record: JobRecord, job: JobLine) -> JobRecord:
        if record.fingerprint == job.fingerprint or record.state in ("pending", "failed"):
            return journal.seen(job.id, line=job.line, fingerprint=job.fingerprint)
        self.ui.warn(
            f"line {job.line}: job {job.id!r} changed since it was submitted; keeping its "
            "recorded task (give the line a new id to run it again)"
        )
        return journal.seen(job.id, line=job.line, fingerprint=record.fingerprint)

    # -- journal writes (synchronous: each is committed before the next step) -------

    def on_submit(self, key: str, body: bytes) -> None:
        """A submit attempt under *key* is about to be sent (``SubmittingEvent``).

        Raising here (the journal cannot be written) stops the attempt: it is never
        sent, so no submit is in flight without the journal knowing.
        """
        job_id = self.by_key.get(key)
        if job_id is not None and self.journal is not None:
            self.journal.submitting(job_id, body.decode("utf-8"))

    def on_event(self, event: Event) -> None:
        """Record what the client reports, then update the display."""
        if isinstance(event, SubmittingEvent):
            self.on_submit(event.idempotency_key, event.body)
            return
        index = event.job
        if index is not None and 0 <= index < len(self.planned) and self.journal is not None:
            job = self.planned[index]
            try:
                if isinstance(event, SubmittedEvent):
                    self.journal.submitted(job.id, event.task_id)
                elif isinstance(event, CompletedEvent):
                    task = event.task
                    self.journal.completed(job.id, task.id, task.image_urls, task.expires_at)
                elif isinstance(event, FailedEvent):
                    self._failed(job, event)
            except sqlite3.Error as exc:
                lost = f" (task {event.task_id})" if isinstance(event, SubmittedEvent) else ""
                self._abort(f"cannot write the journal{lost}: {exc}")
        if self.runtime.on_event is not None:
            self.runtime.on_event(event)

    def _failed(self, job: JobLine, event: FailedEvent) -> None:
        assert self.journal is not None
        error = event.error
        text = describe(error)
        record = self.journal[job.id]
        if isinstance(error, SubmissionUncertainError):
            body = json.dumps(error.request, separators=(",", ":"), ensure_ascii=False)
            self.journal.uncertain(job.id, text, body)
        elif record.task_id is not None and not isinstance(error, _TASK_GONE):
            # The task exists and may still complete (a timeout, an outage): keep it
            # "submitted" so the next run waits for it instead of paying again.
            self.journal.note_error(job.id, text)
        else:
            self.journal.failed(job.id, text, event.task_id)
        self._finished(job, ok=False, error=text)
        if isinstance(error, _FATAL):
            self.fatal_code = 2 if isinstance(error, AuthenticationError) else 1
            self._abort(f"stopping: {text}")

    def _abort(self, message: str) -> None:
        if self.fatal is None:
            self.fatal = message
            self._note(message)
            if self.scope is not None:
                self.scope.cancel()

    def _finished(self, job: JobLine, *, ok: bool, images: int = 0, error: str = "") -> None:
        if self.progress is not None:
            self.progress.finished(ok=ok, images=images)
        if not ok:
            self.notes += 1
            if self.notes <= MAX_NOTES:
                self._note(f"line {job.line} ({job.id}): {error}")
            elif self.notes == MAX_NOTES + 1:
                self._note("further problems are listed at the end")

    def _note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.note(text)
        else:
            self.ui.info(text)

    # -- running --------------------------------------------------------------------

    async def run(self, client: AsyncApimart) -> int | None:
        """Run the plan; return the signal number that stopped it, if one did."""
        assert self.journal is not None
        total = len(self.planned) + len(self.redownload) + self.skipped + self.left
        title = self.settings.title or self.settings.jobs_path.name
        async with client:
            with BatchProgress(
                self.ui,
                title=title,
                total=total,
                done=self.skipped,
                failed=self.left,
                limit=self.settings.concurrency + len(self.redownload),
            ) as progress:
                self.progress = progress
                stopped = await interruptible(
                    partial(self._work, client),
                    on_stop=self._on_stop,
                    on_abort=lambda _: progress.close(),
                )
                self.elapsed = progress.elapsed
                self.images = progress.images
        return stopped

    def _on_stop(self, signum: int) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self._note(
            f"{name}: stopping; submits already sent may answer first, so their task ids "
            "are recorded (press Ctrl-C again to quit at once)"
        )

    async def _work(self, client: AsyncApimart) -> None:
        self.scope = anyio.CancelScope()
        with self.scope:
            async with anyio.create_task_group() as ticker:
                ticker.start_soon(self._tick)
                async with anyio.create_task_group() as tg:
                    for job in self.redownload:
                        tg.start_soon(self._redownload, client, job)
                    if self.planned:
                        await self._pipeline(client, tg)
                ticker.cancel_scope.cancel()

    async def _tick(self) -> None:
        while True:
            await anyio.sleep(1.0)
            if self.progress is not None:
                self.progress.tick()

    async def _pipeline(self, client: AsyncApimart, tg: TaskGroup) -> None:
        assert self.journal is not None
        journal = self.journal

        def key_of(index: int, _: object) -> str:
            return journal[self.planned[index].id].idempotency_key

        async with client.generate_many(
            self._feed(),
            concurrency=self.settings.concurrency,
            on_event=self.on_event,
            allow_unknown=self.settings.allow_unknown,
            idempotency_keys=key_of,
            known_tasks=lambda index, _: self.resume[index],
        ) as outcomes:
            async for outcome in outcomes:
                if outcome.error is None and outcome.task is not None:
                    tg.start_soon(self._download, client, self.planned[outcome.index], outcome.task)

    def _feed(self) -> Iterator[BaseImageRequest]:
        for item in self.items:
            if self.progress is not None:
                self.progress.started()
            yield item

    async def _redownload(self, client: AsyncApimart, job: JobLine) -> None:
        assert self.journal is not None
        record = self.journal[job.id]
        if self.progress is not None:
            self.progress.started()
        task = Task(
            id=record.task_id or "",
            status=TaskStatus.COMPLETED,
            image_urls=record.image_urls,
            expires_at=record.expires_at,
        )
        await self._download(client, job, task)

    async def _download(self, client: AsyncApimart, job: JobLine, task: Task) -> None:
        journal = self.journal
        assert journal is not None
        names = [f"{job.id}_{i}" for i in range(len(task.image_urls))]
        try:
            paths = await client.download(task, self.settings.out, names=names)
        except ResultExpiredError as exc:
            text = describe(exc)
            self._write(partial(journal.expired, job.id, text))
            self._finished(job, ok=False, error=text)
        except (ApimartError, OSError, ValueError) as exc:
            text = describe(exc)
            self._write(partial(journal.note_error, job.id, text))  # stays "completed"
            self._finished(job, ok=False, error=text)
        else:
            self._write(partial(journal.done, job.id, [p.name for p in paths]))
            self._finished(job, ok=True, images=len(paths))

    def _write(self, write: Callable[[], object]) -> None:
        """A journal write; if the journal cannot be written, stop the run."""
        try:
            write()
        except sqlite3.Error as exc:
            self._abort(f"cannot write the journal: {exc}")

    # -- reporting ------------------------------------------------------------------

    def write_results(self, jobfile: JobFile) -> list[dict[str, Any]]:
        """Write ``DIR/results.jsonl`` (one record per input line, atomically)."""
        assert self.journal is not None
        rows: list[dict[str, Any]] = []
        for job in jobfile.jobs:
            record = self.journal[job.id]
            rows.append(
                {
                    "line": job.line,
                    "id": job.id,
                    "status": record.state,
                    "task_id": record.task_id,
                    "files": list(record.files) if record.state == "done" else [],
                    "error": None if record.state == "done" else record.error,
                }
            )
        for error in jobfile.errors:
            rows.append(
                {
                    "line": error.line,
                    "id": error.id,
                    "status": "invalid",
                    "task_id": None,
                    "files": [],
                    "error": error.message,
                }
            )
        rows.sort(key=lambda r: int(r["line"]))
        path = self.settings.out / RESULTS_NAME
        tmp = path.with_name(f".{RESULTS_NAME}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
        return rows

    def summarize(
        self, jobfile: JobFile, rows: list[dict[str, Any]], stopped: int | None
    ) -> BatchResult:
        """Print the summary; return the result with its exit status."""
        assert self.journal is not None
        counts = Counter(str(r["status"]) for r in rows)
        out = self.settings.out
        order = list(_MEANING)
        meaning = dict(_MEANING, done=f"images in {out}")
        if self.settings.kind == "demo":
            meaning["failed"] = "failed on purpose (injected task failures)"
        table_rows = [
            (status, str(counts[status]), meaning.get(status, ""))
            for status in sorted(counts, key=lambda s: order.index(s) if s in order else 99)
        ]
        self.ui.show(counts_table(f"{jobfile.path.name} -> {out}", table_rows))
        problems = [r for r in rows if r["status"] != "done"]
        if problems:
            shown = [
                (int(r["line"]), str(r["id"] or "-"), str(r["status"]), _short(r["error"]))
                for r in problems[:MAX_PROBLEM_ROWS]
            ]
            self.ui.show(problems_table(shown, more=len(problems) - len(shown)))
        rate = self.images / self.elapsed if self.elapsed > 0 else 0.0
        self.ui.result(
            f"{self.images} images written in {self.elapsed:.1f}s ({rate:.1f} images/s); "
            f"results: {out / RESULTS_NAME}"
        )
        if stopped is not None:
            self.ui.info(
                f"stopped. The journal is consistent: rerun the same command to resume "
                f"({self.journal.path})"
            )
            code = exit_status(stopped)
        elif self.fatal is not None:
            code = self.fatal_code
        else:
            code = 0 if counts["done"] == len(rows) else 1
        records = {job.id: self.journal[job.id] for job in jobfile.jobs}
        return BatchResult(code, records, counts, None, self.elapsed, self.images)


def _short(error: object) -> str:
    text = " ".join(str(error or "").split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _journaled_request(record: JobRecord) -> BaseImageRequest | None:
    """The request exactly as it was last sent (so a resubmit sends the same body)."""
    if record.request_body is None:
        return None
    try:
        data: Any = json.loads(record.request_body)
        return parse_request(data, allow_unknown=True)
    except (ValueError, InvalidRequestError):
        return None


def cmd_batch(args: argparse.Namespace, runtime: Runtime, ui: Ui) -> int:
    """``apimart batch JOBS.jsonl --out DIR``; see the module docstring."""
    settings = BatchSettings(
        jobs_path=Path(args.jobs),
        out=Path(args.out),
        concurrency=args.concurrency,
        strict=args.strict,
        resubmit_uncertain=args.resubmit_uncertain,
        allow_unknown=args.allow_unknown_models,
    )
    options = ClientOptions.from_args(args)
    return run_batch(settings, options, runtime, ui, backend=args.backend).exit_code
