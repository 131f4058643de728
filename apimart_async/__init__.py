"""Async client for APIMart's image API: upload, submit, poll and download at scale.

>>> from apimart_async import AsyncApimart
>>> async def main() -> None:
...     async with AsyncApimart() as client:  # key from APIMART_API_KEY
...         task = await client.generate(model="gemini-3-pro-image-preview", prompt="a fox")
...         await client.download(task, "out/")

From synchronous code, ``Apimart`` has the same methods, blocking.

Public submodules: ``apimart_async.models`` (per-model request models),
``apimart_async.types`` (results and events), ``apimart_async.testing`` (FakeApimart).

Importing the package is cheap: the error tree, the configuration objects and the
version are loaded now; every other public name is loaded when first looked up
(PEP 562), so a program pays for the blocking client, ``generate_many`` or the pydantic
result models only when it uses them. ``AsyncApimart`` itself is light to import: its
job engine (and with it the pydantic models) is loaded by the first client created.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

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
from ._version import __version__

if TYPE_CHECKING:
    # What type checkers see; at run time these come from _LAZY (a test keeps the two
    # and __all__ in agreement).
    from ._client import NOT_GIVEN, AsyncApimart
    from ._pipeline import OutcomeStream
    from ._portal import OutcomeIterator
    from ._sync import Apimart
    from .types import AccountBalance, Event, Outcome, Task, TaskStatus, UploadedImage

# Public name -> the submodule that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "NOT_GIVEN": "._client",
    "AsyncApimart": "._client",
    "OutcomeStream": "._pipeline",
    "OutcomeIterator": "._portal",
    "Apimart": "._sync",
    "AccountBalance": ".types",
    "Event": ".types",
    "Outcome": ".types",
    "Task": ".types",
    "TaskStatus": ".types",
    "UploadedImage": ".types",
}

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


def _show_at_root(objects: list[object]) -> None:
    """Show public classes as ``apimart_async.X`` in reprs and tracebacks (as httpx does)."""
    for obj in objects:
        if isinstance(obj, type):
            obj.__module__ = __name__


def _load(name: str) -> object:
    """Load a lazily exported name (and the rest of its module's exports) on first use.

    Raises ``AttributeError`` for a name the package does not export, as a module does.
    """
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = import_module(module_name, __name__)
    # Bind every export of that module at once: the next look-up is a plain global.
    exports = {n: getattr(module, n) for n, m in _LAZY.items() if m == module_name}
    _show_at_root(list(exports.values()))
    globals().update(exports)
    return exports[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if not TYPE_CHECKING:
    # Hidden from type checkers: a visible module __getattr__ would make them accept any
    # misspelled name (apimart_async.AsyncApimrt) as `object`; they see the real names
    # through the TYPE_CHECKING imports above.
    __getattr__ = _load

_show_at_root([globals()[n] for n in __all__ if n not in _LAZY])
