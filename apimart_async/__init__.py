"""Async client for APIMart's image API: upload, submit, poll and download at scale.

>>> from apimart_async import AsyncApimart
>>> async def main() -> None:
...     async with AsyncApimart() as client:  # key from APIMART_API_KEY
...         task = await client.generate(model="gemini-3-pro-image-preview", prompt="a fox")
...         await client.download(task, "out/")

From synchronous code, ``Apimart`` has the same methods, blocking.

Public submodules: ``apimart_async.models`` (per-model request models),
``apimart_async.types`` (results and events), ``apimart_async.testing`` (FakeApimart).
"""

from __future__ import annotations

from ._client import NOT_GIVEN, AsyncApimart
from ._config import DEFAULT_WAIT_TIMEOUT, Limits, PollPolicy, RetryPolicy
from ._exceptions import (
    APIConnectionError,
    ApimartError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BalanceUnavailableError,
    BudgetExceededError,
    ConflictError,
    InsufficientBalanceError,
    InvalidImageError,
    InvalidRequestError,
    MissingAPIKeyError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ResultExpiredError,
    ResultMissingError,
    ServerError,
    SubmissionUncertainError,
    TaskCancelledError,
    TaskError,
    TaskFailedError,
    TaskTimeoutError,
    UnknownModelError,
)
from ._pipeline import OutcomeStream
from ._sync import Apimart, OutcomeIterator
from ._version import __version__
from .types import AccountBalance, Event, Outcome, Task, TaskStatus, UploadedImage

__all__ = [
    "DEFAULT_WAIT_TIMEOUT",
    "NOT_GIVEN",
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AccountBalance",
    "Apimart",
    "ApimartError",
    "AsyncApimart",
    "AuthenticationError",
    "BadRequestError",
    "BalanceUnavailableError",
    "BudgetExceededError",
    "ConflictError",
    "Event",
    "InsufficientBalanceError",
    "InvalidImageError",
    "InvalidRequestError",
    "Limits",
    "MissingAPIKeyError",
    "NotFoundError",
    "Outcome",
    "OutcomeIterator",
    "OutcomeStream",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PollPolicy",
    "RateLimitError",
    "ResultExpiredError",
    "ResultMissingError",
    "RetryPolicy",
    "ServerError",
    "SubmissionUncertainError",
    "Task",
    "TaskCancelledError",
    "TaskError",
    "TaskFailedError",
    "TaskStatus",
    "TaskTimeoutError",
    "UnknownModelError",
    "UploadedImage",
    "__version__",
]


# Show public objects as ``apimart_async.X`` in reprs and tracebacks (as httpx does).
def _set_module() -> None:
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type):
            obj.__module__ = __name__


_set_module()
del _set_module
