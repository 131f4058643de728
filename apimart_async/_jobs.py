"""The job engine: one job record, the stages every driver runs, one deadline path.

A job is one upload → submit → poll → settle pipeline. ``Job`` is everything it knows
(its request, key, deadline, the task once it exists, its poll schedule, timings);
``Resources`` is everything it shares with other jobs of the same client (the HTTP
core, retriers, stage limits, the poll budget, the upload cache, the submit keeper).
The stages are plain functions over the two:

* ``submit``: upload local reference images, take a submit slot, submit (before the
  job's deadline; the paid request itself runs in the submit keeper, out of reach of
  the caller's cancellation and of the deadline: a live submit is never cut short);
* ``poll_once``: one task query (budgeted), the delay until the next, or None once the
  task is terminal;
* ``settle``: a terminal task becomes the result or the error;
* ``wait``: poll until settled, under the job's deadline;
* ``fail``: report a job's failure (the event, the log line) keeping its task.

``AsyncApimart.generate`` is ``submit`` + ``wait``; ``generate_many``
(``_pipeline``) schedules the same stages across many jobs without a task per job.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import re
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import anyio

from . import _config
from ._clock import now
from ._events import emit
from ._exceptions import (
    ApimartError,
    APIResponseValidationError,
    APITimeoutError,
    ResultMissingError,
    SubmissionUncertainError,
    TaskCancelledError,
    TaskError,
    TaskFailedError,
    TaskTimeoutError,
)
from ._parsing import parse_submit, parse_task, parse_upload
from ._polling import PollSchedule, RateLimiter
from ._retry import Retrier, is_ambiguous, is_transient, submit_retryable
from ._runtime import all_or_first_error
from ._submits import Flight, SubmitKeeper
from ._transport import request_deadline
from ._uploads import UploadCache, multipart_body, multipart_parts, prepare_image
from .types import (
    CompletedEvent,
    FailedEvent,
    ProgressEvent,
    SubmittedEvent,
    SubmittingEvent,
    Task,
    TaskStatus,
    UploadedEvent,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    import httpx

    from ._config import Limits, PollPolicy, RetryPolicy
    from ._events import EventHandler
    from ._http import HttpCore
    from ._pushes import PushRouter
    from ._uploads import PreparedImage
    from .models import BaseImageRequest
    from .types import UploadedImage

__all__ = [
    "Gate",
    "Job",
    "Resources",
    "checked_task_id",
    "close_span",
    "fail",
    "open_span",
    "poll_once",
    "query",
    "settle",
    "submit",
    "task_path",
    "upload",
    "wait",
]

logger = logging.getLogger("apimart_async.jobs")

UPLOAD_PATH = "/v1/uploads/images"
SUBMIT_PATH = "/v1/images/generations"
# Task ids that escape to themselves (quote() keeps these; dots are escaped apart).
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]+").fullmatch
# How often a task reported completed without any result URL is queried again before
# it is reported as ``ResultMissingError`` (the service may fill the URLs in late).
RESULT_REQUERIES = 3


class Resources:
    """What every job of one client shares; built once per client by ``build``."""

    __slots__ = (
        "call_bound",
        "download_slots",
        "download_timeout",
        "http",
        "keeper",
        "max_download",
        "poll_budget",
        "poll_policy",
        "poll_slots",
        "retry_download",
        "retry_query",
        "retry_submit",
        "retry_upload",
        "rng",
        "submit_slots",
        "telemetry",
        "upload_slots",
        "uploads",
    )

    def __init__(
        self,
        http: HttpCore,
        *,
        limits: Limits,
        retry: RetryPolicy,
        poll: PollPolicy,
        submit_shield: float,
        retry_uncertain_submits: bool,
        download_timeout: httpx.Timeout,
        max_download: int,
    ) -> None:
        self.http = http
        telemetry = self.telemetry = http.telemetry
        self.retry_query = Retrier(retry, is_transient, "task query", telemetry)
        self.retry_upload = Retrier(retry, is_transient, "image upload", telemetry)
        self.retry_download = Retrier(retry, is_transient, "result download", telemetry)
        paid = submit_retryable(retry_uncertain=retry_uncertain_submits)
        self.retry_submit = Retrier(retry, paid, "submit", telemetry)
        # Semaphores with fast_acquire rather than CapacityLimiters: a free slot is
        # taken without a trip through the event loop. Every holder awaits I/O.
        self.upload_slots = anyio.Semaphore(limits.uploads, fast_acquire=True)
        self.submit_slots = anyio.Semaphore(limits.submits, fast_acquire=True)
        self.download_slots = anyio.Semaphore(limits.downloads, fast_acquire=True)
        self.poll_slots = anyio.Semaphore(limits.polls_in_flight, fast_acquire=True)
        self.poll_budget = RateLimiter(limits.poll_rate, limits.poll_burst)
        self.uploads = UploadCache(_config.UPLOAD_REUSE_MARGIN)
        self.poll_policy = poll
        self.rng = random.Random()
        self.keeper = SubmitKeeper(submit_shield)
        self.download_timeout = download_timeout
        self.max_download = max_download
        # The longest one task query can take, retries included (inf: unbounded):
        # stamina stops retrying after RetryPolicy.timeout, then one more attempt may run.
        request = request_deadline(http.timeout)
        self.call_bound = math.inf if retry.timeout is None else retry.timeout + request


class Gate(Protocol):
    """A batch's say on each submit (``generate_many``: budgets, a 402/401 stop)."""

    def admit_now(self, job: Job) -> bool:
        """Admit the job at once if nothing needs waiting (True), or raise to refuse it;
        False: call ``admit`` (which may wait)."""
        ...

    async def admit(self, job: Job) -> None:
        """Before the job takes a submit slot: may wait, or raise to refuse it."""
        ...

    def check(self, job: Job) -> None:
        """Right before the submit is sent (slot held): raise if submitting stopped."""
        ...


class Job:
    """One pipeline's state, from its request to its settled outcome.

    *index* is its position in a ``generate_many`` input (None for a single call);
    *item* is the input as the caller gave it (for its ``Outcome``). *timeout* is the
    whole job's deadline in seconds, kept for the error message.
    """

    __slots__ = (
        "deadline",
        "fresh",
        "gate",
        "index",
        "item",
        "key",
        "model",
        "on_event",
        "polls",
        "pushed",
        "pushes",
        "queued",
        "requeries",
        "request",
        "schedule",
        "span",
        "started",
        "task",
        "timeout",
        "timings",
        "version",
        "waiting_since",
    )

    def __init__(
        self,
        *,
        key: str,
        timeout: float | None,
        on_event: EventHandler | None,
        request: BaseImageRequest | None = None,
        task: Task | None = None,
        index: int | None = None,
        item: Any = None,
        fresh: bool | None = None,
    ) -> None:
        self.started = self.waiting_since = now()
        self.deadline = math.inf if timeout is None else self.started + timeout
        self.timeout = timeout
        self.key = key
        self.on_event = on_event
        self.request = request
        self.index = index
        self.item = item
        self.task = task
        # A task from a submit is polled after a first delay; one resumed by id at once.
        self.fresh = task is None if fresh is None else fresh
        self.schedule: PollSchedule | None = None
        self.timings: dict[str, float] = {}
        self.requeries = 0
        self.polls = 0
        self.gate: Gate | None = None  # a batch's say on whether this job may submit
        self.pushes: PushRouter | None = None  # where its result is pushed, if it is
        self.pushed: Task | None = None  # a pushed result not yet taken
        self.queued = False  # generate_many: waiting in the scheduler's heap
        self.version = 0  # generate_many: which heap entry of this job is current
        self.model = request.model if request is not None else None
        self.span: object = None  # the pipeline span while telemetry has one open

    def begin_waiting(self, res: Resources) -> float:
        """Start the poll schedule; return the delay before the first query."""
        self.waiting_since = now()
        pushes = self.pushes is not None
        schedule = self.schedule = PollSchedule(
            res.poll_policy, self.waiting_since, res.rng, pushes=pushes
        )
        task = self.task
        assert task is not None
        if task.status.is_terminal or self.pushed is not None:
            return 0.0  # a synchronous result, or pushed already: settled by the first look
        return schedule.first_delay(task.estimated_time) if self.fresh else 0.0

    def timed_out(self) -> TaskTimeoutError:
        """The error for a deadline that passed while the task was still running."""
        task = self.task
        assert task is not None
        self.timings["wait"] = now() - self.waiting_since
        return TaskTimeoutError(task_id=task.id, task=task, timeout=self.timeout)


# -- telemetry ---------------------------------------------------------------------------

_NO_STAGE = contextlib.nullcontext()


def open_span(res: Resources, job: Job, name: str) -> None:
    """Open the job's pipeline span (with telemetry on); ``close_span`` ends it."""
    telemetry = res.telemetry
    if telemetry is not None:
        job.span = telemetry.start_job(name, job.model, index=job.index)


def close_span(res: Resources, job: Job, error: BaseException | str | None = None) -> None:
    """End the job's pipeline span and record its metrics, once."""
    telemetry = res.telemetry
    if telemetry is None or job.span is None:
        return
    span, job.span = job.span, None
    telemetry.end_job(
        span,
        model=job.model,
        task=job.task,
        polls=job.polls,
        seconds=now() - job.started,
        error=error,
    )


def _stage(res: Resources, job: Job, name: str) -> contextlib.AbstractContextManager[Any]:
    telemetry = res.telemetry
    if telemetry is None:
        return _NO_STAGE
    return telemetry.stage(job.span, name)


# -- uploading ---------------------------------------------------------------------------


async def upload(
    res: Resources, image: PreparedImage, *, cache: bool = True
) -> tuple[UploadedImage, bool]:
    """Upload a checked image (once per content, with *cache*); (image, from cache)."""
    if not cache:
        return await _send_upload(res, image), False
    return await res.uploads.get_or_upload(
        image.sha256, functools.partial(_send_upload, res, image)
    )


async def _send_upload(res: Resources, image: PreparedImage) -> UploadedImage:
    if not _take(res.upload_slots):
        await res.upload_slots.acquire()
    try:
        body = await res.retry_upload(_upload_attempt, res, image)
    finally:
        res.upload_slots.release()
    return parse_upload(body, sha256=image.sha256)


async def _upload_attempt(res: Resources, image: PreparedImage) -> Any:
    content_type, preamble, epilogue = multipart_parts(image)
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(preamble) + image.size + len(epilogue)),
    }
    # A file on disk is streamed afresh for every attempt (a stream cannot be replayed).
    body = (
        preamble + image.data + epilogue
        if image.data is not None
        else multipart_body(image, preamble, epilogue)
    )
    return await res.http.request_json(
        "POST", UPLOAD_PATH, body, headers, _config.DEFAULT_UPLOAD_TIMEOUT
    )


async def _upload_references(
    res: Resources, job: Job, local: list[tuple[int, Path | bytes]]
) -> None:
    """Upload the request's *local* images and put their URLs in their place."""
    request = job.request
    assert request is not None
    t0 = now()
    entries = [u if isinstance(u, str) else "" for u in (request.image_urls or ())]
    # Every image is checked before any is uploaded: one bad file costs no upload.
    prepared = [(position, await prepare_image(source)) for position, source in local]
    if len(prepared) == 1:  # the common case: no task group
        position, image = prepared[0]
        entries[position] = await _upload_reference(res, job, image)
    else:

        async def one(position: int, image: PreparedImage) -> None:
            entries[position] = await _upload_reference(res, job, image)

        await all_or_first_error([functools.partial(one, p, i) for p, i in prepared])
    job.timings["upload"] = now() - t0
    job.request = request._with_uploaded(entries)  # pyright: ignore[reportPrivateUsage]


async def _upload_reference(res: Resources, job: Job, image: PreparedImage) -> str:
    uploaded, cached = await upload(res, image)
    if job.on_event is not None:
        await emit(job.on_event, UploadedEvent(uploaded, now() - job.started, job.index, cached))
    return uploaded.url


# -- submitting --------------------------------------------------------------------------


async def submit(res: Resources, job: Job) -> Task:
    """Upload the request's local images, take a submit slot, create the job's task.

    Uploading, the batch's admission (``Gate``) and the wait for a submit slot are
    bounded by the job's deadline: one passing there is an ``APITimeoutError`` (an
    upload may have been sent; a submit never was). The paid request then runs in the
    client's submit keeper: cancelling the caller ends this wait at once, while the
    request is heard out (and reported) there; the deadline does not cut it either.
    """
    request = job.request
    assert request is not None
    gate = job.gate
    local = request.local_images()
    uploads = bool(local)
    admitted = gate is None
    if gate is not None and not uploads:
        admitted = gate.admit_now(job)
    # The common case needs no cancel scope: nothing to upload, admitted at once, a
    # free slot. Otherwise the waiting happens under the job's deadline.
    if uploads or not admitted or not _take(res.submit_slots):
        await _prepare_submit(res, job, local, admitted=admitted)
    request = job.request
    assert request is not None
    try:
        body = request.to_body()
        if gate is not None:
            gate.check(job)  # the last word: submitting may have stopped meanwhile
    except BaseException:
        res.submit_slots.release()
        raise
    # Serialised once: every attempt sends byte-identical JSON under the same key.
    content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    job.request = None  # hold nothing the wait does not need
    flight = Flight(
        job.key,
        body,
        on_event=job.on_event,
        job=job.index,
        started=job.started,
        release=res.submit_slots.release,  # the flight owns the slot from here
    )
    t0 = now()
    send: Callable[[Flight], Awaitable[Task]] = functools.partial(_send_submit, res, content)
    with _stage(res, job, "apimart.submit"):
        if res.telemetry is not None:
            send = res.telemetry.bind(send)
        task = job.task = await res.keeper.run(flight, send)
    job.timings["submit"] = now() - t0
    if job.on_event is not None:
        with anyio.CancelScope(shield=True):
            await emit(job.on_event, SubmittedEvent(task.id, now() - job.started, job.index))
    return task


async def _prepare_submit(
    res: Resources, job: Job, local: list[tuple[int, Path | bytes]], *, admitted: bool
) -> None:
    """The slow path of ``submit``: uploads (*local*: the request's local images),
    admission and a slot, under the deadline."""
    gate = job.gate
    stage, path, sent = "uploading images", UPLOAD_PATH, True
    with anyio.CancelScope(deadline=job.deadline) as scope:
        if local:
            with _stage(res, job, "apimart.upload"):
                await _upload_references(res, job, local)
        stage, path, sent = "waiting to submit", SUBMIT_PATH, False
        if gate is not None and not admitted:
            await gate.admit(job)
        await res.submit_slots.acquire()
    if scope.cancelled_caught:
        raise _deadline_passed(res, job, stage, path, sent=sent)


def _take(slots: anyio.Semaphore) -> bool:
    """Take a free slot without waiting (no cancel scope needed then)."""
    try:
        slots.acquire_nowait()
    except anyio.WouldBlock:
        return False
    return True


def _deadline_passed(
    res: Resources, job: Job, stage: str, path: str, *, sent: bool
) -> APITimeoutError:
    return APITimeoutError(
        f"the pipeline deadline ({job.timeout:g}s) passed while {stage}",
        method="POST",
        url=res.http.url(path),
        sent=sent,
    )


class _CallerGone(Exception):
    """A submit whose caller left before its next attempt: that attempt is not made."""


async def _send_submit(res: Resources, content: bytes, flight: Flight) -> Task:
    """Every attempt of one submit, in the keeper; a definite task or a typed error."""
    try:
        subject = f"idempotency key {flight.key}"
        data = await res.retry_submit(_submit_attempt, res, content, flight, subject=subject)
    except (ApimartError, _CallerGone) as exc:
        # Uncertainty sticks: once an attempt may have created a task, a later attempt
        # that provably did nothing (or was never made) proves nothing about it.
        if not (flight.maybe_created or isinstance(exc, ApimartError) and is_ambiguous(exc)):
            raise
        raise _uncertain(res, flight, str(exc) or "its caller left before the retry") from exc
    try:
        task_id, status, raw = parse_submit(data)
    except APIResponseValidationError as exc:
        # The service answered 2xx: it acted, but we cannot tell on which task.
        raise _uncertain(res, flight, str(exc)) from exc
    if res.telemetry is not None:
        res.telemetry.submitted(certain=True)
    if raw.get("object") == "generation.result":
        # A synchronous result (§3.3 D): the task is already finished.
        return parse_task({"data": {**raw, "id": task_id}})
    return Task(id=task_id, status=status, raw=raw)


async def _submit_attempt(res: Resources, content: bytes, flight: Flight) -> Any:
    if flight.abandoned:
        raise _CallerGone  # nobody would hear of a task made now
    if flight.on_event is not None:
        # The journal's hook: if it raises, this attempt is never sent.
        await emit(flight.on_event, SubmittingEvent(flight.key, content, flight.job))
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": flight.key,
        "X-APIMart-Response-Version": _config.RESPONSE_VERSION,
    }
    try:
        return await res.http.request_json("POST", SUBMIT_PATH, content, headers)
    except ApimartError as exc:
        if is_ambiguous(exc):
            flight.maybe_created = True
        raise


def _uncertain(res: Resources, flight: Flight, reason: str) -> SubmissionUncertainError:
    if res.telemetry is not None:
        res.telemetry.submitted(certain=False)
    logger.warning(
        "submit outcome unknown (%s): a task may exist; resubmit only with idempotency key %s",
        reason,
        flight.key,
        extra={"apimart.idempotency_key": flight.key},
    )
    return SubmissionUncertainError(idempotency_key=flight.key, request=flight.body, reason=reason)


# -- waiting ---------------------------------------------------------------------------


def checked_task_id(task_id: str) -> str:
    """*task_id* stripped; ``ValueError`` if it is not a non-empty string."""
    # Checked at run time too: ids often come from untyped JSON or user input.
    if not isinstance(task_id, str) or not task_id.strip():  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"task_id must be a non-empty string, got {task_id!r}")
    return task_id.strip()


def task_path(task_id: str) -> str:
    """The query path of *task_id*; ids are opaque, so everything is escaped."""
    checked = checked_task_id(task_id)
    if _PLAIN_ID(checked):  # the service's own ids: nothing to escape
        return "/v1/tasks/" + checked
    # Dots too, so "../x" stays one segment.
    return "/v1/tasks/" + quote(checked, safe="").replace(".", "%2E")


async def query(res: Resources, task_id: str) -> Task:
    """One task query, budgeted and retried (every attempt draws from the budget)."""
    return await res.retry_query(_query_attempt, res, task_path(task_id), subject=f"task {task_id}")


async def _query_attempt(res: Resources, path: str) -> Task:
    await res.poll_budget.acquire()
    if not _take(res.poll_slots):
        await res.poll_slots.acquire()
    try:
        return parse_task(await res.http.request_json("GET", path))
    finally:
        res.poll_slots.release()


async def poll_once(res: Resources, job: Job) -> float | None:
    """One query of a waiting job: the delay until the next, or None once terminal.

    A transient failure that outlived its retries is not an error here: the task is
    still there, so the next query is merely scheduled. A task reported completed
    without a result URL is asked about again a few times before it settles.
    """
    schedule = job.schedule
    last = job.task
    assert schedule is not None and last is not None
    if job.pushed is not None:  # the service pushed it: that is the result, no query
        current, job.pushed = job.pushed, None
    else:
        job.polls += 1
        try:
            with _stage(res, job, "apimart.poll"):
                current = await query(res, last.id)
        except ApimartError as exc:
            if not is_transient(exc):
                raise
            return schedule.next_delay(last, now())
    job.task = current
    if job.on_event is not None:
        elapsed = now() - job.waiting_since
        event = ProgressEvent(current.id, current.status, current.progress, elapsed, job.index)
        await emit(job.on_event, event)
    status = current.status
    if not status.is_terminal:
        return schedule.next_delay(current, now())
    if (
        status is TaskStatus.COMPLETED
        and not current.image_urls
        and job.requeries < RESULT_REQUERIES
    ):
        job.requeries += 1
        return schedule.requery_delay()
    return None


async def settle(job: Job) -> Task:
    """A terminal task becomes the result (completed) or its ``TaskError``."""
    task = job.task
    assert task is not None
    elapsed = now() - job.waiting_since
    job.timings["wait"] = elapsed
    if task.status is TaskStatus.COMPLETED and task.image_urls:
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "task %s completed after %.1fs (%d images)",
                task.id,
                now() - job.started,
                len(task.image_urls),
                extra={"apimart.task_id": task.id},
            )
        if job.on_event is not None:
            await emit(job.on_event, CompletedEvent(task, elapsed, job.index))
        return task
    if task.status is TaskStatus.COMPLETED:
        raise ResultMissingError(task_id=task.id, task=task, queries=job.requeries + 1)
    if task.status is TaskStatus.CANCELLED:
        raise TaskCancelledError(task_id=task.id, task=task)
    error = task.error
    raise TaskFailedError(
        task_id=task.id,
        task=task,
        reason=error.message if error else "the service gave no reason",
        code=error.code if error else None,
    )


async def wait(res: Resources, job: Job) -> Task:
    """Poll the job's task until it settles, or raise ``TaskTimeoutError`` at its deadline.

    With a push router, a pushed result ends any wait at once.
    """
    wake = None
    if job.pushes is not None:
        wake = anyio.Event()
        listen(job, wake.set)
    try:
        with anyio.CancelScope(deadline=job.deadline):
            delay: float | None = job.begin_waiting(res)
            while delay is not None:
                if delay > 0 and job.pushed is None:
                    if wake is None:
                        await anyio.sleep(delay)
                    else:
                        with anyio.move_on_after(delay):
                            await wake.wait()
                delay = await poll_once(res, job)
            return await settle(job)
        raise job.timed_out()
    finally:
        unlisten(job)


def listen(job: Job, notify: Callable[[], None]) -> None:
    """Take the job's pushed result when it comes (or now, if it came first)."""
    router, task = job.pushes, job.task
    assert router is not None and task is not None

    def on_push(pushed: Task) -> None:
        job.pushed = pushed
        notify()

    early = router.expect(task.id, on_push)
    if early is not None:
        job.pushed = early


def unlisten(job: Job) -> None:
    """The job no longer waits for a push."""
    if job.pushes is not None and job.task is not None:
        job.pushes.forget(job.task.id)


async def fail(job: Job, error: Exception) -> Task | None:
    """Report the job's failure: a log line and a ``FailedEvent``; return its task, if any.

    The task is the error's own (a failed or timed-out task) or else the last one seen.
    Shielded: a cancelled caller must still hear of an uncertain submit.
    """
    task = error.task if isinstance(error, TaskError) and error.task else job.task
    task_id = task.id if task is not None else None
    if isinstance(error, ApimartError) and logger.isEnabledFor(logging.INFO):
        logger.info(
            "job%s failed after %.1fs%s: %s",
            "" if job.index is None else f" {job.index}",
            now() - job.started,
            f" (task {task_id})" if task_id else "",
            f"{type(error).__name__}: {error}",
            extra={"apimart.task_id": task_id},
        )
    if job.on_event is not None:
        event = FailedEvent(error, task_id, now() - job.started, job.index)
        with anyio.CancelScope(shield=True):
            try:
                await emit(job.on_event, event)
            except Exception:  # the job's own error wins
                logger.warning("on_event raised on the FailedEvent of %s", job, exc_info=True)
    return task


def abandon(res: Resources, job: Job, why: str) -> None:
    """Its caller will not hear of the job's task (*why*): the client keeps it."""
    if job.task is not None:
        res.keeper.adopt(job.task, job.key, why)
