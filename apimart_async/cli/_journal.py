"""The resumable journal of a batch: ``DIR/journal.sqlite3`` (stdlib sqlite3, WAL).

One row per job in ``jobs`` (its current state) and one row per state change in
``history`` (append-only, so no task id is ever forgotten, even after a retry). Every
change is one transaction, committed before the batch takes its next step; with WAL and
``synchronous=NORMAL`` a committed change survives ``kill -9`` (only a power cut may lose
the last ones). A job's states::

    pending ──> submitting ──> submitted ──> completed ──> done
                    │              │             └──> expired
                    │              └──> failed (task failed or cancelled)
                    └──> uncertain (the submit may or may not have created a task)
                    └──> failed (the service refused the submit)

``submitting`` is written just before the submit request goes on the wire (with the
exact body), so a job found in it after a crash had its submit in flight: it is
treated as ``uncertain``. A lock file next to the journal keeps two runs out of one
folder; the kernel releases it when a process dies, however it dies.

What can go wrong: a journal written by a newer schema is refused rather than
misread; a folder already in use raises ``JournalBusyError``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from typing_extensions import Self

__all__ = [
    "JOURNAL_NAME",
    "JobRecord",
    "Journal",
    "JournalBusyError",
    "JournalError",
    "State",
    "new_key",
    "read_meta",
    "remove",
]

JOURNAL_NAME = "journal.sqlite3"
LOCK_NAME = ".journal.lock"
SCHEMA_VERSION = 1

State = Literal[
    "pending", "submitting", "submitted", "completed", "done", "failed", "uncertain", "expired"
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    line INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    state TEXT NOT NULL,
    task_id TEXT,
    request_body TEXT,
    image_urls TEXT,
    expires_at TEXT,
    files TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at TEXT NOT NULL,
    state TEXT NOT NULL,
    task_id TEXT,
    detail TEXT
);
"""
_COLUMNS = (
    "line",
    "fingerprint",
    "idempotency_key",
    "state",
    "task_id",
    "request_body",
    "image_urls",
    "expires_at",
    "files",
    "error",
    "attempts",
    "updated_at",
)


class JournalError(Exception):
    """The journal cannot be used (unreadable, or from a newer version)."""


class JournalBusyError(JournalError):
    """Another run holds the journal of this folder."""


def new_key() -> str:
    """A fresh idempotency key for one logical submit (1-191 visible ASCII)."""
    return f"apimart-cli-{uuid.uuid4().hex}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job as the journal last recorded it."""

    id: str
    line: int
    fingerprint: str
    idempotency_key: str
    state: State
    task_id: str | None = None
    request_body: str | None = None
    """The JSON body of the last submit sent (so a resubmit sends the same bytes)."""
    image_urls: tuple[str, ...] = ()
    expires_at: datetime | None = None
    files: tuple[str, ...] = ()
    """File names in the output folder."""
    error: str | None = None
    attempts: int = 0
    """Submits started for this job (across retries of failed jobs)."""
    updated_at: str = ""

    def _row(self) -> tuple[Any, ...]:
        return (
            self.line,
            self.fingerprint,
            self.idempotency_key,
            self.state,
            self.task_id,
            self.request_body,
            json.dumps(list(self.image_urls)) if self.image_urls else None,
            self.expires_at.isoformat() if self.expires_at else None,
            json.dumps(list(self.files)) if self.files else None,
            self.error,
            self.attempts,
            self.updated_at,
        )

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> JobRecord:
        expires = row["expires_at"]
        return cls(
            id=row["id"],
            line=row["line"],
            fingerprint=row["fingerprint"],
            idempotency_key=row["idempotency_key"],
            state=row["state"],
            task_id=row["task_id"],
            request_body=row["request_body"],
            image_urls=tuple(json.loads(row["image_urls"] or "[]")),
            expires_at=datetime.fromisoformat(expires) if expires else None,
            files=tuple(json.loads(row["files"] or "[]")),
            error=row["error"],
            attempts=row["attempts"],
            updated_at=row["updated_at"],
        )


class Journal:
    """The journal of one output folder; use ``Journal.open(directory)`` as a context."""

    def __init__(self, db: sqlite3.Connection, lock: IO[bytes] | None, path: Path) -> None:
        self._db = db
        self._lock = lock
        self.path = path
        self._jobs: dict[str, JobRecord] = {
            row["id"]: JobRecord._from_row(row) for row in db.execute("SELECT * FROM jobs")
        }

    @classmethod
    def open(cls, directory: Path) -> Self:
        """Open (or create) ``directory/journal.sqlite3`` and lock the folder."""
        directory.mkdir(parents=True, exist_ok=True)
        lock = _lock(directory / LOCK_NAME)
        path = directory / JOURNAL_NAME
        try:
            db = sqlite3.connect(path)
            try:
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA wal_autocheckpoint=10000")
                db.execute("PRAGMA busy_timeout=5000")
                with db:
                    db.executescript(_SCHEMA)
                    version = _meta(db, "schema_version")
                    if version is None:
                        _set_meta(db, "schema_version", str(SCHEMA_VERSION))
                        _set_meta(db, "created_at", _now())
                    elif int(version) > SCHEMA_VERSION:
                        raise JournalError(
                            f"{path} was written by a newer apimart (schema {version}); "
                            "upgrade apimart-async or use another --out folder"
                        )
                return cls(db, lock, path)
            except BaseException:
                db.close()
                raise
        except sqlite3.DatabaseError as exc:
            _unlock(lock)
            raise JournalError(f"cannot use the journal {path}: {exc}") from exc
        except BaseException:
            _unlock(lock)
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database and release the folder. Safe to call twice."""
        self._db.close()
        _unlock(self._lock)
        self._lock = None

    # -- reading --------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        """The record of *job_id*, if the journal has one."""
        return self._jobs.get(job_id)

    def __getitem__(self, job_id: str) -> JobRecord:
        return self._jobs[job_id]

    def meta(self, key: str) -> str | None:
        """A value from the ``meta`` table."""
        return _meta(self._db, key)

    def set_meta(self, key: str, value: str) -> None:
        """Set a value in the ``meta`` table (committed)."""
        with self._db:
            _set_meta(self._db, key, value)

    # -- writing (each call is one committed transaction) ---------------------------

    def add(self, jobs: Sequence[tuple[str, int, str]]) -> None:
        """Record new jobs ``(id, line, fingerprint)`` as ``pending``, each with a fresh
        idempotency key, in one transaction."""
        now = _now()
        records = [
            JobRecord(
                id=job_id,
                line=line,
                fingerprint=fingerprint,
                idempotency_key=new_key(),
                state="pending",
                updated_at=now,
            )
            for job_id, line, fingerprint in jobs
        ]
        placeholders = ", ".join("?" * (len(_COLUMNS) + 1))
        with self._db:
            self._db.executemany(
                f"INSERT INTO jobs (id, {', '.join(_COLUMNS)}) VALUES ({placeholders})",
                [(r.id, *r._row()) for r in records],
            )
            for record in records:
                self._log(record, "new")
        self._jobs.update((r.id, r) for r in records)

    def seen(self, job_id: str, *, line: int, fingerprint: str) -> JobRecord:
        """Note the job's current line and request fingerprint (no state change)."""
        record = self._jobs[job_id]
        if record.line == line and record.fingerprint == fingerprint:
            return record
        return self._write(replace(record, line=line, fingerprint=fingerprint), None)

    def submitting(self, job_id: str, body: str) -> JobRecord:
        """A submit with this job's key is about to go on the wire, carrying *body*."""
        record = self._jobs[job_id]
        if record.state == "submitting" and record.request_body == body:
            return record  # a retry of the same submit: nothing new to record
        return self._write(
            replace(
                record,
                state="submitting",
                request_body=body,
                attempts=record.attempts + (record.state != "submitting"),
                error=None,
            ),
            None,
        )

    def submitted(self, job_id: str, task_id: str) -> JobRecord:
        """The service created task *task_id* for the job."""
        record = self._jobs[job_id]
        return self._write(replace(record, state="submitted", task_id=task_id, error=None), None)

    def completed(
        self, job_id: str, task_id: str, urls: Sequence[str], expires_at: datetime | None
    ) -> JobRecord:
        """The task completed; its result URLs are valid until *expires_at*."""
        record = self._jobs[job_id]
        return self._write(
            replace(
                record,
                state="completed",
                task_id=task_id,
                image_urls=tuple(urls),
                expires_at=expires_at,
                error=None,
            ),
            None,
        )

    def done(self, job_id: str, files: Sequence[str]) -> JobRecord:
        """Every image of the job is in the output folder as *files*."""
        record = self._jobs[job_id]
        return self._write(replace(record, state="done", files=tuple(files), error=None), None)

    def failed(self, job_id: str, error: str, task_id: str | None = None) -> JobRecord:
        """The job failed for good this run (a rerun retries it with a new key)."""
        record = self._jobs[job_id]
        return self._write(
            replace(record, state="failed", task_id=task_id or record.task_id, error=error),
            error,
        )

    def uncertain(self, job_id: str, error: str, body: str | None) -> JobRecord:
        """The submit may or may not have created a task; the key is kept."""
        record = self._jobs[job_id]
        return self._write(
            replace(
                record, state="uncertain", error=error, request_body=body or record.request_body
            ),
            error,
        )

    def expired(self, job_id: str, error: str) -> JobRecord:
        """The results expired before they were downloaded."""
        record = self._jobs[job_id]
        return self._write(replace(record, state="expired", error=error), error)

    def note_error(self, job_id: str, error: str) -> JobRecord:
        """Record *error* without changing the state (a timeout, a failed download)."""
        record = self._jobs[job_id]
        return self._write(replace(record, error=error), error)

    def retry(self, job_id: str) -> JobRecord:
        """Make a failed job ``pending`` again under a fresh key (its history stays)."""
        record = self._jobs[job_id]
        return self._write(
            replace(
                record,
                state="pending",
                idempotency_key=new_key(),
                task_id=None,
                request_body=None,
                image_urls=(),
                expires_at=None,
                files=(),
                error=None,
            ),
            "retry",
        )

    def _write(self, record: JobRecord, detail: str | None) -> JobRecord:
        record = replace(record, updated_at=_now())
        assignments = ", ".join(f"{c} = ?" for c in _COLUMNS)
        with self._db:
            self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?", (*record._row(), record.id)
            )
            self._log(record, detail)
        self._jobs[record.id] = record
        return record

    def _log(self, record: JobRecord, detail: str | None) -> None:
        self._db.execute(
            "INSERT INTO history (job_id, at, state, task_id, detail) VALUES (?, ?, ?, ?, ?)",
            (record.id, record.updated_at, record.state, record.task_id, detail),
        )


def remove(directory: Path) -> None:
    """Delete the journal files of *directory* (the demo starts afresh each time)."""
    for name in (JOURNAL_NAME, f"{JOURNAL_NAME}-wal", f"{JOURNAL_NAME}-shm"):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()


def read_meta(directory: Path, key: str) -> str | None:
    """A meta value of the journal in *directory*, read-only (None if there is none)."""
    path = directory / JOURNAL_NAME
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.DatabaseError:
        return None
    try:
        return _meta(db, key)
    except sqlite3.DatabaseError:
        return None
    finally:
        db.close()


def _meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _lock(path: Path) -> IO[bytes] | None:
    """An exclusive lock on *path*, held while the returned file is open (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, one run at a time by hand
        return None
    handle = path.open("a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise JournalBusyError(
            f"another apimart run is using {path.parent} (its journal is locked); "
            "wait for it to finish or choose another --out folder"
        ) from None
    with contextlib.suppress(OSError):
        handle.truncate(0)
        handle.write(str(os.getpid()).encode())
        handle.flush()
    return handle


def _unlock(handle: IO[bytes] | None) -> None:
    if handle is not None:
        handle.close()
