"""Errors in the command line's own words: flags and commands, never Python calls.

The library's messages are written for Python callers ("pass ``allow_unknown=True``",
"resume with ``wait('…')``", "``max_cost=``"); a person at a shell needs the flag or
the command instead. ``explain(exc)`` is one error as CLI text:

* a service error shows the service's message once, with its code (when it adds
  something to the HTTP status) and its request id at the end: ``HTTP 400: 无效的任务ID
  (in English: invalid task ID) (request id: req_1)``. Where the service answered in
  Chinese, a known message gets its English translation (the glossary below, from
  apimart-api.md §6.1/§7), any other one a rough English meaning from its HTTP status;
* the library's errors whose text names a Python call are rewritten from their
  attributes (task id, timeout, idempotency key, budget limit);
* everything else is its message with whitespace collapsed.

``describe(exc)`` prefixes the error's class (``TaskFailedError: ...``): the one-line
form of batch notes and ``results.jsonl``. ``facts(exc)`` gives the fields a
``results.jsonl`` record carries: ``error_type``, ``error_code`` and ``request_id``.

What can go wrong: nothing here raises; an error we know nothing about is shown as
its message (or its class name when the message is empty).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from apimart_async import (
    APIStatusError,
    BudgetExceededError,
    ResultMissingError,
    SubmissionUncertainError,
    TaskFailedError,
    TaskTimeoutError,
    UnknownModelError,
)

__all__ = ["GLOSSARY", "ErrorFacts", "describe", "explain", "facts", "gloss"]

GLOSSARY: dict[str, str] = {
    # GET /v1/tasks/{id} for an id the service does not know (apimart-api.md §6.1, the
    # documented 400 body, {"code": 400, "message": "无效的任务ID", ...}).
    "无效的任务ID": "invalid task ID",
}
"""Known Chinese messages of the service and their English meaning."""

# The rough meaning of a status, for a Chinese message the glossary does not know.
_STATUS_MEANING = {
    400: "the service rejected the request",
    401: "the API key was rejected",
    402: "insufficient balance",
    403: "permission denied",
    404: "not found",
    409: "conflict",
    413: "the file is too large",
    429: "too many requests",
    500: "server error",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
}
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")
_REQUEST_ID = re.compile(r"\s*\(request id:\s*([^)]*)\)")
_DID_YOU_MEAN = re.compile(r"\(did you mean ('[^']*')\?\)")
_PYTHON_BOOL = re.compile(r"\b(\w+)=(True|False)\b")


@dataclass(frozen=True, slots=True)
class ErrorFacts:
    """The machine-readable side of an error (``results.jsonl`` fields)."""

    type: str
    """The error's class name, e.g. ``TaskFailedError``."""
    code: int | str | None = None
    """The service's error code (``error.code``), when it gave one."""
    request_id: str | None = None
    """The service's request id, when its message carried one."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def gloss(message: str, status: int | None = None) -> str:
    """*message*, followed by its English meaning if it is in Chinese."""
    if not _CJK.search(message):
        return message
    known = GLOSSARY.get(message.strip().rstrip("。.").strip())
    if known is None:
        for chinese, english in GLOSSARY.items():
            if chinese in message:
                known = english
                break
    if known is not None:
        return f"{message} (in English: {known})"
    meaning = _STATUS_MEANING.get(status or 0, "server error" if (status or 0) >= 500 else "")
    return f"{message} (in English, roughly: {meaning})" if meaning else message


def _status_text(exc: APIStatusError) -> str:
    message = exc.message
    request_id = exc.request_id
    match = _REQUEST_ID.search(message)
    if match is not None:
        request_id = request_id or match.group(1).strip() or None
        message = _REQUEST_ID.sub("", message)
    message = _one_line(message) or "no message"
    head = f"HTTP {exc.status_code}"
    code = exc.code
    if code not in (None, "") and str(code) != str(exc.status_code):
        head += f" {code}"  # a code that adds something, e.g. get_channel_failed
    text = f"{head}: {gloss(message, exc.status_code)}"
    if request_id:
        text += f" (request id: {request_id})"
    return text


def _budget_text(exc: BudgetExceededError) -> str:
    if exc.budget == "max_images":
        return (
            f"--max-images {exc.limit:g} reached: {exc.spent:g} images submitted by this run; "
            "the next job would go over it, so it was not submitted"
        )
    return (
        f"--max-cost {exc.limit:.2f} USD reached: {exc.spent:.2f} USD spent and "
        f"{exc.reserved:.2f} USD reserved by submits under way; the next job could go over "
        "it, so it was not submitted"
    )


def explain(exc: BaseException) -> str:
    """*exc* as one line of CLI text (an invalid request keeps a line per problem)."""
    if isinstance(exc, APIStatusError):
        return _status_text(exc)
    if isinstance(exc, BudgetExceededError):
        return _budget_text(exc)
    if isinstance(exc, SubmissionUncertainError):
        cause = exc.__cause__
        reason = explain(cause) if cause is not None else _one_line(exc.reason)
        return (
            f"the submit may or may not have created a task ({reason}); its idempotency "
            f"key is {exc.idempotency_key}"
        )
    if isinstance(exc, TaskTimeoutError):
        within = f" within {exc.timeout:g}s" if exc.timeout is not None else ""
        return f"task {exc.task_id} did not finish{within}; it may still complete"
    if isinstance(exc, ResultMissingError):
        return (
            f"task {exc.task_id} is completed but the service listed no result URL "
            f"({exc.queries} queries); it was probably paid for: ask for it again later "
            "rather than submitting it again"
        )
    if isinstance(exc, TaskFailedError):
        text = f"task {exc.task_id} failed: {gloss(_one_line(exc.reason))}"
        if exc.code not in (None, "") and str(exc.code) not in exc.reason:
            text += f" (code {exc.code})"
        return text
    if isinstance(exc, UnknownModelError):
        close = _DID_YOU_MEAN.search(str(exc))
        hint = f" (did you mean {close.group(1)}?)" if close else ""
        model = exc.model if exc.model is not None else "?"
        return (
            f"unknown model {model!r}{hint}; `apimart models` lists the known ones, and "
            "--allow-unknown-models sends any other id without local validation"
        )
    text = str(exc).strip()
    if isinstance(exc, ValueError):
        # Request rules name JSON fields: a rule like "requires google_search=True" reads
        # as the JSON value (or --param google_search=true) a person would write.
        text = _PYTHON_BOOL.sub(lambda m: f"{m[1]}={m[2].lower()}", text)
        return "\n".join(_one_line(line) for line in text.splitlines() if line.strip()) or (
            type(exc).__name__
        )
    return _one_line(text) or type(exc).__name__


def describe(exc: BaseException) -> str:
    """*exc* on one line, after its class: ``TaskFailedError: task ... failed: ...``."""
    return f"{type(exc).__name__}: {_one_line(explain(exc))}"


def facts(exc: BaseException) -> ErrorFacts:
    """The error's class, the service's code and the request id, where known."""
    status = exc if isinstance(exc, APIStatusError) else None
    if status is None and isinstance(exc.__cause__, APIStatusError):
        status = exc.__cause__  # an uncertain submit, or a job stopped by a 402/401
    code: int | str | None = None
    request_id: str | None = None
    if status is not None:
        code = status.code if status.code not in (None, "") else None
        request_id = status.request_id
        if request_id is None:
            match = _REQUEST_ID.search(status.message)
            request_id = match.group(1).strip() or None if match else None
    elif isinstance(exc, TaskFailedError):
        code = exc.code if exc.code not in (None, "") else None
    return ErrorFacts(type(exc).__name__, code, request_id)
