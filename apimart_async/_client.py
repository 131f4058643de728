"""``AsyncApimart``: one client, one connection pool, limits that hold across every call.

The public API and its composition, top to bottom: configuration, lifecycle, then
upload → submit → get_task → wait → generate → download → generate_many. Each method
is a short driver of the job engine (``_jobs``), which owns the stages; the pieces it
composes are ``_transport`` (the network seam), ``_http`` (API requests), ``_retry``
(what is retried, and how), ``_submits`` (paid submits out of callers' reach),
``_polling`` (when to ask again, the poll budget), ``_uploads``, ``_download`` and
``_pipeline`` (many jobs at once).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Literal

import anyio

from . import _config
from ._clock import running_asyncio_loop
from ._config import Limits, PollPolicy, RetryPolicy
from ._exceptions import TaskError
from ._runtime import current_loop, loop_mismatch
from ._version import __version__

# The job engine (_jobs and the stages it composes, the pydantic result and request
# models) is imported where it is first needed: by the first client created (and
# ``parse_request`` by the first request), not by ``from apimart_async import
# AsyncApimart``. After that a function-level import is a sys.modules look-up (about a
# microsecond; the per-call methods import their modules in one statement).

if TYPE_CHECKING:
    import os
    from collections.abc import (
        AsyncIterable,
        Callable,
        Iterable,
        Mapping,
        Sequence,
    )
    from pathlib import Path
    from types import TracebackType
    from typing import IO

    import httpx
    from typing_extensions import Self

    from ._events import EventHandler
    from ._pipeline import OutcomeStream
    from ._pushes import PushRouter
    from ._transport import Backend
    from .models import BaseImageRequest
    from .types import AccountBalance, Task, UploadedImage
    from .webhooks import WebhookReceiver

__all__ = [
    "NOT_GIVEN",
    "AsyncApimart",
    "_Unset",
]  # _Unset: the blocking client mirrors the signatures

logger = logging.getLogger("apimart_async")


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
    closed by us. A client belongs to the event loop it first runs on; from synchronous
    code use ``Apimart``.

    Args:
        api_key: falls back to ``APIMART_API_KEY``; missing is a ``MissingAPIKeyError``
            (a ``ValueError``) now, not a 401 later. Sent only to the API origin.
        base_url: falls back to ``APIMART_BASE_URL``, then ``https://api.apimart.ai``.
        timeout: per HTTP request (float seconds or ``httpx.Timeout``).
        max_retries: retries of safe calls (the first attempt not counted).
        retry: a full ``RetryPolicy`` (overrides *max_retries*).
        poll: the ``PollPolicy`` for waiting; ``PollPolicy().scaled(0.001)`` in tests.
        limits: client-wide ``Limits``; *max_connections* overrides the pool size.
        wait_timeout: default deadline of ``wait``/``generate`` (seconds; None: none).
        retry_uncertain_submits: resend a submit whose outcome is unknown, with the
            same ``Idempotency-Key``. Safe only where the service honours keys; off by
            default, so ambiguity raises ``SubmissionUncertainError`` instead.
        submit_shield: how long a submit already on the wire goes on after its caller
            is cancelled (or the client closes), so its task id is still heard.
        http_client: a borrowed ``httpx.AsyncClient`` (its limits and proxies are its
            own; its auth, default headers and cookies never reach result hosts).
        transport: an ``httpx.AsyncBaseTransport`` for our own pool (tests: the fake).
        transport_backend: ``"auto"`` (aiohttp on asyncio when the ``fast`` extra is
            installed, else httpx), ``"aiohttp"`` or ``"httpx"``.
        webhooks: a ``WebhookReceiver`` (``apimart_async.webhooks``): every submit
            sends its ``webhook_url`` unless the call names its own ``webhook``, and
            results are taken from its pushes (polls become a rare safety net).
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
        submit_shield: float = _config.SUBMIT_SHIELD,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        transport_backend: Backend = "auto",
        webhooks: WebhookReceiver | None = None,
        headers: Mapping[str, str] | None = None,
        max_response_bytes: int = _config.MAX_RESPONSE_BYTES,
        max_download_bytes: int = _config.MAX_DOWNLOAD_BYTES,
    ) -> None:
        from . import _jobs
        from ._http import HttpCore
        from ._telemetry import Telemetry
        from ._transport import open_transport

        key = _config.resolve_api_key(api_key)
        self._base_url = _config.resolve_base_url(base_url)
        self._limits = limits or Limits()
        if max_connections is not None:
            self._limits = dataclasses.replace(self._limits, max_connections=max_connections)
        self._poll_policy = poll or PollPolicy()
        self._wait_timeout = wait_timeout
        request_timeout = _config.resolve_timeout(timeout)
        telemetry = Telemetry.for_client()
        net = open_transport(
            connections=self._limits.connections,
            backend=transport_backend,
            http_client=http_client,
            transport=transport,
        )
        http = HttpCore(
            net,
            base_url=self._base_url,
            api_key=key,
            timeout=request_timeout,
            max_response_bytes=max_response_bytes,
            headers={
                "User-Agent": f"{_config.USER_AGENT_PREFIX}/{__version__}",
                "Accept": "application/json",
                **(headers or {}),
            },
            telemetry=telemetry,
        )
        self._res = _jobs.Resources(
            http,
            limits=self._limits,
            retry=retry or RetryPolicy(attempts=max_retries + 1),
            poll=self._poll_policy,
            submit_shield=submit_shield,
            retry_uncertain_submits=retry_uncertain_submits,
            download_timeout=request_timeout,
            max_download=max_download_bytes,
        )
        self._backend: Backend = transport_backend
        self._webhooks = webhooks
        self._routers: dict[int, PushRouter] = {}  # by id() of their receiver
        self._closed = False
        self._loop: object = None  # the event loop of the first call

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client: hear out submits on the wire, then close the pool.

        Submits still in flight get up to *submit_shield* seconds to answer (their
        task ids then reach their callers or ``orphaned_tasks()``); what does not
        answer is logged with its idempotency key. A borrowed *http_client* is left
        open. Safe to call twice.
        """
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and (running_asyncio_loop() or current_loop()) is not self._loop:
            # Its loop is gone (a second asyncio.run): nothing it holds can be closed
            # from here. Say so instead of failing; the connections die with that loop.
            logger.warning(
                "AsyncApimart.aclose() called from another event loop than the one it ran "
                "on; its connections could not be closed from here (create the client "
                "inside the loop that uses it)"
            )
            return
        for router in self._routers.values():
            router.close()
        with anyio.CancelScope(shield=True):
            await self._res.keeper.aclose()
            await self._res.http.aclose()

    @property
    def is_closed(self) -> bool:
        """Whether ``aclose()`` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this AsyncApimart client is closed; create a new one")
        self._check_loop()

    def _check_loop(self) -> None:
        loop = running_asyncio_loop() or current_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise loop_mismatch("AsyncApimart")

    def __repr__(self) -> str:
        limits = self._limits
        state = "closed" if self._closed else "open"
        return (
            f"<AsyncApimart base_url={str(self._base_url)!r} uploads={limits.uploads} "
            f"submits={limits.submits} poll_rate={limits.poll_rate:g}/s "
            f"downloads={limits.downloads} state={state}>"
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
    def transport_backend(self) -> Backend:
        """The transport chosen at construction (``"auto"`` decides on the first request:
        aiohttp on asyncio when the ``fast`` extra is installed, httpx otherwise)."""
        return self._backend

    @property
    def poll_policy(self) -> PollPolicy:
        """The schedule waiting uses."""
        return self._poll_policy

    def _router(self, receiver: WebhookReceiver) -> PushRouter:
        from ._pushes import PushRouter

        router = self._routers.get(id(receiver))
        if router is None or router.receiver is not receiver:
            router = self._routers[id(receiver)] = PushRouter(receiver)
        return router

    def _with_webhook(
        self, request: BaseImageRequest
    ) -> tuple[BaseImageRequest, PushRouter | None]:
        """The client's webhook on *request* (unless it names its own); its router."""
        receiver = self._webhooks
        if receiver is None:
            return request, None
        if request.webhook is None:
            from .models import parse_request

            request = parse_request(request, webhook=receiver.webhook_url)
        if request.webhook != receiver.webhook_url:
            return request, None
        return request, self._router(receiver)

    def orphaned_tasks(self) -> list[Task]:
        """Take the tasks whose submit finished after its caller was cancelled.

        A submit on the wire is heard out even when its caller is cancelled (a web
        request aborted, ``asyncio.wait_for`` expiring); the task it created is
        reported to the caller's ``on_event`` (a ``SubmittedEvent``), logged at
        WARNING, and kept here until collected, so an app can adopt it
        (``wait(task.id)``). Each task is returned once.
        """
        return self._res.keeper.orphans()

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
        from . import _jobs
        from ._uploads import prepare_image

        self._check_open()
        image = await prepare_image(source, filename=filename)
        uploaded, _ = await _jobs.upload(self._res, image, cache=cache)
        return uploaded

    # -- submit / query ------------------------------------------------------------

    async def submit(
        self,
        request: BaseImageRequest | Mapping[str, Any] | None = None,
        /,
        *,
        idempotency_key: str | None = None,
        on_event: EventHandler | None = None,
        allow_unknown: bool = False,
        **params: Any,
    ) -> Task:
        """Create a generation task and return it (id and status; no images yet).

        The request is validated for its model first (kwargs, a dict or a model from
        ``apimart_async.models``); image entries must already be URLs (``generate``
        uploads local files for you). Every attempt carries the same
        ``Idempotency-Key`` (*idempotency_key*, or a fresh one) and is announced to
        *on_event* first (``SubmittingEvent``). The submit is retried only when the
        service provably did nothing (connection never established, 429, 503,
        ``get_channel_failed``). Cancelling the caller does not cut a request already
        on the wire: see ``orphaned_tasks``.

        Raises:
            InvalidRequestError: invalid parameters for the model (before any I/O).
            SubmissionUncertainError: the task may or may not exist; carries the key.
            APIStatusError: the service refused the request.
        """
        from . import _events, _jobs, models  # one look-up: this is a per-call path

        self._check_open()
        req, _ = self._with_webhook(
            models.parse_request(request, allow_unknown=allow_unknown, **params)
        )
        if req.local_images():
            req.to_body()  # raises: submit() sends URLs only (generate() uploads)
        key = _events.checked_key(idempotency_key)
        job = _jobs.Job(request=req, key=key, timeout=None, on_event=on_event)
        try:
            return await _jobs.submit(self._res, job)
        except BaseException:
            # The task was created, but the caller gets an error (a failing on_event,
            # a cancellation just after): the client keeps it.
            _jobs.abandon(self._res, job, "submit raised after its task was created")
            raise

    async def get_task(self, task_id: str) -> Task:
        """The task's current state (one query, retried on transient failures).

        Task queries draw from the client-wide poll budget (``Limits.poll_rate``).

        Raises:
            BadRequestError: the service does not know the id (it answers 400).
            APIResponseValidationError: the body fit no known shape, after retries.
        """
        from . import _jobs

        self._check_open()
        return await _jobs.query(self._res, task_id)  # checked by the query's path

    async def balance(self, *, account: bool = False) -> AccountBalance:
        """What the key (or, with *account*, the whole account) has left to spend.

        Reads ``GET /v1/balance`` (``/v1/user/balance`` with *account*); costs nothing.
        ``unlimited`` is True for keys without a quota (``remaining`` is then None).

        Raises:
            BalanceUnavailableError: the service answered ``success: false``.
            AuthenticationError, InsufficientBalanceError, ...: the request failed.
        """
        from ._parsing import parse_balance

        self._check_open()
        path = "/v1/user/balance" if account else "/v1/balance"
        res = self._res
        return parse_balance(await res.retry_query(res.http.request_json, "GET", path))

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
        id (resuming), it polls at once. ``wait`` always polls (it cannot know whether the
        task was submitted with a webhook); ``generate`` takes pushed results. The
        schedule adapts (see ``PollPolicy``) and every query draws from the client-wide
        poll budget. Transient query failures
        are retried and, if they persist, polling goes on until the deadline, so a
        brief outage never loses a task. An unknown status keeps polling until the
        deadline; a completed task without result URLs is asked about a few times more.

        Raises:
            TaskFailedError: the service failed the task (``.reason``, ``.task``).
            TaskCancelledError: the service cancelled it.
            ResultMissingError: completed, but no result URL was ever listed.
            TaskTimeoutError: *timeout* passed first; resume with ``wait(err.task_id)``.
        """
        from . import _jobs, types

        self._check_open()
        fresh = isinstance(task, types.Task)
        if not isinstance(task, types.Task):
            task = types.Task(id=_jobs.checked_task_id(task), status=types.TaskStatus.UNKNOWN)
        job = _jobs.Job(
            task=task,
            fresh=fresh,
            key="",
            timeout=self._deadline(timeout),
            on_event=on_event,
        )
        _jobs.open_span(self._res, job, "apimart.wait")
        try:
            done = await _jobs.wait(self._res, job)
        except BaseException as exc:
            _jobs.close_span(self._res, job, exc)
            raise
        _jobs.close_span(self._res, job)
        return done

    def _deadline(self, timeout: float | None | _Unset) -> float | None:
        return self._wait_timeout if isinstance(timeout, _Unset) else timeout

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
        them. *timeout* is the deadline of the whole pipeline; it never cuts a submit
        on the wire short (its task is then reported in the ``TaskTimeoutError``).
        Call options are keyword-only and never mistaken for request fields.

        Raises:
            InvalidRequestError / InvalidImageError: before any request.
            SubmissionUncertainError, TaskFailedError, TaskTimeoutError, ApimartError.
        """
        from . import _events, _jobs, models  # one look-up: this is a per-call path

        self._check_open()
        req, pushes = self._with_webhook(
            models.parse_request(request, allow_unknown=allow_unknown, **params)
        )
        job = _jobs.Job(
            request=req,
            key=_events.checked_key(idempotency_key),
            timeout=self._deadline(timeout),
            on_event=on_event,
        )
        job.pushes = pushes
        res = self._res
        _jobs.open_span(res, job, "apimart.generate")
        try:
            await _jobs.submit(res, job)
            task = await _jobs.wait(res, job)
        except Exception as exc:
            await _jobs.fail(job, exc)
            if not (isinstance(exc, TaskError) and exc.task is not None):
                # The caller's error does not carry the task: the client keeps it.
                _jobs.abandon(
                    res, job, f"generate raised {type(exc).__name__} after its task was created"
                )
            _jobs.close_span(res, job, exc)
            raise
        except BaseException:  # cancelled: the task goes on without its caller
            _jobs.abandon(res, job, "generate was cancelled while its task ran")
            _jobs.close_span(res, job, "cancelled")
            raise
        _jobs.close_span(res, job)
        return task

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
        from ._download import download_images
        from ._events import emit
        from .types import DownloadedEvent, Task

        self._check_open()
        paths = await download_images(self._res, task, dest, names=names, overwrite=overwrite)
        if on_event is not None and isinstance(task, Task):
            await emit(on_event, DownloadedEvent(task.id, tuple(paths), 0.0))
        return paths

    # -- many ----------------------------------------------------------------------

    def generate_many(
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
        max_cost: float | None = None,
        max_images: int | None = None,
        prices: Mapping[str, float] | None = None,
        webhook: str | WebhookReceiver | None = None,
    ) -> AbstractAsyncContextManager[OutcomeStream]:
        """Run many pipelines at once; yield their ``Outcome``s as they finish.

        ``async with client.generate_many(requests) as outcomes: async for o in
        outcomes: ...``. *requests* (dicts or models; an iterable or async iterable)
        is read lazily with a bounded read-ahead, so a million-line input never sits in
        memory. Exactly one ``Outcome`` per input item; one job's failure is that job's
        outcome (a typed error) and never cancels the others, unless *fail_fast*, where
        the first error cancels the rest (their outcomes are then not produced).
        Leaving the block early, or cancelling around it, cancels work in flight
        promptly and leaves nothing running (submits on the wire are heard out: see
        ``orphaned_tasks``). Client-wide limits still apply across concurrent batches.

        *idempotency_keys(index, request)* may supply each job's key (a resumable
        journal keeps them); *known_tasks(index, request)* may return a task id that
        was already submitted, which is then only waited for, never resubmitted.

        Spending: *max_cost* (USD) and *max_images* cap what this run may submit;
        *prices* (USD per image, by model) lets a job's cost be estimated before its
        first task reports one. A submit starts only while it cannot exceed a cap
        (what is spent plus what submits under way may spend); once one could, no more
        submits start and the jobs not started get a ``BudgetExceededError`` outcome
        (nothing was sent for them: a rerun with a higher budget continues). The first
        402 (``InsufficientBalanceError``) or 401 on a submit stops submitting the same
        way. The stream reports ``spent``, ``cost_unknown`` and ``stopped``.

        *webhook*: a URL every request sends (unless it names its own), or a
        ``WebhookReceiver``, whose pushes then end the jobs' waits (rare polls remain
        as a safety net). Without it, the client's own *webhooks* receiver applies.
        """
        from ._budget import Budget
        from ._pipeline import Pipeline
        from ._webhook_url import validate_webhook_url

        budget = Budget(max_cost=max_cost, max_images=max_images, prices=prices)
        webhook_url: str | None
        if isinstance(webhook, str):
            receiver, webhook_url = None, validate_webhook_url(webhook)  # before any request
        else:
            receiver = webhook if webhook is not None else self._webhooks
            webhook_url = receiver.webhook_url if receiver is not None else None
        pipeline = Pipeline(
            self._res,
            concurrency=concurrency,
            fail_fast=fail_fast,
            timeout=self._deadline(timeout),
            download_to=download_to,
            on_event=on_event,
            allow_unknown=allow_unknown,
            idempotency_keys=idempotency_keys,
            known_tasks=known_tasks,
            limits=self._limits,
            budget=budget,
            webhook_url=webhook_url,
        )

        def on_entry() -> None:  # inside the loop that runs it
            self._check_open()
            if receiver is not None:
                pipeline.pushes = self._router(receiver)

        return _Run(pipeline.run(requests), on_entry)


class _Run(AbstractAsyncContextManager["OutcomeStream"]):
    """What ``generate_many`` returns: a run, entered with ``async with``."""

    __slots__ = ("_check", "_run")

    def __init__(
        self, run: AbstractAsyncContextManager[OutcomeStream], check: Callable[[], None]
    ) -> None:
        self._run = run
        self._check = check  # the client is open, on its own loop: checked on entry

    async def __aenter__(self) -> OutcomeStream:
        self._check()
        return await self._run.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._run.__aexit__(exc_type, exc, tb)

    if not TYPE_CHECKING:

        def __aiter__(self):
            raise TypeError(
                "generate_many() starts a run: use `async with client.generate_many(...) "
                "as outcomes:`, then `async for outcome in outcomes:`"
            )


# Re-exported by the package root: shown as ``apimart_async.AsyncApimart``.
AsyncApimart.__module__ = "apimart_async"
