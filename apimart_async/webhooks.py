"""Receive APIMart's webhook pushes: finished tasks, typed, once per task id.

With a ``webhook`` on the submit, the service POSTs the task-query body
(``{"code": 200, "data": {...task...}}``) to ``<webhook>/callback`` when the task
finishes (completed or failed only), retries up to 3 times when it gets no 2xx, may
deliver the same task twice, and **signs nothing** (apimart-api.md §6.4).
``WebhookReceiver`` is the endpoint for those calls::

    from fastapi import FastAPI
    from apimart_async.webhooks import WebhookReceiver

    receiver = WebhookReceiver(public_url="https://example.com/hooks")
    app = FastAPI()
    app.mount("/hooks", receiver)  # the service will POST to .../hooks/<token>/callback

    # send receiver.webhook_url as the request's ``webhook`` field; then:
    receiver.get(task_id)  # the pushed Task, once it arrived
    unsubscribe = receiver.add_listener(lambda task: print(task.id, task.status))

Security: the service signs nothing, so **the secret path token in
``receiver.webhook_url`` is the only protection**: anyone who knows the URL can push a
fake "completed" task with result URLs of their choosing. Keep the URL out of logs
(this module never logs it; server and proxy access logs do record request paths, so
keep those private or drop this path from them), and serve it over **HTTPS in
production**, where the path is encrypted; over plain http anyone on the way can read
the token. The token is
compared in constant time; a request with any other path gets 404 and changes nothing.
The service never calls a URL on a non-public host or a port other than 80/443, so
``public_url`` is checked like a request's ``webhook`` (``validate_webhook_url``).

Responses (JSON bodies, all small; the service retries on no answer or 5xx and gives up
on a 4xx):

- 200: a terminal task, new (stored, listeners called) or a duplicate (ignored); also a
  valid task in a non-terminal state, which the service never pushes: ignored with 200
  so it is not retried;
- 404: the path does not end in ``/<token>/callback`` (checked before anything else);
- 405: the right path with a method other than POST;
- 413: a body over ``max_body_size`` (declared or actually sent);
- 400: a body that is not JSON, or JSON that is not a task (no task object or id).

Nothing a client sends makes the receiver raise: every rejection is counted in
``receiver.stats`` and logged at DEBUG (wrong path, wrong method: internet noise) or
INFO (a bad body on the right path), never with the token.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import re
import secrets
import threading
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from ._exceptions import APIResponseValidationError
from ._parsing import decode_json as _decode_json
from ._parsing import parse_task as _parse_task
from ._webhook_url import validate_webhook_url
from .types import Task

__all__ = [
    "RejectReason",
    "WebhookReceiver",
    "WebhookStats",
    "parse_callback",
    "validate_webhook_url",
]

logger = logging.getLogger("apimart_async.webhooks")

# ASGI 3 (the shapes Starlette's ASGIApp uses, so ``app.mount`` type-checks).
_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]

# Stored as returning object: a listener that wrongly returns a coroutine is caught.
_Listener = Callable[[Task], object]

RejectReason = Literal["wrong_path", "method", "too_large", "bad_json", "not_a_task"]
"""Why a callback got a 4xx: 404, 405, 413, 400 (not JSON), 400 (JSON but no task)."""

# A finished task's body is a few KB; 1 MiB leaves room for undocumented inline results.
_DEFAULT_MAX_BODY_SIZE = 1024 * 1024
# Enough for any batch's window between a push and its job reading it; ~KBs per task.
_DEFAULT_MAX_TASKS = 10_000
# 32 random bytes; a caller-supplied token needs at least 128 bits (22 base64url chars).
_TOKEN_BYTES = 32
_TOKEN = re.compile(r"[A-Za-z0-9_-]{22,256}")
_JSON = (b"content-type", b"application/json")


@dataclass(frozen=True, slots=True)
class WebhookStats:
    """Counters since the receiver was created (a snapshot; for tests and metrics).

    *received*: terminal tasks stored for the first time (listeners were called);
    *duplicates*: terminal tasks already stored (answered 200, nothing else);
    *ignored*: valid tasks in a non-terminal state (answered 200, nothing else);
    *rejected*: 4xx answers by reason (see ``RejectReason``).
    """

    received: int = 0
    duplicates: int = 0
    ignored: int = 0
    rejected: Mapping[RejectReason, int] = field(default_factory=dict[RejectReason, int])

    @property
    def rejected_total(self) -> int:
        """All 4xx answers."""
        return sum(self.rejected.values())


def parse_callback(body: bytes | str) -> Task:
    """The ``Task`` in a callback body, for routing callbacks yourself.

    No token check, no size cap, no deduplication: ``WebhookReceiver.handle`` does those.
    Accepts every task-query shape the client accepts (it is the same parser).

    Raises:
        APIResponseValidationError: the body is not JSON, or carries no task object or id.
    """
    raw = body.encode() if isinstance(body, str) else body
    return _parse_task(_decode(raw))


def _decode(body: bytes) -> object:
    try:
        return _decode_json(body, 200)
    except RecursionError:  # "[[[[…" nested deeper than the interpreter's stack
        raise APIResponseValidationError(
            "body is nested too deeply to be a task", status_code=200, excerpt=""
        ) from None


class WebhookReceiver:
    """The endpoint APIMart's callbacks go to: an ASGI app plus ``handle`` for others.

    ``WebhookReceiver(public_url="https://example.com/hooks")`` draws a secret path
    token (``secrets.token_urlsafe``); ``webhook_url`` is ``<public_url>/<token>``, the
    value to send as a request's ``webhook``, and the service POSTs to
    ``<webhook_url>/callback``. **The token is the only protection** (the service signs
    nothing): serve it over **HTTPS in production** and keep the URL out of logs.

    Serving it:

    - ASGI (FastAPI, Starlette, anything ASGI 3): ``app.mount("/hooks", receiver)``
      with ``public_url`` ending in ``/hooks``, or run it whole (``uvicorn`` with the
      receiver as the app; lifespan messages are answered). A request is accepted when
      its path ends in ``/<token>/callback``, so it works whether the server passes the
      whole path or the path relative to ``root_path``, behind any prefix.
    - any other framework: ``status, body = receiver.handle(request_body, request_path)``
      and answer with that status and body (``application/json``). Let the framework
      cap the body size too (e.g. Flask's ``MAX_CONTENT_LENGTH``).

    Several processes behind one URL (``uvicorn --workers 4``, a restart while tasks
    run) must share the token: pass the same ``token=`` (for example from a secret in
    the environment) to each, or a callback reaching another process gets 404 and the
    service gives up on it.

    Args:
        public_url: the URL the service reaches this receiver at, without the token;
            must be public http(s) on port 80/443 (``validate_webhook_url``).
        token: the secret path segment; by default 32 random bytes. Give your own (22
            to 256 characters of ``A-Z a-z 0-9 _ -``) only to share it as above.
        max_body_size: larger bodies get 413 without being read (default 1 MiB).
        max_tasks: pushed tasks kept for ``get`` and deduplication; the oldest is
            evicted first (default 10,000). A task re-pushed after its eviction counts
            as new.

    Raises:
        InvalidRequestError: *public_url* is not a URL the service would call.
        ValueError: a bad *token*, *max_body_size* or *max_tasks*.

    Threads: the store and listener list are locked, so ``get``, ``add_listener`` and
    ``stats`` may be used from any thread while the app serves in another.
    """

    def __init__(
        self,
        *,
        public_url: str,
        token: str | None = None,
        max_body_size: int = _DEFAULT_MAX_BODY_SIZE,
        max_tasks: int = _DEFAULT_MAX_TASKS,
    ) -> None:
        validate_webhook_url(public_url, field="public_url")
        token = secrets.token_urlsafe(_TOKEN_BYTES) if token is None else _checked_token(token)
        self._public_url = public_url
        self._token = token.encode()
        self._webhook_url = f"{public_url.rstrip('/')}/{token}"
        self._max_body_size = _positive_int("max_body_size", max_body_size)
        self._max_tasks = _positive_int("max_tasks", max_tasks)
        self._lock = threading.Lock()
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        self._listeners: dict[object, _Listener] = {}
        self._counts: Counter[Literal["received", "duplicates", "ignored"]] = Counter()
        self._rejected: Counter[RejectReason] = Counter()

    def __repr__(self) -> str:
        # No token: a repr ends up in logs and tracebacks.
        return f"WebhookReceiver(public_url={self._public_url!r}, tasks={len(self._tasks)})"

    # -- what the client sends ---------------------------------------------------------

    @property
    def public_url(self) -> str:
        """The base URL given at creation (no token)."""
        return self._public_url

    @property
    def webhook_url(self) -> str:
        """``<public_url>/<token>``: send this as ``webhook``. A secret: do not log it."""
        return self._webhook_url

    @property
    def callback_url(self) -> str:
        """``<webhook_url>/callback``: where the service POSTs. A secret too."""
        return f"{self._webhook_url}/callback"

    # -- what the job engine (or a user) reads ---------------------------------------------

    def get(self, task_id: str) -> Task | None:
        """The terminal task pushed for *task_id*, or ``None`` (not yet, or evicted).

        A push that arrives before the submit answer is kept, so looking the id up
        after learning it finds it.
        """
        with self._lock:
            return self._tasks.get(task_id)

    def add_listener(self, listener: Callable[[Task], None]) -> Callable[[], None]:
        """Call *listener(task)* once per task id when its terminal push arrives.

        Returns a function that unsubscribes it (idempotent). Listeners run
        synchronously, in registration order, in the thread that handles the request
        (the event loop serving the ASGI app, or ``handle``'s caller), after the task is
        stored and before the 200 is sent: keep them short and non-blocking. To hand a
        task to async code in the same event loop, use a memory object stream's
        ``send_nowait`` or set an ``anyio.Event``; from another thread (a server running
        in its own thread or loop), hand over thread-safely, e.g. with
        ``anyio.from_thread.run_sync(fn, task, token=...)``. A listener that raises is
        logged and skipped; the others still run and the service still gets its 200.

        To never miss a task whose id you do not know yet: add the listener first, then
        after learning the id check ``get(id)``. The task is stored before listeners are
        called, so one of the two sees it.

        Raises:
            TypeError: *listener* is a coroutine function (it would never be awaited).
        """
        if inspect.iscoroutinefunction(listener):
            raise TypeError(
                "add_listener needs a plain function; listeners are called synchronously "
                "(hand tasks to async code with e.g. a memory object stream's send_nowait)"
            )
        key = object()
        with self._lock:
            self._listeners[key] = listener

        def unsubscribe() -> None:
            with self._lock:
                self._listeners.pop(key, None)

        return unsubscribe

    @property
    def stats(self) -> WebhookStats:
        """A snapshot of the counters (see ``WebhookStats``)."""
        with self._lock:
            return WebhookStats(
                received=self._counts["received"],
                duplicates=self._counts["duplicates"],
                ignored=self._counts["ignored"],
                rejected=MappingProxyType(dict(self._rejected)),
            )

    # -- serving ---------------------------------------------------------------------

    def handle(self, body: bytes, path: str, *, method: str = "POST") -> tuple[int, bytes]:
        """Process one request from any framework: ``(status, JSON body)`` to answer.

        *path* is the request path (whole, or relative to where the receiver is
        mounted); see the module docstring for the statuses. Never raises on what a
        client sent; a listener's exception is logged, not raised.
        """
        rejection = self._route(path, method)
        if rejection is not None:
            return rejection
        if len(body) > self._max_body_size:
            return self._reject("too_large", f"{len(body)} bytes")
        return self._process(body)

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """The ASGI 3 entry point (http and lifespan; websockets are refused)."""
        kind = scope.get("type")
        if kind == "http":
            await self._serve_http(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _serve_http(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        path: object = scope.get("path")
        method: object = scope.get("method")
        answer = self._route(
            path if isinstance(path, str) else "", method if isinstance(method, str) else ""
        )
        if answer is None:
            declared = _content_length(scope.get("headers") or ())
            if declared is not None and declared > self._max_body_size:
                answer = self._reject("too_large", f"declared {declared} bytes")
            else:
                try:
                    body = await _read_body(receive, self._max_body_size)
                except _TooLarge:
                    answer = self._reject("too_large", "body over the cap")
                else:
                    if body is None:
                        return  # the client left; nobody to answer
                    answer = self._process(body)
        status, payload = answer
        headers = [_JSON, (b"content-length", str(len(payload)).encode())]
        if status == 405:
            headers.append((b"allow", b"POST"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    # -- the steps -------------------------------------------------------------------

    def _route(self, path: str, method: str) -> tuple[int, bytes] | None:
        """A 404/405 answer, or ``None`` when this is a POST to ``.../<token>/callback``."""
        segments = [s for s in path.split("/") if s]
        if (
            len(segments) < 2
            or segments[-1] != "callback"
            or not hmac.compare_digest(
                # compare_digest wants bytes (or ASCII str); a path may hold anything.
                segments[-2].encode("utf-8", "surrogatepass"),
                self._token,
            )
        ):
            return self._reject("wrong_path", "path does not end in /<token>/callback")
        if method.upper() != "POST":
            return self._reject("method", f"method {method[:16]!r}")
        return None

    def _process(self, body: bytes) -> tuple[int, bytes]:
        try:
            data = _decode(body)
        except APIResponseValidationError as exc:
            return self._reject("bad_json", str(exc))
        try:
            task = _parse_task(data)
        except APIResponseValidationError as exc:
            return self._reject("not_a_task", str(exc))
        return self._accept(task)

    def _accept(self, task: Task) -> tuple[int, bytes]:
        if not task.is_terminal:
            # The service pushes terminal states only; a 4xx would only make it give up,
            # and a retry could not change the answer. The poll path covers the task.
            with self._lock:
                self._counts["ignored"] += 1
            logger.debug(
                "webhook: ignored task %s in non-terminal state %s", task.id, task.status.value
            )
            return 200, _answer("ignored", "not a terminal state")
        with self._lock:
            duplicate = task.id in self._tasks
            if duplicate:
                self._counts["duplicates"] += 1
                listeners: tuple[_Listener, ...] = ()
            else:
                self._tasks[task.id] = task
                if len(self._tasks) > self._max_tasks:
                    self._tasks.popitem(last=False)
                self._counts["received"] += 1
                listeners = tuple(self._listeners.values())
        if duplicate:
            logger.debug("webhook: task %s pushed again; ignored", task.id)
            return 200, _answer("duplicate")
        logger.debug("webhook: task %s %s received", task.id, task.status.value)
        for listener in listeners:
            _notify(listener, task)
        return 200, _answer("accepted")

    def _reject(self, reason: RejectReason, detail: str) -> tuple[int, bytes]:
        status = _REJECT_STATUS[reason]
        with self._lock:
            self._rejected[reason] += 1
        # Wrong path and method are what scanners send all day: DEBUG. A bad body on the
        # right path came from the service or from someone holding the token: INFO.
        level = logging.DEBUG if status in (404, 405) else logging.INFO
        logger.log(level, "webhook: rejected a callback with %d (%s): %s", status, reason, detail)
        return status, _answer("rejected", reason)


_REJECT_STATUS: dict[RejectReason, int] = {
    "wrong_path": 404,
    "method": 405,
    "too_large": 413,
    "bad_json": 400,
    "not_a_task": 400,
}


def _checked_token(token: object) -> str:
    if isinstance(token, str) and _TOKEN.fullmatch(token):
        return token
    # Never echo the token: it is a secret even when it is a bad one.
    raise ValueError(
        "WebhookReceiver.token must be 22 to 256 characters of A-Z a-z 0-9 _ - "
        "(e.g. secrets.token_urlsafe(32))"
    )


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"WebhookReceiver.{name} must be an int >= 1, got {value!r}")
    return value


def _notify(listener: _Listener, task: Task) -> None:
    """Call one listener; whatever it does wrong stays with it."""
    try:
        result: object = listener(task)
    except Exception:
        logger.exception("webhook: listener %r failed on task %s", listener, task.id)
        return
    if inspect.iscoroutine(result):
        result.close()  # never awaited: close it so no "never awaited" warning leaks
        logger.error(
            "webhook: listener %r returned a coroutine; listeners are called synchronously",
            listener,
        )


def _answer(status: str, reason: str | None = None) -> bytes:
    body = {"status": status} if reason is None else {"status": status, "reason": reason}
    return json.dumps(body).encode()


class _TooLarge(Exception):
    """The body grew past the cap while being read."""


async def _read_body(receive: _Receive, cap: int) -> bytes | None:
    """The request body, or ``None`` if the client disconnected; ``_TooLarge`` past *cap*."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return None
        chunk: object = message.get("body", b"")
        if isinstance(chunk, (bytes, bytearray)) and chunk:
            size += len(chunk)
            if size > cap:
                raise _TooLarge
            chunks.append(bytes(chunk))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _content_length(headers: Iterable[Any]) -> int | None:
    """The declared body size, if there is a well-formed ``Content-Length``."""
    for name, value in headers:
        if name.lower() == b"content-length":
            text = bytes(value).strip()
            return int(text) if text.isdigit() else None
    return None


async def _lifespan(receive: _Receive, send: _Send) -> None:
    """Answer startup and shutdown: the receiver has nothing to open or close."""
    while True:
        message = await receive()
        if message.get("type") == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message.get("type") == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
