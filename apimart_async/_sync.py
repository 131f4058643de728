"""``Apimart``: the blocking client, for scripts, notebooks and synchronous frameworks.

There is one implementation, ``AsyncApimart``; ``Apimart`` drives it from plain threads.
Each client runs one event loop in a daemon thread (anyio's blocking portal) and every
method hands the matching ``AsyncApimart`` coroutine to that loop, then blocks until it
ends. So request building, validation, retries, polling, limits and the poll budget
are the async client's own, and they hold across every thread sharing one client::

    caller thread(s) ──call──▶ portal (daemon thread, one event loop) ──▶ AsyncApimart
                     ◀─result/error─┘  (limits, poll budget, pool: shared by all calls)

Where things run: the ``AsyncApimart`` is built in the calling thread when no event
loop runs there (so ``Apimart(...)`` raises its errors before any thread starts);
inside a running loop (a Jupyter cell, async code) it is built on the client's own
thread instead, so nothing in it binds to the caller's loop. ``on_event`` callbacks,
``generate_many``'s input iterator and its ``idempotency_keys`` / ``known_tasks``
callbacks run on the client's thread: they must be quick and must not call the client
(that is refused with a ``RuntimeError`` rather than left to deadlock).

What can go wrong, and what happens:

- Ctrl-C (``KeyboardInterrupt``) while a call blocks: the call's async work is
  cancelled and *then* the interrupt is raised. A paid submit already on the wire is
  not cut short: the async client's submit keeper hears it out, and its task reaches
  ``on_event`` (a ``SubmittedEvent``), a WARNING log line and ``orphaned_tasks()``;
  ``close()`` (and so interpreter exit) waits for it, up to *submit_shield* seconds.
  A second Ctrl-C while the call is still unwinding stops waiting for it.
- ``close()``: new calls raise ``RuntimeError``; calls still running in other threads
  are cancelled (they raise ``RuntimeError``), submits on the wire are heard out, the
  pool is closed and the thread is joined. A client never closed is closed at
  interpreter exit (``weakref.finalize``), or when garbage-collected, so a script that
  forgets ``close()`` still exits cleanly.
- A callback that raises ``SystemExit`` (``sys.exit()``) or another non-``Exception``
  on the client's thread: it is carried back and raised in the caller's thread, and
  the client's loop lives on.
- ``os.fork()``: the child has no loop thread; create clients after forking.
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

from . import _config
from ._client import NOT_GIVEN, AsyncApimart, _Unset
from ._portal import CLOSED, OutcomeIterator, Runner, carried, carried_items, finalize

if TYPE_CHECKING:
    import os
    from collections.abc import (
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

    from ._config import Limits, PollPolicy, RetryPolicy
    from ._events import EventHandler
    from ._transport import Backend
    from .models import BaseImageRequest
    from .types import AccountBalance, Task, UploadedImage
    from .webhooks import WebhookReceiver

__all__ = ["Apimart", "OutcomeIterator"]


class Apimart:
    """Blocking client for APIMart's image API: ``AsyncApimart`` for synchronous code.

    The same constructor arguments, methods, arguments, return types and errors as
    ``AsyncApimart``; each method blocks until its work is done. Create one client and
    share it, across threads too: limits, the poll budget and the connection pool are
    client-wide. Use ``with Apimart() as client:`` or call ``close()``.

    It works in a plain script, in several threads at once, and inside a thread whose
    event loop is running (a Jupyter cell), where ``asyncio.run`` would fail. In async
    code prefer ``AsyncApimart``: a blocking call holds up the caller's loop meanwhile.

    Callbacks (``on_event``, and ``generate_many``'s input and key callbacks) run on
    the client's own thread, not the caller's: keep them quick and thread-safe, and do
    not call the client from them.

    Ctrl-C in a call cancels its work, then raises ``KeyboardInterrupt``; a paid submit
    already sent is heard out all the same, and its task reaches ``on_event``, a WARNING
    log line and ``orphaned_tasks()`` (``close()`` waits for such submits).

    Raises:
        MissingAPIKeyError, ValueError: no API key, or an invalid argument (raised by
            ``Apimart(...)`` itself, before any thread starts where no loop runs).
        RuntimeError: a call on a closed client, from a callback, or one that was
            running when another thread closed the client.
    """

    # The event loop of the client's thread. asyncio uses the aiohttp transport when
    # the ``fast`` extra is installed; the test suite runs it on trio too.
    _backend: ClassVar[str] = "asyncio"

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
        def build() -> AsyncApimart:
            return AsyncApimart(
                api_key=api_key,
                base_url=base_url,
                timeout=timeout,
                max_retries=max_retries,
                retry=retry,
                poll=poll,
                limits=limits,
                max_connections=max_connections,
                wait_timeout=wait_timeout,
                retry_uncertain_submits=retry_uncertain_submits,
                submit_shield=submit_shield,
                http_client=http_client,
                transport=transport,
                transport_backend=transport_backend,
                webhooks=webhooks,
                headers=headers,
                max_response_bytes=max_response_bytes,
                max_download_bytes=max_download_bytes,
            )

        self._runner = Runner(build, self._backend)
        self._client = self._runner.client
        # Closes the client at interpreter exit or on garbage collection, whichever
        # comes first; it holds the runner, never ``self``.
        self._finalizer = weakref.finalize(self, finalize, self._runner)

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> Self:
        if self._runner.closed:
            raise RuntimeError(CLOSED)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel calls still running, close the pool, stop the thread. Safe to call twice.

        Returns once the client's thread has ended. A paid submit on the wire is still
        heard first (for at most *submit_shield* seconds), so its task is not lost:
        collect it with ``orphaned_tasks()``.
        """
        self._runner.close()
        self._finalizer.detach()

    @property
    def is_closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._runner.closed

    def __repr__(self) -> str:
        inner = repr(self._client).removeprefix("<AsyncApimart")
        if self._runner.closed:
            inner = inner.replace("state=open", "state=closed")
        return f"<Apimart{inner}"

    @property
    def base_url(self) -> httpx.URL:
        """The API origin (and path prefix) every API request goes to."""
        return self._client.base_url

    @property
    def limits(self) -> Limits:
        """The client-wide limits in force, across every thread."""
        return self._client.limits

    @property
    def poll_policy(self) -> PollPolicy:
        """The schedule ``wait`` uses."""
        return self._client.poll_policy

    @property
    def transport_backend(self) -> Backend:
        """The transport chosen at construction (see ``AsyncApimart``)."""
        return self._client.transport_backend

    def orphaned_tasks(self) -> list[Task]:
        """Take the tasks whose submit finished after its caller was interrupted.

        See ``AsyncApimart.orphaned_tasks``. Also after ``close()``, which hears out
        the submits still on the wire: collect what they created here.
        """
        return self._runner.on_loop(self._client.orphaned_tasks)

    # -- the blocking twins of AsyncApimart's methods --------------------------------

    def upload_image(
        self,
        source: str | os.PathLike[str] | bytes | IO[bytes],
        *,
        filename: str | None = None,
        cache: bool = True,
    ) -> UploadedImage:
        """Upload one image and return its public URL (see ``AsyncApimart.upload_image``).

        A file object is read on the client's thread.
        """
        client = self._client
        return self._runner.run(lambda: client.upload_image(source, filename=filename, cache=cache))

    def submit(
        self,
        request: BaseImageRequest | Mapping[str, Any] | None = None,
        /,
        *,
        idempotency_key: str | None = None,
        on_event: EventHandler | None = None,
        allow_unknown: bool = False,
        **params: Any,
    ) -> Task:
        """Create a generation task and return it (see ``AsyncApimart.submit``).

        *on_event* runs on the client's thread.
        """
        client, handler = self._client, carried(on_event)
        return self._runner.run(
            lambda: client.submit(
                request,
                idempotency_key=idempotency_key,
                on_event=handler,
                allow_unknown=allow_unknown,
                **params,
            )
        )

    def get_task(self, task_id: str) -> Task:
        """The task's current state (see ``AsyncApimart.get_task``)."""
        client = self._client
        return self._runner.run(lambda: client.get_task(task_id))

    def balance(self, *, account: bool = False) -> AccountBalance:
        """What the key (or the account) has left to spend (see ``AsyncApimart.balance``)."""
        client = self._client
        return self._runner.run(lambda: client.balance(account=account))

    def wait(
        self,
        task: str | Task,
        *,
        timeout: float | None | _Unset = NOT_GIVEN,
        on_event: EventHandler | None = None,
    ) -> Task:
        """Poll until the task finishes; return it completed, or raise (see
        ``AsyncApimart.wait``). *on_event* runs on the client's thread."""
        client, handler = self._client, carried(on_event)
        return self._runner.run(lambda: client.wait(task, timeout=timeout, on_event=handler))

    def generate(
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
        """Upload local images, submit, and wait (see ``AsyncApimart.generate``).

        *on_event* runs on the client's thread.
        """
        client, handler = self._client, carried(on_event)
        return self._runner.run(
            lambda: client.generate(
                request,
                timeout=timeout,
                idempotency_key=idempotency_key,
                on_event=handler,
                allow_unknown=allow_unknown,
                **params,
            )
        )

    def download(
        self,
        task: Task | Sequence[str],
        dest: str | os.PathLike[str],
        *,
        names: Sequence[str] | None = None,
        overwrite: bool = True,
        on_event: EventHandler | None = None,
    ) -> list[Path]:
        """Save every image of *task* into directory *dest* (see ``AsyncApimart.download``)."""
        client, handler = self._client, carried(on_event)
        return self._runner.run(
            lambda: client.download(task, dest, names=names, overwrite=overwrite, on_event=handler)
        )

    def generate_many(
        self,
        requests: Iterable[Any],
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
    ) -> AbstractContextManager[OutcomeIterator]:
        """Run many pipelines at once; iterate their ``Outcome``s as they finish.

        ``with client.generate_many(requests) as outcomes: for o in outcomes: ...``,
        with everything ``AsyncApimart.generate_many`` promises: *requests* is read
        lazily (on the client's thread, so an iterator over a file or a generator
        works; it must not call the client), one ``Outcome`` per item, at most
        *concurrency* jobs at the service at once, and leaving the block early
        (``break``, an exception, Ctrl-C) cancels the work still running and returns
        once none is left, the spending caps (*max_cost*, *max_images*, *prices*),
        reported on the iterator (``spent``, ``cost_unknown``, ``stopped``), and
        *webhook*. The pipelines run while your loop body does; the iterator collects
        up to 8 finished outcomes ahead of you, so the input may be read that many
        items further ahead than in the async client.
        """
        batch = self._client.generate_many(
            carried_items(requests),
            concurrency=concurrency,
            fail_fast=fail_fast,
            timeout=timeout,
            download_to=download_to,
            on_event=carried(on_event),
            allow_unknown=allow_unknown,
            idempotency_keys=carried(idempotency_keys),
            known_tasks=carried(known_tasks),
            max_cost=max_cost,
            max_images=max_images,
            prices=prices,
            webhook=webhook,
        )
        return _BatchRun(self._runner.batch(batch))


class _BatchRun(AbstractContextManager["OutcomeIterator"]):
    """What ``Apimart.generate_many`` returns: a run, entered with ``with``."""

    __slots__ = ("_run",)

    def __init__(self, run: AbstractContextManager[OutcomeIterator]) -> None:
        self._run = run

    def __enter__(self) -> OutcomeIterator:
        return self._run.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return self._run.__exit__(exc_type, exc, tb)

    if not TYPE_CHECKING:

        def __iter__(self):
            raise TypeError(
                "generate_many() starts a run: use `with client.generate_many(...) as "
                "outcomes:`, then `for outcome in outcomes:`"
            )


# Re-exported by the package root: shown as ``apimart_async.Apimart``.
Apimart.__module__ = "apimart_async"
