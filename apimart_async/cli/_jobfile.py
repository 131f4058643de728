"""Reading a batch file as a stream: one JSON request per line, checked as it is read.

A line is an object with the request's fields (``model``, ``prompt``, ``size``, ...) and
an optional ``id``. ``image_urls`` entries are http(s) URLs, data URIs, or local paths,
resolved relative to the batch file's folder and sent as ``pathlib.Path`` (the client
uploads them). Blank lines are skipped.

A job's id is its ``id`` field, or else derived from the line's content (``job-`` and
12 hex digits of its hash, ``-2``, ``-3``... for repeats), so inserting lines does not
shuffle ids, and changing a request makes it a new job. Ids are claimed in file order:
an explicit id already taken by an earlier line (explicit or derived) is an error on the
later line, and a derived id skips any id an earlier line took.

The file is never held in memory: ``JobReader`` yields one ``JobLine`` or ``LineError``
at a time, and the ids seen so far live in an ``IdRegistry`` (temporary tables of a
sqlite connection, on disk), so a 1,000,000-line file costs the same memory as a
10-line one, and duplicate ids are still found.

What can go wrong: every problem is reported as ``line N: <field>: <why>`` (a line that
is not UTF-8 too); the caller decides whether to skip the line or stop (``--strict``).
An unreadable file raises ``OSError`` when opened.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from apimart_async import InvalidRequestError, UnknownModelError
from apimart_async.models import parse_request

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterator

    from apimart_async.models import BaseImageRequest

__all__ = [
    "IdRegistry",
    "JobLine",
    "JobReader",
    "LineError",
    "LineRef",
    "check_every_line",
    "line_owner",
    "local_image",
]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_REMOTE_PREFIXES = ("http://", "https://", "data:")
_BOM = "\ufeff"


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


class IdRegistry:
    """The ids claimed so far in one reading of a batch file (sqlite temp tables).

    Temporary tables live in the connection's ``temp`` schema, on disk and private to
    the connection, so a million ids cost no memory. Writes join the connection's open
    transaction; nothing here needs to survive the process.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        db.executescript(
            """
            DROP TABLE IF EXISTS temp.claimed;
            DROP TABLE IF EXISTS temp.stems;
            CREATE TEMP TABLE claimed (
                id TEXT PRIMARY KEY, line INTEGER NOT NULL, mine INTEGER NOT NULL
            ) WITHOUT ROWID;
            CREATE TEMP TABLE stems (stem TEXT PRIMARY KEY, n INTEGER NOT NULL)
                WITHOUT ROWID;
            """
        )

    def claim(self, job_id: str, line: int, *, mine: bool = True) -> int | None:
        """Claim *job_id* for *line*; the earlier line that holds it, if one does.

        *mine*: the line belongs to this reader's part (a shard's jobs).
        """
        cursor = self._db.execute(
            "INSERT INTO temp.claimed (id, line, mine) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (job_id, line, mine),
        )
        if cursor.rowcount == 1:
            return None
        row = self._db.execute("SELECT line FROM temp.claimed WHERE id = ?", (job_id,)).fetchone()
        return int(row[0]) if row is not None else None

    def derive(self, stem: str, line: int, wants: Callable[[str], bool] | None = None) -> str:
        """The next free id for *stem* (``stem``, ``stem-2``, ...), claimed for *line*."""
        row = self._db.execute("SELECT n FROM temp.stems WHERE stem = ?", (stem,)).fetchone()
        count = (int(row[0]) if row is not None else 0) + 1
        while True:
            job_id = stem if count == 1 else f"{stem}-{count}"
            if self.claim(job_id, line, mine=wants is None or wants(job_id)) is None:
                break
            count += 1  # someone chose this very id by hand, earlier in the file
        self._db.execute(
            "INSERT INTO temp.stems (stem, n) VALUES (?, ?) "
            "ON CONFLICT (stem) DO UPDATE SET n = excluded.n",
            (stem, count),
        )
        return job_id

    def disown(self, job_id: str) -> None:
        """The line holding *job_id* turned out invalid: it is listed as such instead."""
        self._db.execute("UPDATE temp.claimed SET mine = 0 WHERE id = ?", (job_id,))


def local_image(entry: str, base: Path) -> Path | None:
    """The local file an ``image_urls`` string names (relative to *base*), or None if
    the string is a URL or data URI."""
    if entry.lower().startswith(_REMOTE_PREFIXES):
        return None
    return base / Path(entry).expanduser()


def line_owner(text: str) -> str:
    """What places an id-less broken line in a shard: a hash of its text."""
    return "line-" + hashlib.sha256(text.strip().encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class LineRef:
    """A line listed without its checks (after a stop): it was not run."""

    line: int
    id: str


class JobReader:
    """Every non-blank line of a batch file as a ``JobLine`` or ``LineError``, in order.

    Every line's id is claimed in *registry*; only lines whose id *wants* accepts
    (default: all) are checked and yielded, so a shard checks only its own jobs. Set
    ``check = False`` to go on through the rest of the file quickly (after a stop):
    wanted lines then come as ``LineRef`` (id only, no model check).
    """

    def __init__(
        self,
        path: Path,
        registry: IdRegistry,
        *,
        allow_unknown: bool = False,
        wants: Callable[[str], bool] | None = None,
    ) -> None:
        self.path = path
        self.check = True
        self.lines_read = 0
        self._registry = registry
        self._allow_unknown = allow_unknown
        self._wants = wants
        self._iter = self._read()

    def __iter__(self) -> Iterator[JobLine | LineError | LineRef]:
        return self._iter

    def close(self) -> None:
        """Close the file (also done when the end is reached)."""
        self._iter.close()

    def _read(self) -> Generator[JobLine | LineError | LineRef, None, None]:
        base = self.path.resolve().parent
        wants = self._wants
        with self.path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                self.lines_read = number
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    if wants is None or wants(line_owner(raw.decode("utf-8", "replace"))):
                        yield LineError(number, None, f"not valid UTF-8: {exc}")
                    continue
                if number == 1 and text.startswith(_BOM):
                    text = text[1:]
                if not text.strip():
                    continue
                item = _parse_line(number, text, self._registry, wants, needed=self.check)
                owner = item.id if item.id is not None else line_owner(text)
                if wants is not None and not wants(owner):
                    continue
                if isinstance(item, LineError):
                    yield item
                elif not self.check:
                    yield LineRef(number, item.id)
                else:
                    checked = _check(item, base, allow_unknown=self._allow_unknown)
                    if isinstance(checked, LineError):
                        self._registry.disown(item.id)
                    yield checked


@dataclass(slots=True)
class _Parsed:
    line: int
    id: str
    data: dict[str, Any]
    fingerprint: str


def _parse_line(
    number: int,
    text: str,
    registry: IdRegistry,
    wants: Callable[[str], bool] | None,
    *,
    needed: bool = True,
) -> _Parsed | LineError:
    # *needed*: the line's fingerprint is wanted even though it has an id (it is,
    # except when only ids are listed).
    try:
        value: object = json.loads(text)
    except ValueError as exc:
        return LineError(number, None, f"not valid JSON: {exc}")
    if not isinstance(value, dict):
        return LineError(
            number, None, f"expected a JSON object, got {type(value).__name__} (a request per line)"
        )
    data = cast("dict[str, Any]", value)
    raw_id = data.pop("id", None)
    fingerprint = ""
    if needed or raw_id is None:
        fingerprint = hashlib.sha256(
            json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        ).hexdigest()
    if raw_id is None:
        return _Parsed(
            number, registry.derive(f"job-{fingerprint[:12]}", number, wants), data, fingerprint
        )
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        raw_id = str(raw_id)
    if not isinstance(raw_id, str) or not _ID.match(raw_id):
        return LineError(
            number,
            None,
            f"id: must be 1-100 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit (got {raw_id!r})",
        )
    earlier = registry.claim(raw_id, number, mine=wants is None or wants(raw_id))
    if earlier is not None:
        return LineError(number, raw_id, f"id: {raw_id!r} is already used on line {earlier}")
    return _Parsed(number, raw_id, data, fingerprint)


def _check(item: _Parsed, base: Path, *, allow_unknown: bool) -> JobLine | LineError:
    data = item.data
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
                    item.line, item.id, f"image_urls[{i}]: image path {shown!r} not found{where}"
                )
            if not path.is_file():
                return LineError(
                    item.line, item.id, f"image_urls[{i}]: image path {shown!r} is not a file"
                )
            resolved.append(path)
        data["image_urls"] = resolved
    try:
        request = parse_request(data, allow_unknown=allow_unknown)
    except UnknownModelError as exc:
        known = str(exc).split("; known models", 1)[0]
        message = (
            f"model: {known}; see `apimart models`, or pass --allow-unknown-models to "
            "send it without local validation"
        )
        return LineError(item.line, item.id, message)
    except InvalidRequestError as exc:
        return LineError(item.line, item.id, str(exc))
    return JobLine(item.line, item.id, request, item.fingerprint)


def check_every_line(
    path: Path, *, allow_unknown: bool, wants: Callable[[str], bool] | None
) -> Iterator[JobLine | LineError | LineRef]:
    """Every line of *path* checked ahead of a run (``--strict``, ``--dry-run``), its
    ids claimed in a private temporary database, so memory stays flat however long
    the file and a run's own journal is not touched."""
    db = sqlite3.connect("")
    try:
        yield from JobReader(path, IdRegistry(db), allow_unknown=allow_unknown, wants=wants)
    finally:
        db.close()
