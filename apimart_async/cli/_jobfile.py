"""Reading a batch file: one JSON request per line, every line checked before any submit.

A line is an object with the request's fields (``model``, ``prompt``, ``size``, ...) and
an optional ``id``. ``image_urls`` entries are http(s) URLs, data URIs, or local paths,
resolved relative to the batch file's folder and sent as ``pathlib.Path`` (the client
uploads them). Blank lines are skipped.

A job's id is its ``id`` field, or else derived from the line's content (``job-`` and
12 hex digits of its hash, ``-2``, ``-3``... for repeats), so inserting lines does not
shuffle ids, and changing a request makes it a new job.

What can go wrong: every problem is reported as ``line N: <field>: <why>``; the caller
decides whether to skip the line or stop (``--strict``). An unreadable file raises
``OSError`` or ``UnicodeDecodeError``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from apimart_async import InvalidRequestError, UnknownModelError
from apimart_async.models import parse_request

if TYPE_CHECKING:
    from apimart_async.models import BaseImageRequest

__all__ = ["JobFile", "JobLine", "LineError", "local_image", "read_jobs"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_REMOTE_PREFIXES = ("http://", "https://", "data:")


@dataclass(frozen=True, slots=True)
class JobLine:
    """One valid line: the job's id and its validated request."""

    line: int
    id: str
    request: BaseImageRequest
    fingerprint: str
    """A hash of the line's content without ``id``: tells a changed request apart."""


@dataclass(frozen=True, slots=True)
class LineError:
    """One invalid line and why (*message* may span several lines, one per problem)."""

    line: int
    id: str | None
    message: str

    def __str__(self) -> str:
        return "\n".join(f"line {self.line}: {part}" for part in self.message.splitlines())


@dataclass(slots=True)
class JobFile:
    """Every line of a batch file, valid or not, in file order."""

    path: Path
    jobs: list[JobLine] = field(default_factory=list[JobLine])
    errors: list[LineError] = field(default_factory=list[LineError])

    @property
    def lines(self) -> int:
        """How many non-blank lines the file has."""
        return len(self.jobs) + len(self.errors)


@dataclass(slots=True)
class _Parsed:
    line: int
    data: dict[str, Any]
    fingerprint: str
    explicit_id: str | None


def local_image(entry: str, base: Path) -> Path | None:
    """The local file an ``image_urls`` string names (relative to *base*), or None if
    the string is a URL or data URI."""
    if entry.lower().startswith(_REMOTE_PREFIXES):
        return None
    return base / Path(entry).expanduser()


def read_jobs(path: Path, *, allow_unknown: bool = False) -> JobFile:
    """Parse and validate every line of *path*; see the module docstring."""
    base = path.resolve().parent
    result = JobFile(path)
    parsed: list[_Parsed] = []
    explicit: dict[str, int] = {}
    with path.open(encoding="utf-8-sig") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            item = _parse_line(number, text, explicit, base)
            if isinstance(item, LineError):
                result.errors.append(item)
            else:
                parsed.append(item)
    seen: dict[str, int] = {}
    for item in parsed:
        job_id = item.explicit_id or _derived_id(item.fingerprint, seen, explicit)
        try:
            request = parse_request(item.data, allow_unknown=allow_unknown)
        except UnknownModelError as exc:
            known = str(exc).split("; known models", 1)[0]
            message = (
                f"model: {known}; see `apimart models`, or pass --allow-unknown-models to "
                "send it without local validation"
            )
            result.errors.append(LineError(item.line, job_id, message))
            continue
        except InvalidRequestError as exc:
            result.errors.append(LineError(item.line, job_id, str(exc)))
            continue
        result.jobs.append(JobLine(item.line, job_id, request, item.fingerprint))
    result.errors.sort(key=lambda e: e.line)
    return result


def _parse_line(
    number: int, text: str, explicit: dict[str, int], base: Path
) -> _Parsed | LineError:
    try:
        value: object = json.loads(text)
    except ValueError as exc:
        return LineError(number, None, f"not valid JSON: {exc}")
    if not isinstance(value, dict):
        return LineError(
            number, None, f"expected a JSON object, got {type(value).__name__} (a request per line)"
        )
    data = cast("dict[str, Any]", value)
    job_id: str | None = None
    if "id" in data:
        raw_id = data.pop("id")
        if isinstance(raw_id, int) and not isinstance(raw_id, bool):
            raw_id = str(raw_id)
        if not isinstance(raw_id, str) or not _ID.match(raw_id):
            return LineError(
                number,
                None,
                f"id: must be 1-100 letters, digits, '.', '_' or '-', starting with a letter "
                f"or digit (got {raw_id!r})",
            )
        if raw_id in explicit:
            return LineError(
                number, raw_id, f"id: {raw_id!r} is already used on line {explicit[raw_id]}"
            )
        explicit[raw_id] = number
        job_id = raw_id
    fingerprint = hashlib.sha256(
        json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    images = data.get("image_urls")
    if isinstance(images, list):
        entries = cast("list[object]", images)
        resolved: list[object] = []
        for i, entry in enumerate(entries):
            path = local_image(entry, base) if isinstance(entry, str) else None
            if path is None:
                resolved.append(entry)
                continue
            shown = str(entry)
            if not path.exists():
                where = "" if Path(shown).is_absolute() else f" (looked for {path})"
                return LineError(
                    number, job_id, f"image_urls[{i}]: image path {shown!r} not found{where}"
                )
            if not path.is_file():
                return LineError(
                    number, job_id, f"image_urls[{i}]: image path {shown!r} is not a file"
                )
            resolved.append(path)
        data["image_urls"] = resolved
    return _Parsed(number, data, fingerprint, job_id)


def _derived_id(fingerprint: str, seen: dict[str, int], explicit: dict[str, int]) -> str:
    stem = f"job-{fingerprint[:12]}"
    count = seen.get(stem, 0) + 1
    seen[stem] = count
    job_id = stem if count == 1 else f"{stem}-{count}"
    while job_id in explicit:  # someone chose this very id by hand
        count += 1
        seen[stem] = count
        job_id = f"{stem}-{count}"
    return job_id
