"""The whole error tree, and the one table that maps an HTTP status to a class.

What the network or the service did to you is an ``ApimartError``::

    ApimartError
    ├── APIConnectionError            the transport failed; __cause__ is the httpx error
    │   └── APITimeoutError           also a TimeoutError
    ├── APIStatusError                non-2xx, or an ``error`` object inside a 2xx body
    │   ├── BadRequestError           400
    │   ├── AuthenticationError       401
    │   ├── InsufficientBalanceError  402
    │   ├── PermissionDeniedError     403
    │   ├── NotFoundError             404
    │   ├── ConflictError             409 (idempotency key reused / in progress)
    │   ├── PayloadTooLargeError      413
    │   ├── RateLimitError            429 (.retry_after)
    │   └── ServerError               5xx
    ├── APIResponseValidationError    a body we could not understand
    ├── SubmissionUncertainError      a paid submit may or may not have created a task
    ├── BudgetExceededError           a batch's spending cap stopped this job's submit
    ├── BalanceUnavailableError       the balance endpoint answered success: false
    └── TaskError                     the task ended without images (.task_id, .task)
        ├── TaskFailedError           status failed (.reason)
        ├── TaskCancelledError        status cancelled
        ├── TaskTimeoutError          our deadline passed; also a TimeoutError
        ├── ResultMissingError        completed, but no result URL after re-querying
        └── ResultExpiredError        the result URLs' expires_at has passed

What *you* did wrong is a ``ValueError``, raised before any request is sent, and is
deliberately outside ``ApimartError`` (as httpx keeps ``InvalidURL`` outside
``HTTPError``)::

    ValueError
    ├── InvalidRequestError           bad model parameters (names model, field, allowed values)
    │   ├── UnknownModelError         a model id we have no rules for
    │   └── InvalidImageError         an image source that is missing, too big or not an image
    └── MissingAPIKeyError            no key given and none in APIMART_API_KEY

No message built here ever contains the API key: messages come from the service's
``error.message`` (which never echoes the key) or from our own text.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .types import Task

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "ApimartError",
    "AuthenticationError",
    "BadRequestError",
    "BalanceUnavailableError",
    "BudgetExceededError",
    "ConflictError",
    "InsufficientBalanceError",
    "InvalidImageError",
    "InvalidRequestError",
    "MissingAPIKeyError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ResultExpiredError",
    "ResultMissingError",
    "ServerError",
    "SubmissionUncertainError",
    "TaskCancelledError",
    "TaskError",
    "TaskFailedError",
    "TaskTimeoutError",
    "UnknownModelError",
    "status_error_class",
]

_REQUEST_ID = re.compile(r"\(request id: ([^)]+)\)")


def _excerpt(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ApimartError(Exception):
    """Base class for everything the network or the APIMart service did.

    Catch this to handle every runtime failure of a call; programmer errors (bad
    parameters, unreadable files) are ``ValueError`` subclasses and not caught by it.
    """


class APIConnectionError(ApimartError):
    """The request could not be completed at the transport level.

    *sent* says whether any part of the request may have reached the server: it is
    False only when the connection was never established, which is what makes a paid
    submit safe to retry. *retryable* is False for failures that repeating cannot
    heal (a failed TLS certificate check, a URL no transport can use).
    """

    def __init__(
        self, message: str, *, method: str, url: str, sent: bool, retryable: bool = True
    ) -> None:
        super().__init__(message)
        self.method = method
        self.url = url
        self.sent = sent
        self.retryable = retryable


class APITimeoutError(APIConnectionError, TimeoutError):
    """A connect, read, write or pool timeout of a single HTTP request."""


class APIStatusError(ApimartError):
    """The service answered with an error: a non-2xx status or an ``error`` envelope.

    Attributes carry what APIMart put in the envelope: *code* (an int, a string such
    as ``"get_channel_failed"``, or ``None``), *type*, *param*, and *request_id*
    (APIMart puts it inside the message as ``(request id: ...)``). *body* is the
    parsed JSON body when there was one.
    """

    status_code: int

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: int | str | None = None,
        type: str | None = None,
        param: str | None = None,
        body: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        match = _REQUEST_ID.search(message)
        self.request_id: str | None = match.group(1).strip() if match else None
        self.message = message
        self.status_code = status_code
        self.code = code
        self.type = type
        self.param = param
        self.body = body
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        label = f" [{code}]" if code not in (None, "") else ""
        super().__init__(f"HTTP {status_code}{label}: {message}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status_code={self.status_code}, code={self.code!r}, "
            f"request_id={self.request_id!r}, message={self.message!r})"
        )


class BadRequestError(APIStatusError):
    """400: the service rejected the parameters (or the task id is unknown)."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or invalid."""


class InsufficientBalanceError(APIStatusError):
    """402: the account has no balance left for this call."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not use this model or option."""


class NotFoundError(APIStatusError):
    """404: the path or resource does not exist."""


class ConflictError(APIStatusError):
    """409: an idempotency key was reused with another body, or is still in progress."""


class PayloadTooLargeError(APIStatusError):
    """413: the uploaded file is larger than the service accepts (20 MB)."""


class RateLimitError(APIStatusError):
    """429: too many requests. *retry_after* is the server's hint in seconds, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(APIStatusError):
    """5xx: the service or an upstream channel failed."""


class APIResponseValidationError(ApimartError):
    """The service answered 2xx but the body was not what any documented version sends.

    Typical causes: a gateway's HTML page, truncated JSON, a body over the size cap, or
    a JSON shape we do not recognise. *excerpt* is a short, whitespace-collapsed start
    of the body for the log.
    """

    def __init__(self, message: str, *, status_code: int, excerpt: str = "") -> None:
        self.status_code = status_code
        self.excerpt = _excerpt(excerpt)
        text = f"{message} (HTTP {status_code})"
        if self.excerpt:
            text += f": {self.excerpt!r}"
        super().__init__(text)


class SubmissionUncertainError(ApimartError):
    """A paid submit may or may not have created a task; we did not resubmit it.

    Raised when the request may have reached the service but no usable answer came
    back (a read timeout, a dropped connection, a 500/502/504 without a code that
    proves nothing was done). Retrying blindly could pay twice. To retry safely, send
    the *same* request with the same *idempotency_key* (``submit(request,
    idempotency_key=err.idempotency_key)``) if the service honours keys; or look the
    task up in your dashboard first.
    """

    def __init__(self, *, idempotency_key: str, request: Mapping[str, Any], reason: str) -> None:
        self.idempotency_key = idempotency_key
        self.request = dict(request)
        self.reason = reason
        super().__init__(
            f"the submit may or may not have created a task ({reason}); "
            f"retry only with idempotency_key={idempotency_key!r}"
        )


class BudgetExceededError(ApimartError):
    """A ``generate_many`` budget (``max_cost`` / ``max_images``) stopped this job before
    its submit: nothing was sent for it, so a rerun with a higher budget continues.

    *budget* names the cap that was reached (``"max_cost"`` or ``"max_images"``) and
    *limit* its value; *spent* is what is certainly spent, *reserved* what submits
    under way may still cost (USD, or images for ``max_images``).
    """

    def __init__(
        self,
        message: str,
        *,
        budget: Literal["max_cost", "max_images"],
        spent: float,
        reserved: float,
        limit: float,
    ) -> None:
        super().__init__(message)
        self.budget: Literal["max_cost", "max_images"] = budget
        self.spent = spent
        self.reserved = reserved
        self.limit = limit


class BalanceUnavailableError(ApimartError):
    """The balance endpoint answered HTTP 200 with ``success: false`` (§10).

    *message* is the service's own, e.g. ``"Failed to get token info"``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"the service could not report the balance: {message}")
        self.message = message


class TaskError(ApimartError):
    """A task reached an end other than ``completed``; *task* is its last known state."""

    def __init__(self, message: str, *, task_id: str, task: Task | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.task = task


class TaskFailedError(TaskError):
    """The service reports the task as failed; *reason* is its error message."""

    def __init__(
        self, *, task_id: str, task: Task | None, reason: str, code: int | str | None = None
    ) -> None:
        super().__init__(f"task {task_id} failed: {reason}", task_id=task_id, task=task)
        self.reason = reason
        self.code = code


class TaskCancelledError(TaskError):
    """The service reports the task as cancelled."""

    def __init__(self, *, task_id: str, task: Task | None) -> None:
        super().__init__(f"task {task_id} was cancelled", task_id=task_id, task=task)


class TaskTimeoutError(TaskError, TimeoutError):
    """Our deadline passed before the task finished; the task may still complete.

    Resume with ``client.wait(err.task_id)``: the id is never lost.
    """

    def __init__(self, *, task_id: str, task: Task | None, timeout: float | None) -> None:
        after = f" after {timeout:g}s" if timeout is not None else ""
        super().__init__(
            f"task {task_id} did not finish{after}; resume with wait({task_id!r})",
            task_id=task_id,
            task=task,
        )
        self.timeout = timeout


class ResultMissingError(TaskError):
    """The service reported the task completed but listed no result URL, even after
    *queries* looks. The task was probably paid for; ask again later with
    ``wait(task_id)`` rather than submitting again.
    """

    def __init__(self, *, task_id: str, task: Task | None, queries: int) -> None:
        super().__init__(
            f"task {task_id} is completed but the service listed no result URL "
            f"({queries} queries); ask again later with wait({task_id!r}) rather than "
            "submitting again",
            task_id=task_id,
            task=task,
        )
        self.queries = queries


class ResultExpiredError(TaskError):
    """The task's result URLs expired (``expires_at`` passed) before the download.

    Results live about 24 hours; there is no endpoint to re-sign them.
    """

    def __init__(self, *, task_id: str, task: Task | None, expired_at: object) -> None:
        super().__init__(
            f"the results of task {task_id} expired at {expired_at}; they cannot be "
            "downloaded any more",
            task_id=task_id,
            task=task,
        )
        self.expired_at = expired_at


class InvalidRequestError(ValueError):
    """Request parameters that the model does not accept; raised before any I/O.

    The message names the model, the field and what is allowed. *errors* is a list of
    ``(field, message)`` pairs, one per problem.
    """

    def __init__(self, message: str, *, model: str | None = None, errors: Any = ()) -> None:
        super().__init__(message)
        self.model = model
        self.errors: list[tuple[str, str]] = list(errors)


class UnknownModelError(InvalidRequestError):
    """A model id with no local rules. Pass ``allow_unknown=True`` to send it anyway."""


class InvalidImageError(InvalidRequestError):
    """An image source that cannot be uploaded: missing, empty, too big, or not an image."""


class MissingAPIKeyError(ValueError):
    """No API key was given and ``APIMART_API_KEY`` is not set (raised by the constructor)."""


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientBalanceError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    429: RateLimitError,
}


def status_error_class(status_code: int) -> type[APIStatusError]:
    """The class for *status_code*: the table above, ``ServerError`` for 5xx."""
    if status_code >= 500:
        return ServerError
    return _STATUS_CLASSES.get(status_code, APIStatusError)
