"""Lenient readers for every response shape the service has been seen to send.

The documentation contradicts itself (apimart-api.md §11): submit ids live in
``data[0].task_id``, ``data.id`` or at the top level; result URLs are strings or lists;
error codes are ints, strings or empty. Each reader here accepts all documented
variants, ignores unknown fields, and raises ``APIResponseValidationError`` (never a
``KeyError`` or ``TypeError``) when a body fits none of them.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, cast

from ._config import RESULT_URL_TTL, UPLOAD_URL_TTL
from ._exceptions import (
    APIResponseValidationError,
    APIStatusError,
    BalanceUnavailableError,
    RateLimitError,
    status_error_class,
)
from ._text import encodable
from .types import AccountBalance, Task, TaskErrorInfo, TaskStatus, UploadedImage

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "as_object",
    "decode_json",
    "error_from_body",
    "parse_balance",
    "parse_retry_after",
    "parse_submit",
    "parse_task",
    "parse_upload",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_BAD_URL = re.compile(r"[\s\x00-\x1f\x7f]")


def decode_json(content: bytes, status_code: int) -> Any:
    """Parse a JSON body, or explain with an excerpt why it is not JSON."""
    try:
        return json.loads(content)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nesting deep enough to crash
        raise APIResponseValidationError(
            "response body is not JSON",
            status_code=status_code,
            excerpt=content[:300].decode("utf-8", "replace"),
        ) from None


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def as_object(value: object) -> dict[str, Any] | None:
    """*value* as a JSON object, or None. (JSON object keys are always strings.)"""
    return cast("dict[str, Any]", value) if isinstance(value, dict) else None


def _seq(value: object) -> list[Any] | None:
    """*value* as a JSON array, or None."""
    if not isinstance(value, list):
        return None
    return cast("list[Any]", value)  # type: ignore[redundant-cast]  # pyright needs it


def _as_str(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _code(value: object) -> int | str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        return int(value) if value.isascii() and value.isdigit() else value
    return None


def error_from_body(
    status_code: int, body: object, headers: Mapping[str, str] | None = None
) -> APIStatusError:
    """Build the status error for an error response (or a 2xx carrying ``error``).

    For an ``error`` inside a 2xx body, the class comes from ``error.code`` when it is
    an HTTP-like int, so ``{"error": {"code": 429}}`` in a 200 is still a rate limit.
    """
    envelope = as_object(body)
    error: object = envelope.get("error") if envelope is not None else None
    error_obj = as_object(error)
    message: str | None = None
    code: int | str | None = None
    err_type: str | None = None
    param: str | None = None
    if error_obj is not None:
        message = _as_str(error_obj.get("message"))
        code = _code(error_obj.get("code"))
        err_type = _as_str(error_obj.get("type"))
        param = _as_str(error_obj.get("param")) or None
    elif isinstance(error, str):
        message = error
    elif envelope is not None:
        message = _as_str(envelope.get("message")) or _as_str(envelope.get("msg"))
    if not message:
        message = f"HTTP {status_code} with no error message"
    effective = status_code
    if 200 <= status_code < 300 and isinstance(code, int) and 400 <= code < 600:
        effective = code
    cls = status_error_class(effective)
    kw: dict[str, Any] = {
        "status_code": effective,
        "code": code,
        "type": err_type,
        "param": param,
        "body": body,
        "headers": headers,
    }
    if cls is RateLimitError:
        retry_after = parse_retry_after((headers or {}).get("retry-after"))
        return RateLimitError(message, retry_after=retry_after, **kw)
    return cls(message, **kw)


def _number(value: object) -> float | None:
    """A finite number, or None (JSON may carry NaN, or ints too big for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return None if math.isnan(result) or math.isinf(result) else result


def _timestamp(value: object) -> datetime | None:
    seconds = _number(value)
    if seconds is None or seconds <= 0:
        return None
    try:
        return _EPOCH + timedelta(seconds=seconds)
    except (OverflowError, ValueError):
        return None


def _invalid(what: str, body: object) -> APIResponseValidationError:
    return APIResponseValidationError(what, status_code=200, excerpt=json.dumps(body)[:300])


def parse_submit(body: object) -> tuple[str, TaskStatus, dict[str, Any]]:
    """Task id, status and task object of a submit response, whatever its shape (§3.3 A-D)."""
    candidates: list[object] = []
    envelope = as_object(body)
    if envelope is not None:
        data = envelope.get("data")
        items = _seq(data)
        if items and len(items) > 1:
            ids = {_item_id(item) for item in items} - {None}
            if len(ids) > 1:
                # Which one is ours? Taking the first could wait on somebody else's task.
                named = ", ".join(sorted(str(i) for i in ids))
                raise _invalid(f"submit answer names {len(ids)} tasks ({named})", body)
        candidates.append(items[0] if items else data)
        candidates.append(envelope)
    for candidate in candidates:
        item = as_object(candidate)
        if item is None:
            continue
        task_id = item.get("task_id") or item.get("id")
        if isinstance(task_id, str) and task_id.strip():
            status = TaskStatus.parse(item.get("status") or "submitted")
            return task_id.strip(), status, item
    raise _invalid("submit response carries no task id", body)


def _item_id(item: object) -> str | None:
    obj = as_object(item)
    task_id = obj.get("task_id") or obj.get("id") if obj is not None else None
    return task_id if isinstance(task_id, str) and task_id.strip() else None


def _urls(value: object) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    items = _seq(value)
    if items is None:
        return []
    return [item for item in items if isinstance(item, str) and item]


def _image_urls(result: object) -> tuple[list[str], float | None]:
    """Flatten result URLs in order; return them with the earliest ``expires_at``."""
    result_obj = as_object(result)
    if result_obj is None:
        return [], None
    urls: list[str] = []
    expiries: list[float] = []
    for entry in _seq(result_obj.get("images")) or ():
        image = as_object(entry)
        if image is None:
            urls += _urls(entry)
            continue
        urls += _urls(image.get("url")) or _urls(image.get("image_url"))
        expiry = _number(image.get("expires_at"))
        if expiry is not None:
            expiries.append(expiry)
    # Undocumented fallbacks seen in other clients (apimart-api.md §6.1 item 4).
    if not urls:
        for key in ("url", "image_url", "image_urls"):
            urls += _urls(result_obj.get(key))
    return urls, (min(expiries) if expiries else None)


def _task_error(value: object) -> TaskErrorInfo | None:
    if isinstance(value, str):
        return TaskErrorInfo(message=value) if value else None
    error = as_object(value)
    if error is None:
        return None
    message = _as_str(error.get("message")) or _as_str(error.get("msg")) or ""
    code = _code(error.get("code"))
    if not message and code is None:
        return None
    return TaskErrorInfo(
        message=message or f"error code {code}", code=code, type=_as_str(error.get("type"))
    )


def parse_task(body: object) -> Task:
    """A ``Task`` from a task-query body (``{"code":200,"data":{...}}`` or bare)."""
    envelope = as_object(body)
    inner: object = envelope.get("data") if envelope is not None and "data" in envelope else body
    items = _seq(inner)
    if items is not None and len(items) == 1:
        inner = items[0]
    data = as_object(inner)
    if data is None:
        raise _invalid("task response carries no task object", body)
    task_id = data.get("id") or data.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        raise _invalid("task response carries no task id", body)
    status = TaskStatus.parse(data.get("status"))
    urls, expiry = _image_urls(data.get("result"))
    if not urls:
        urls, expiry = _image_urls(data)
    completed = _timestamp(data.get("completed"))
    expires_at = _timestamp(expiry)
    if expires_at is None and completed is not None and urls:
        # No expires_at: the documented lifetime is 24 h after completion (§9).
        expires_at = completed + timedelta(seconds=RESULT_URL_TTL)
    progress = _number(data.get("progress"))
    task_info = as_object(data.get("task_info"))
    estimated = _number(data.get("estimated_time"))
    if estimated is None and task_info is not None:
        estimated = _number(task_info.get("estimated_time"))
    return Task(
        id=task_id,
        status=status,
        progress=None if progress is None else max(0, min(100, int(progress))),
        image_urls=tuple(urls),
        expires_at=expires_at,
        created=_timestamp(data.get("created")),
        completed=completed,
        estimated_time=estimated,
        actual_time=_number(data.get("actual_time")),
        cost=_number(data.get("cost")),
        credits_cost=_number(data.get("credits_cost")),
        error=_task_error(data.get("error") or data.get("fail_reason")),
        raw=data,
    )


def parse_balance(body: object) -> AccountBalance:
    """An ``AccountBalance`` from ``/v1/balance`` or ``/v1/user/balance`` (§10).

    The failure form is HTTP 200 with ``success: false`` and a ``message``: that is a
    ``BalanceUnavailableError``; ``remain_balance: -1`` means an unlimited key.
    """
    envelope = as_object(body)
    data = envelope if envelope is not None else None
    if data is not None and "remain_balance" not in data:
        data = as_object(data.get("data")) or data
    if data is None:
        raise _invalid("balance response is not an object", body)
    if data.get("success") is False:
        message = _as_str(data.get("message")) or _as_str(data.get("msg")) or "no reason given"
        raise BalanceUnavailableError(message)
    remaining = _number(data.get("remain_balance"))
    if remaining is None and "remain_balance" not in data:
        raise _invalid("balance response carries no remain_balance", body)
    unlimited = data.get("unlimited_quota") is True or remaining == -1
    unit = _as_str(data.get("unit")) or _as_str(data.get("currency"))
    return AccountBalance(
        remaining=None if unlimited else remaining,
        used=_number(data.get("used_balance")),
        unlimited=unlimited,
        unit=unit,
        raw=data,
    )


def parse_upload(body: object, *, sha256: str | None = None) -> UploadedImage:
    """An ``UploadedImage`` from the flat upload response (and defensive variants)."""
    envelope = as_object(body)
    obj = as_object(envelope.get("data")) if envelope is not None else None
    obj = obj or envelope
    if obj is None:
        raise _invalid("upload response is not an object", body)
    url = obj.get("url") or obj.get("image_url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise _invalid("upload response carries no http(s) url", body)
    if _BAD_URL.search(url) or not url.isascii() and not encodable(url):
        # It goes into the submit as it is: nothing a request could not carry.
        raise _invalid("upload response carries a malformed url", body)
    created = _timestamp(obj.get("created_at")) or datetime.now(timezone.utc)
    size = obj.get("bytes")
    return UploadedImage(
        url=url,
        filename=_as_str(obj.get("filename")) or url.rsplit("/", 1)[-1],
        content_type=_as_str(obj.get("content_type")) or "application/octet-stream",
        bytes=size if isinstance(size, int) and not isinstance(size, bool) else 0,
        created_at=created,
        expires_at=created + timedelta(seconds=UPLOAD_URL_TTL),
        sha256=sha256,
    )
