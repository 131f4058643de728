"""``AsyncApimart``: one client, one connection pool, limits that hold across every call.

The client composes the single-concern modules: ``_http`` (sending, errors, retries),
``_uploads`` (image sources, dedup), ``_polling`` (when to ask again), ``_download``
(results to disk) and ``_pipeline`` (many jobs at once). It reads top to bottom as
upload → submit → get_task → wait → generate → download → generate_many.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import random
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import anyio
import httpx

from . import _config
from ._clock import now
from ._config import Limits, PollPolicy, RetryPolicy
from ._download import download_images
from ._events import EventHandler, checked_key, emit, report_failure
from ._exceptions import (
    ApimartError,
    APIResponseValidationError,
    APITimeoutError,
    SubmissionUncertainError,
    TaskCancelledError,
    TaskFailedError,
    TaskTimeoutError,
)
from ._http import HttpCore, idempotent_hook, is_ambiguous, is_transient, submit_hook
from ._parsing import parse_submit, parse_task, parse_upload
from ._pipeline import JobState, Pipeline
from ._polling import PollSchedule, RateLimiter
from ._transports import default_transport
from ._uploads import UploadCache, multipart_body, multipart_parts, prepare_image
from ._version import __version__
from .models import BaseImageRequest, parse_request
from .types import (
    CompletedEvent,
    DownloadedEvent,
    Event,
    Outcome,
    ProgressEvent,
    SubmittedEvent,
    Task,
    TaskStatus,
    UploadedEvent,
    UploadedImage,
)

if TYPE_CHECKING:
    import os
    from collections.abc import (
        AsyncGenerator,
        AsyncIterable,
        AsyncIterator,
        Callable,
        Iterable,
        Mapping,
        Sequence,
    )
    from pathlib import Path
    from typing import IO

    from typing_extensions import Self

    from ._uploads import PreparedImage

__all__ = ["NOT_GIVEN", "AsyncApimart"]


class _State(enum.Enum):
    OPEN = "open"  # constructed; usable with or without ``async with``
    CLOSED = "closed"  # after aclose(); every call raises RuntimeError


class _Unset(enum.Enum):
    """Sentinel type: an argument left out means "the client's default"."""

    token = 0

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Literal[_Unset.token] = _Unset.token


class AsyncApimart:
    """Async client for APIMart's image API (asyncio and trio, through anyio).

    Create one per application and share it: it owns a connection pool and the
    client-wide limits (concurrent uploads, submits, downloads, and a poll budget), so
    limits hold across concurrent ``generate`` calls, ``generate_many`` batches and web
    requests. Use ``async with`` or call ``aclose()``; a borrowed *http_client* is never
    closed by us.

    Args:
        api_key: falls back to ``APIMART_API_KEY``; missing is a ``ValueError`` now,
            not a 401 later. It is sent only to the API origin and never shown.
        base_url: falls back to ``APIMART_BASE_URL``, then ``https://api.apimart.ai``.
        timeout: per HTTP request (float seconds or ``httpx.Timeout``).
        max_retries: retries of safe calls (the first attempt not counted).
        retry: a full ``RetryPolicy`` (overrides *max_retries*).
        poll: the ``PollPolicy`` for ``wait``; ``PollPolicy().scaled(0.001)`` in tests.
        limits: client-wide ``Limits``; *max_connections* overrides the pool size.
        wait_timeout: default deadline of ``wait``/``generate`` (seconds; None: none).
        retry_uncertain_submits: resend a submit whose outcome is unknown, with the
            same ``Idempotency-Key``. Safe only where the service honours keys; off by
            default, so ambiguity raises ``SubmissionUncertainError`` instead.
        http_client: a borrowed ``httpx.AsyncClient`` (its limits are its own).
        transport: an ``httpx.AsyncBaseTransport`` for our own client (tests: the fake).
        headers: extra headers for API requests.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | httpx.URL | None = None,
        timeout: float | httpx.Timeout = _config.DEFAULT_TIMEOUT,
        max_retries: int = _config.DEFAULT_MAX_RETRIES,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        limits: Limits | None = None,
        max_connections: int | None = None,
        wait_timeout: float | None = _config.DEFAULT_WAIT_TIMEOUT,
        retry_uncertain_submits: bool = False,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        max_response_bytes: int = _config.MAX_RESPONSE_BYTES,
        max_download_bytes: int = _config.MAX_DOWNLOAD_BYTES,
    ) -> None:
        api_key = api_key or _config.env(_config.ENV_API_KEY)
        if not api_key:
            raise ValueError(
                "no API key: pass AsyncApimart(api_key=...) or set the APIMART_API_KEY "
                "environment variable"
            )
        if http_client is not None and transport is not None:
            raise ValueError("pass either http_client or transport, not both")
        base = httpx.URL(
            str(base_url or _config.env(_config.ENV_BASE_URL) or _config.DEFAULT_BASE_URL)
        )
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"base_url must be an absolute http(s) URL, got {str(base)!r}")
        self._base_url = base
        self._limits = limits or Limits()
        if max_connections is not None:
            self._limits = dataclasses.replace(self._limits, max_connections=max_connections)
        self._retry = retry or RetryPolicy(attempts=max_retries + 1)
        self._poll_policy = poll or PollPolicy()
        self._wait_timeout = wait_timeout
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._owns_http = http_client is None
        own_transport: httpx.AsyncBaseTransport | None = None
        if http_client is None:
            pool = httpx.Limits(
                max_connections=self._limits.connections,
                max_keepalive_connections=self._limits.connections,
            )
            if transport is not None:
                own_transport = transport
            elif not _proxy_from_env():
                own_transport = default_transport(pool)
            # With a proxy configured in the environment, httpx builds its own
            # proxy-aware transports (it ignores the environment once given one).
            http_client = httpx.AsyncClient(
                transport=own_transport,
                limits=pool,
                timeout=self._timeout,
                follow_redirects=False,
                trust_env=True,
            )
        self._http = HttpCore(
            http_client,
            transport=own_transport,
            base_url=base,
            api_key=api_key,
            retry=self._retry,
            timeout=self._timeout,
            max_response_bytes=max_response_bytes,
            headers={
                "User-Agent": f"{_config.USER_AGENT_PREFIX}/{__version__}",
                "Accept": "application/json",
                **(headers or {}),
            },
        )
        self._max_download = max_download_bytes
        self._state = _State.OPEN
        self._idempotent = self._http.caller(idempotent_hook(self._retry.retry_after_max))
        self._submit_call = self._http.caller(
            submit_hook(self._retry.retry_after_max, retry_ambiguous=retry_uncertain_submits)
        )
        # Semaphores with fast_acquire rather than CapacityLimiters: a free slot is taken
        # without a trip through the event loop, which a limiter makes on every acquire
        # (three per pipeline). Every holder awaits I/O, so nothing can starve the loop.
        self._upload_limiter = anyio.Semaphore(self._limits.uploads, fast_acquire=True)
        self._submit_limiter = anyio.Semaphore(self._limits.submits, fast_acquire=True)
        self._download_limiter = anyio.Semaphore(self._limits.downloads, fast_acquire=True)
        self._poll_limiter = anyio.Semaphore(self._limits.polls_in_flight, fast_acquire=True)
        self._poll_budget = RateLimiter(self._limits.poll_rate, self._limits.poll_burst)
        self._upload_cache = UploadCache(_config.UPLOAD_REUSE_MARGIN)
        self._random = random.Random()

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool if we created it. Safe to call twice."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._owns_http:
            with anyio.CancelScope(shield=True):
                await self._http.client.aclose()

    @property
    def is_closed(self) -> bool:
        """Whether ``aclose()`` was called."""
        return self._state is _State.CLOSED

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise RuntimeError("this AsyncApimart client is closed; create a new one")

    def __repr__(self) -> str:
        limits = self._limits
        return (
            f"<AsyncApimart base_url={str(self._base_url)!r} uploads={limits.uploads} "
            f"submits={limits.submits} poll_rate={limits.poll_rate:g}/s "
            f"downloads={limits.downloads} state={self._state.value}>"
        )

    @property
    def base_url(self) -> httpx.URL:
        """The API origin (and path prefix) every API request goes to."""
        return self._base_url

    @property
    def limits(self) -> Limits:
        """The client-wide limits in force."""
        return self._limits

    @property
    def poll_policy(self) -> PollPolicy:
        """The schedule ``wait`` uses."""
        return self._poll_policy

    # -- upload --------------------------------------------------------------------

    async def upload_image(
        self,
        source: str | os.PathLike[str] | bytes | IO[bytes],
        *,
        filename: str | None = None,
        cache: bool = True,
    ) -> UploadedImage:
        """Upload one image and return its public URL (valid 72 hours).

        *source* is a path, ``bytes`` or a binary file object. It is checked before any
        request (exists, regular file, 1 byte to 20 MB, JPEG/PNG/WebP/GIF by its magic
        bytes, not truncated) and streamed from disk. With *cache*, content this client
        already uploaded (same SHA-256) is not uploaded again while its URL has hours
        left, and concurrent uploads of the same bytes share one request.

        Raises:
            InvalidImageError: the source fails a check (a ``ValueError``).
            PayloadTooLargeError, BadRequestError, ...: the service refused it.
            APIConnectionError: the network failed after retries.
        """
        image, _ = await self._upload(source, filename=filename, cache=cache)
        return image

    async def _upload(
        self, source: Any, *, filename: str | None = None, cache: bool = True
    ) -> tuple[UploadedImage, bool]:
        self._check_open()
        return await self._upload_prepared(await prepare_image(source, filename=filename), cache)

    async def _upload_prepared(
        self, prepared: PreparedImage, cache: bool = True
    ) -> tuple[UploadedImage, bool]:
        if not cache:
            return await self._send_upload(prepared), False
        return await self._upload_cache.get_or_upload(
            prepared.sha256, lambda: self._send_upload(prepared)
        )

    async def _send_upload(self, image: PreparedImage) -> UploadedImage:
        content_type, preamble, epilogue = multipart_parts(image)
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(preamble) + image.size + len(epilogue)),
        }
        async with self._upload_limiter:
            if image.data is not None:
                body = await self._idempotent(
                    self._post_upload, preamble + image.data + epilogue, headers
                )
            else:
                # A stream cannot be replayed: the file is read afresh per attempt.
                body = await self._idempotent(
                    lambda: self._post_upload(multipart_body(image, preamble, epilogue), headers)
                )
        return parse_upload(body, sha256=image.sha256)

    async def _post_upload(
        self, content: bytes | AsyncIterable[bytes], headers: dict[str, str]
    ) -> Any:
        return await self._http.request_json(
            "POST",
            "/v1/uploads/images",
            content=content,
            headers=headers,
            timeout=_config.DEFAULT_UPLOAD_TIMEOUT,
        )

    # -- submit / query ------------------------------------------------------------

    async def submit(
        self,
        request: BaseImageRequest | Mapping[str, Any] | None = None,
        /,
        *,
        idempotency_key: str | None = None,
        allow_unknown: bool = False,
        **params: Any,
    ) -> Task:
        """Create a generation task and return it (id and status; no images yet).

        The request is validated for its model first (kwargs, a dict or a model from
        ``apimart_async.models``); image entries must already be URLs (``generate``
        uploads local files for you). Every attempt carries the same
        ``Idempotency-Key`` (*idempotency_key*, or a fresh one). The submit is retried
        only when the service provably did nothing (connection never established,
        429, 503, ``get_channel_failed``). The request runs to its end even if the
        caller is cancelled meanwhile (for at most ``SUBMIT_SHIELD`` seconds), so a
        created task is never silently lost.

        Raises:
            InvalidRequestError: invalid parameters for the model (before any I/O).
            SubmissionUncertainError: the task may or may not exist; carries the key.
            APIStatusError: the service refused the request.
        """
        self._check_open()
        req = parse_request(request, allow_unknown=allow_unknown, **params)
        return await self._submit(req.to_body(), checked_key(idempotency_key))

    async def _submit(self, body: dict[str, Any], key: str) -> Task:
        # Serialised once: every retry sends byte-identical JSON under the same key.
        content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            "X-APIMart-Response-Version": _config.RESPONSE_VERSION,
        }

        data: Any = None
        failure: ApimartError | None = None
        async with self._submit_limiter:
            # Shielded: once bytes may be on the wire, we stay to hear the answer, so a
            # cancelled caller still learns the task id (or that it is uncertain).
            with anyio.CancelScope(shield=True) as shield:
                shield.deadline = now() + _config.SUBMIT_SHIELD
                try:
                    data = await self._submit_call(
                        self._http.request_json,
                        "POST",
                        "/v1/images/generations",
                        content=content,
                        headers=headers,
                    )
                except ApimartError as exc:
                    failure = exc
        if failure is not None:
            if is_ambiguous(failure):
                raise SubmissionUncertainError(
                    idempotency_key=key, request=body, reason=str(failure)
                ) from failure
            raise failure
        if shield.cancelled_caught:
            raise SubmissionUncertainError(
                idempotency_key=key,
                request=body,
                reason=f"no answer within {_config.SUBMIT_SHIELD:g}s",
            )
        try:
            task_id, status, raw = parse_submit(data)
        except APIResponseValidationError as exc:
            # The service answered 2xx: it acted, but we cannot tell on which task.
            raise SubmissionUncertainError(
                idempotency_key=key, request=body, reason=str(exc)
            ) from exc
        return Task(id=task_id, status=status, raw=raw)

    async def get_task(self, task_id: str) -> Task:
        """The task's current state (one query, retried on transient failures).

        Raises:
            BadRequestError: the service does not know the id (it answers 400).
            APIResponseValidationError: the body fit no known shape, after retries.
        """
        self._check_open()
        path = f"/v1/tasks/{_task_path(task_id)}"
        return parse_task(await self._idempotent(self._http.request_json, "GET", path))

    # -- wait ----------------------------------------------------------------------

    async def wait(
        self,
        task: str | Task,
        *,
        timeout: float | None | _Unset = NOT_GIVEN,
        on_event: EventHandler | None = None,
    ) -> Task:
        """Poll until the task finishes; return it completed, or raise.

        Given a ``Task`` fresh from ``submit``, the first poll waits a moment; given an
        id (resuming), it polls at once. The schedule adapts (see ``PollPolicy``) and
        every poll draws from the client-wide poll budget. Transient query failures are
        retried and, if they persist, polling goes on until the deadline, so a brief
        outage never loses a task. An unknown status keeps polling until the deadline.

        Raises:
            TaskFailedError: the service failed the task (``.reason``, ``.task``).
            TaskCancelledError: the service cancelled it.
            TaskTimeoutError: *timeout* passed first; resume with ``wait(err.task_id)``.
        """
        self._check_open()
        limit = self._wait_timeout if isinstance(timeout, _Unset) else timeout
        fresh = isinstance(task, Task)
        state = JobState(task if isinstance(task, Task) else None)
        task_id = task.id if isinstance(task, Task) else _checked_id(task)
        deadline = math.inf if limit is None else now() + limit
        return await self._wait_until(task_id, state, fresh, deadline, limit, on_event)

    async def _wait_until(
        self,
        task_id: str,
        state: JobState,
        fresh: bool,
        deadline: float,
        timeout: float | None,
        on_event: EventHandler | None,
    ) -> Task:
        """Poll until terminal or *deadline* (loop clock); *timeout* is for the error."""
        with anyio.CancelScope(deadline=deadline):
            return await self._poll(task_id, state, fresh, now(), on_event, None)
        raise TaskTimeoutError(task_id=task_id, task=state.task, timeout=timeout)

    async def _poll(
        self,
        task_id: str,
        state: JobState,
        fresh: bool,
        started: float,
        on_event: EventHandler | None,
        job: int | None,
    ) -> Task:
        """The body of ``wait``, with no deadline of its own: the caller's scope has it.

        *state* learns every task seen, so a deadline can report the last one.
        """
        schedule = PollSchedule(self._poll_policy, started, self._random)
        last = state.task
        delay: float | None = 0.0
        if fresh:
            delay = schedule.first_delay(last.estimated_time if last else None)
        while delay is not None:
            if delay > 0:
                await anyio.sleep(delay)
            await self._poll_budget.acquire()
            delay = await self._poll_once(task_id, state, schedule, started, on_event, job)
        return await self._finish_wait(task_id, state, started, on_event, job)

    async def _poll_once(
        self,
        task_id: str,
        state: JobState,
        schedule: PollSchedule,
        started: float,
        on_event: EventHandler | None,
        job: int | None,
    ) -> float | None:
        """One query of a waiting task (its poll budget already drawn): the delay until
        the next one, or None once the task is terminal (it is then in *state*).

        A transient failure that outlived its retries is not an error here: the task is
        still there, so the next query is merely scheduled.
        """
        try:
            async with self._poll_limiter:
                current = await self.get_task(task_id)
        except ApimartError as exc:
            if not is_transient(exc):
                raise
            last = state.task or Task(id=task_id, status=TaskStatus.UNKNOWN)
            return schedule.next_delay(last, now())
        state.task = current
        if on_event is not None:
            elapsed = now() - started
            event = ProgressEvent(task_id, current.status, current.progress, elapsed, job)
            await emit(on_event, event)
        if current.status.is_terminal:
            return None
        return schedule.next_delay(current, now())

    async def _finish_wait(
        self,
        task_id: str,
        state: JobState,
        started: float,
        on_event: EventHandler | None,
        job: int | None,
    ) -> Task:
        """The end of a wait on a terminal task: completed is returned, the rest raised."""
        last = state.task
        assert last is not None
        if last.status is TaskStatus.COMPLETED:
            await emit(on_event, CompletedEvent(last, now() - started, job))
            return last
        if last.status is TaskStatus.CANCELLED:
            raise TaskCancelledError(task_id=task_id, task=last)
        error = last.error
        raise TaskFailedError(
            task_id=task_id,
            task=last,
            reason=error.message if error else "the service gave no reason",
            code=error.code if error else None,
        )

    # -- generate ------------------------------------------------------------------

    async def generate(
        self,
        request: BaseImageRequest | Mapping[str, Any] | None = None,
        /,
        *,
        timeout: float | None | _Unset = NOT_GIVEN,
        idempotency_key: str | None = None,
        on_event: EventHandler | None = None,
        allow_unknown: bool = False,
        **params: Any,
    ) -> Task:
        """Upload local images, submit, and wait: one whole pipeline.

        ``image_urls`` entries that are ``pathlib.Path`` or ``bytes`` are uploaded first
        (deduplicated); strings must be http(s) URLs, or data URIs for models that take
        them. *timeout* is the deadline of the whole pipeline. Call options are
        keyword-only and never mistaken for request fields.

        Raises:
            InvalidRequestError / InvalidImageError: before any request.
            SubmissionUncertainError, TaskFailedError, TaskTimeoutError, ApimartError.
        """
        self._check_open()
        req = parse_request(request, allow_unknown=allow_unknown, **params)
        key = checked_key(idempotency_key)
        limit = self._wait_timeout if isinstance(timeout, _Unset) else timeout
        state = JobState()
        started = now()
        try:
            return await self._run_pipeline(
                req, key=key, timeout=limit, on_event=on_event, state=state
            )
        except Exception as exc:
            await report_failure(on_event, exc, state.task, started, None)
            raise

    async def _run_pipeline(
        self,
        req: BaseImageRequest,
        *,
        key: str,
        timeout: float | None,
        on_event: EventHandler | None,
        state: JobState,
    ) -> Task:
        """upload → submit → wait under one deadline: the body of ``generate``.

        *state* learns the task as soon as it exists, so a later failure cannot lose it.
        """
        started = now()
        deadline = math.inf if timeout is None else started + timeout
        task = await self._start(
            req, key=key, deadline=deadline, on_event=on_event, state=state, started=started
        )
        # Hold nothing the wait does not need.
        del req
        return await self._wait_until(task.id, state, True, deadline, timeout, on_event)

    async def _start(
        self,
        req: BaseImageRequest,
        *,
        key: str,
        deadline: float,
        on_event: EventHandler | None,
        state: JobState,
        started: float,
        job: int | None = None,
        timings: dict[str, float] | None = None,
    ) -> Task:
        """Upload local images, then submit, before *deadline* (loop clock; inf: none).

        The created task is returned and put in *state*. A deadline that interrupts the
        upload, or the wait for a submit slot, is an ``APITimeoutError``; a submit once
        it may be on the wire is shielded, so it is never cut short by the deadline.
        """
        timings = {} if timings is None else timings
        stage = "upload"
        with anyio.CancelScope(deadline=deadline):
            if req.local_images():
                req = await self._upload_local(req, on_event, started, job, timings)
            stage = "submit"
            t0 = now()
            task = state.task = await self._submit(req.to_body(), key)
            timings["submit"] = now() - t0
            if on_event is not None:
                with anyio.CancelScope(shield=True):
                    await emit(on_event, SubmittedEvent(task.id, now() - started, job))
            return task
        # The submit is shielded once it may be on the wire, so a deadline that ends the
        # submit stage caught it still queued for a slot: nothing was sent.
        limit = deadline - started
        raise APITimeoutError(
            f"the pipeline deadline ({limit:g}s) passed while "
            + ("uploading images" if stage == "upload" else "waiting to submit"),
            method="POST",
            url=self._http.url(
                "/v1/uploads/images" if stage == "upload" else "/v1/images/generations"
            ),
            sent=stage == "upload",
        )

    async def _upload_local(
        self,
        req: BaseImageRequest,
        on_event: EventHandler | None,
        started: float,
        job: int | None,
        timings: dict[str, float],
    ) -> BaseImageRequest:
        local = req.local_images()
        t0 = now()
        entries = [u if isinstance(u, str) else "" for u in (req.image_urls or ())]
        # Every image is checked before any is uploaded: one bad file costs no upload.
        prepared = [(position, await prepare_image(source)) for position, source in local]
        if len(prepared) == 1:
            # The common case: no task group, no closure.
            position, image_source = prepared[0]
            entries[position] = await self._upload_entry(image_source, on_event, started, job)
        else:
            failures: list[Exception] = []

            async def one(position: int, image_source: PreparedImage) -> None:
                try:
                    url = await self._upload_entry(image_source, on_event, started, job)
                except Exception as exc:  # noqa: BLE001 - raised plainly below
                    failures.append(exc)
                    return
                entries[position] = url

            async with anyio.create_task_group() as tg:
                for position, image_source in prepared:
                    tg.start_soon(one, position, image_source)
            if failures:
                raise failures[0]  # the caller sees our error, never an ExceptionGroup
        timings["upload"] = now() - t0
        return req.with_image_urls(entries)

    async def _upload_entry(
        self,
        image_source: PreparedImage,
        on_event: EventHandler | None,
        started: float,
        job: int | None,
    ) -> str:
        image, cached = await self._upload_prepared(image_source)
        if on_event is not None:
            await emit(on_event, UploadedEvent(image, now() - started, job, cached))
        return image.url

    # -- download ------------------------------------------------------------------

    async def download(
        self,
        task: Task | Sequence[str],
        dest: str | os.PathLike[str],
        *,
        names: Sequence[str] | None = None,
        overwrite: bool = True,
        on_event: EventHandler | None = None,
    ) -> list[Path]:
        """Save every image of *task* (or every URL given) into directory *dest*.

        Each file streams to a temporary file in *dest*, is checked by its magic bytes
        and size cap, and is renamed atomically to ``<task_id>_<i>.<ext>`` (or
        *names*), so a failure never leaves a partial file. No API key is sent to
        result hosts; only http(s) URLs are fetched; retried like other safe calls.

        Raises:
            ResultExpiredError: the task's ``expires_at`` has passed.
            APIResponseValidationError: a result is not an image or is over the cap.
        """
        self._check_open()
        paths = await download_images(
            self._http.client,
            task,
            dest,
            names=names,
            overwrite=overwrite,
            limiter=self._download_limiter,
            caller=self._idempotent,
            timeout=self._timeout,
            max_bytes=self._max_download,
        )
        if on_event is not None and isinstance(task, Task):
            await emit(on_event, _downloaded(task, paths))
        return paths

    # -- many ----------------------------------------------------------------------

    @asynccontextmanager
    async def generate_many(
        self,
        requests: Iterable[Any] | AsyncIterable[Any],
        *,
        concurrency: int = 64,
        fail_fast: bool = False,
        timeout: float | None | _Unset = NOT_GIVEN,
        download_to: str | os.PathLike[str] | None = None,
        on_event: EventHandler | None = None,
        allow_unknown: bool = False,
        idempotency_keys: Callable[[int, Any], str | None] | None = None,
        known_tasks: Callable[[int, Any], str | None] | None = None,
    ) -> AsyncGenerator[AsyncIterator[Outcome], None]:
        """Run many pipelines at once; yield their ``Outcome``s as they finish.

        ``async with client.generate_many(requests) as outcomes: async for o in
        outcomes: ...``. *requests* (dicts or models; an iterable or async iterable)
        is read lazily with a bounded read-ahead, so a million-line input never sits in
        memory. Exactly one ``Outcome`` per input item; one job's failure is that job's
        outcome (a typed error) and never cancels the others, unless *fail_fast*, where
        the first error cancels the rest (their outcomes are then not produced).
        Leaving the block early, or cancelling around it, cancels work in flight
        promptly and leaves nothing running. Client-wide limits still apply across
        concurrent batches.

        *idempotency_keys(index, request)* may supply each job's key (a resumable
        journal keeps them); *known_tasks(index, request)* may return a task id that
        was already submitted, which is then only waited for, never resubmitted.
        """
        self._check_open()
        limit = self._wait_timeout if isinstance(timeout, _Unset) else timeout
        pipeline = Pipeline(
            self,
            concurrency=concurrency,
            fail_fast=fail_fast,
            timeout=limit,
            download_to=download_to,
            on_event=on_event,
            allow_unknown=allow_unknown,
            idempotency_keys=idempotency_keys,
            known_tasks=known_tasks,
        )
        async with pipeline.run(requests) as outcomes:
            yield outcomes


def _downloaded(task: Task, paths: list[Path]) -> Event:
    return DownloadedEvent(task.id, tuple(paths), 0.0)


def _proxy_from_env() -> bool:
    names = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
    return any(_config.env(n) or _config.env(n.lower()) for n in names)


def _checked_id(task_id: str) -> str:
    # Checked at run time too: ids often come from untyped JSON or user input.
    if not isinstance(task_id, str) or not task_id.strip():  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"task_id must be a non-empty string, got {task_id!r}")
    return task_id.strip()


def _task_path(task_id: str) -> str:
    # Ids are opaque: encode everything, dots included, so "../x" stays one segment.
    return quote(_checked_id(task_id), safe="").replace(".", "%2E")
