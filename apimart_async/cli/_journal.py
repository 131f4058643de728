"""The resumable journal of a batch: ``DIR/journal.sqlite3`` (stdlib sqlite3).

One row per job in ``jobs`` (its current state) and one row per state change in
``history`` (append-only, written by triggers on ``jobs``, so no task id is ever
forgotten, even after a retry). A job
gets its row when its first submit is about to be sent; a job without a row was never
sent. A job's states::

    submitting ──> submitted ──> completed ──> done
        │              │             └──> expired
        │              └──> failed (task failed or cancelled)
        └──> uncertain (the submit may or may not have created a task)
        └──> failed (the service refused the submit)
    failed ──> pending (retried under a new key; its history stays)

``submitting`` is written just before the submit request goes on the wire (with the
exact body), so a job found in it after a crash had its submit in flight: it is
treated as ``uncertain``.

Writes and durability: every write joins one open transaction, and ``commit()`` makes
everything so far durable at once. The batch commits at the two points that money
depends on, *before* they matter: a ``submitting`` row before its submit is sent, and
a task id as soon as the service answers; the other writes (completed, done, failed,
notes) ride along with the next commit or a periodic one, since losing them to a
crash costs only a repeated query or download, never a payment. With WAL and
``synchronous=NORMAL`` a commit survives ``kill -9`` (only a power cut may lose the
last ones). Sharded journals (``shared=True``) use a rollback journal, which works on a
network filesystem where WAL's shared memory does not.

Each row also keeps what ``results.jsonl`` reports beyond the state (schema 3): the
error's class, the service's code and request id, the task's result URLs and their
expiry, and its cost as the service reported it (``cost`` USD, ``credits_cost``).
Older journals are migrated in place when opened.

The journal is bound to the service it was made with (``meta``: the API origin,
whether it is the embedded fake, and an account fingerprint: a salted hash of the API
key, never the key), checked by ``_selfcheck`` before anything is sent. A lock file
next to the journal keeps two runs out of one folder; the kernel releases it when a
process dies, however it dies.

What can go wrong: a journal written by a newer schema, or a file that is not a
journal, raises ``JournalError``; a folder already in use raises ``JournalBusyError``;
once a write or commit fails (disk full, read-only filesystem), the journal is
``broken`` and every later write raises ``JournalWriteError`` at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any, Literal

from ._jobfile import IdRegistry

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from pathlib import Path

    from typing_extensions import Self

    from ._errors import ErrorFacts

__all__ = [
    "JOURNAL_NAME",
    "JobRecord",
    "Journal",
    "JournalBusyError",
    "JournalError",
    "JournalWriteError",
    "State",
    "read_meta",
    "remove",
]

JOURNAL_NAME = "journal.sqlite3"
LOCK_NAME = ".journal.lock"
SCHEMA_VERSION = 3

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
    updated_at TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    note TEXT,
    error_type TEXT,
    error_code TEXT,
    request_id TEXT,
    cost REAL,
    credits_cost REAL
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at TEXT NOT NULL,
    state TEXT NOT NULL,
    task_id TEXT,
    detail TEXT,
    key TEXT
);
"""
_MIGRATE_1_TO_2 = """
ALTER TABLE jobs ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN note TEXT;
ALTER TABLE history ADD COLUMN key TEXT;
"""
# Version 3: what results.jsonl reports about an error (its class, the service's code
# and request id) and what a task cost, as the service said.
_MIGRATE_2_TO_3 = """
ALTER TABLE jobs ADD COLUMN error_type TEXT;
ALTER TABLE jobs ADD COLUMN error_code TEXT;
ALTER TABLE jobs ADD COLUMN request_id TEXT;
ALTER TABLE jobs ADD COLUMN cost REAL;
ALTER TABLE jobs ADD COLUMN credits_cost REAL;
"""
# Every change of a job's state is logged by sqlite itself: one statement per change
# from Python instead of two (each call into sqlite costs a GIL hand-off while the
# download threads are busy). *note* says why (an error, "retry", "recovered").
_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS jobs_logged_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO history (job_id, at, state, task_id, detail, key) VALUES (
        NEW.id, NEW.updated_at, NEW.state, NEW.task_id, NEW.note,
        CASE WHEN NEW.state = 'submitting' THEN NEW.idempotency_key END);
END;
CREATE TRIGGER IF NOT EXISTS jobs_logged_update AFTER UPDATE OF updated_at ON jobs BEGIN
    INSERT INTO history (job_id, at, state, task_id, detail, key) VALUES (
        NEW.id, NEW.updated_at, NEW.state, NEW.task_id, NEW.note,
        CASE WHEN NEW.state = 'submitting' THEN NEW.idempotency_key END);
END;
"""
_RUN_TABLES = """
DROP TABLE IF EXISTS temp.invalid;
CREATE TEMP TABLE invalid (line INTEGER PRIMARY KEY, id TEXT, error TEXT NOT NULL);
"""


class JournalError(Exception):
    """The journal cannot be used (unreadable, damaged, or from a newer version)."""


class JournalBusyError(JournalError):
    """Another run holds the journal of this folder."""


class JournalWriteError(JournalError):
    """A journal write failed (disk full, read-only); nothing more can be recorded."""


_NO_ERROR: dict[str, Any] = {
    "error": None,
    "error_type": None,
    "error_code": None,
    "request_id": None,
}


def _error_columns(error: str, facts: ErrorFacts | None) -> dict[str, Any]:
    """The error columns for *error* (and what *facts* say about it)."""
    if facts is None:
        return {"error": error, "error_type": None, "error_code": None, "request_id": None}
    return {
        "error": error,
        "error_type": facts.type,
        "error_code": json.dumps(facts.code) if facts.code is not None else None,
        "request_id": facts.request_id,
    }


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
    generation: int = 0
    """Retries after failure so far (part of the job's derived idempotency key)."""
    error_type: str | None = None
    """The class of the error in *error* (``TaskFailedError``, ...)."""
    error_code: int | str | None = None
    """The service's code for it, when it gave one."""
    request_id: str | None = None
    """The service's request id for it, when it gave one."""
    cost: float | None = None
    """What the task cost in USD, as the service reported (None: not said)."""
    credits_cost: float | None = None
    """The same in the service's credits."""

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
            generation=row["generation"],
            error_type=row["error_type"],
            error_code=json.loads(row["error_code"]) if row["error_code"] else None,
            request_id=row["request_id"],
            cost=row["cost"],
            credits_cost=row["credits_cost"],
        )


def _connect(path: Path) -> sqlite3.Connection:
    """The journal's connection (a seam: tests swap in a failing one)."""
    return sqlite3.connect(path, check_same_thread=False)


class Journal:
    """The journal of one output folder; use ``Journal.open(directory)`` as a context."""

    def __init__(self, db: sqlite3.Connection, lock: IO[bytes] | None, path: Path) -> None:
        self._db = db
        self._lock = lock
        self.path = path
        self.directory = path.parent
        self.broken: BaseException | None = None
        """The error that broke the journal (no write is attempted after it)."""
        self._writes = 0  # uncommitted writes

    @classmethod
    def open(cls, directory: Path, *, shared: bool = False) -> Self:
        """Open (or create) ``directory/journal.sqlite3`` and lock the folder.

        *shared*: the folder may be on a network filesystem (a sharded batch): use a
        rollback journal rather than WAL.
        """
        directory.mkdir(parents=True, exist_ok=True)
        lock = _lock(directory / LOCK_NAME)
        path = directory / JOURNAL_NAME
        try:
            db = _connect(path)
            try:
                db.row_factory = sqlite3.Row
                db.execute(f"PRAGMA journal_mode={'TRUNCATE' if shared else 'WAL'}")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA wal_autocheckpoint=10000")
                db.execute("PRAGMA busy_timeout=5000")
                version = _schema_version(db)
                if version is not None:
                    _read_through(db)
                if version is not None and version > SCHEMA_VERSION:
                    raise JournalError(
                        f"{path} was written by a newer apimart (schema {version}); "
                        "upgrade apimart-async or use another --out folder"
                    )
                with db:
                    db.executescript(_SCHEMA if version is None else "")
                    if version == 1:
                        db.executescript(_MIGRATE_1_TO_2)
                    if version in (1, 2):
                        db.executescript(_MIGRATE_2_TO_3)
                    db.executescript(_TRIGGERS)
                    if version is None:
                        _set_meta(db, "created_at", _now())
                        _set_meta(db, "journal_id", uuid.uuid4().hex)
                    _set_meta(db, "schema_version", str(SCHEMA_VERSION))
                db.executescript(_RUN_TABLES)
                return cls(db, lock, path)
            except BaseException:
                db.close()
                raise
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
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
        """Commit what can be, close the database, release the folder. Safe twice."""
        with contextlib.suppress(sqlite3.Error, JournalError):
            self.commit()
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        _unlock(self._lock)
        self._lock = None

    # -- reading --------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        """The record of *job_id*, if the journal has one."""
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobRecord._from_row(row)

    def __getitem__(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record is None:
            raise KeyError(job_id)
        return record

    def meta(self, key: str) -> str | None:
        """A value from the ``meta`` table."""
        return _meta(self._db, key)

    def set_meta(self, key: str, value: str) -> None:
        """Set a value in the ``meta`` table (with the next commit)."""
        self._run(lambda: _set_meta(self._db, key, value))

    def states(self, job_ids: Iterable[str]) -> dict[str, State]:
        """The state of each of *job_ids* that has a row (looked up in chunks)."""
        found: dict[str, State] = {}
        ids = list(job_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT id, state FROM jobs WHERE id IN ({marks})", chunk)
            found.update((str(job_id), state) for job_id, state in rows)
        return found

    def count(self) -> int:
        """How many jobs have a row."""
        return int(self._db.execute("SELECT count(*) FROM jobs").fetchone()[0])

    def task_ids(self, job_id: str) -> set[str]:
        """Every task id the journal ever recorded for *job_id* (history included)."""
        rows = self._db.execute(
            "SELECT task_id FROM history WHERE job_id = ? AND task_id IS NOT NULL "
            "UNION SELECT task_id FROM jobs WHERE id = ? AND task_id IS NOT NULL",
            (job_id, job_id),
        )
        return {str(row[0]) for row in rows}

    # -- this run's lines (temporary tables, gone when the journal closes) ----------

    def registry(self) -> IdRegistry:
        """An id registry for reading the batch file, in this connection's temp tables."""
        return IdRegistry(self._db)

    def see_invalid(self, line: int, job_id: str | None, error: str) -> None:
        """Note an invalid line of this run's batch file (for results)."""
        self._db.execute(
            "INSERT OR REPLACE INTO temp.invalid VALUES (?, ?, ?)", (line, job_id, error)
        )

    def lines(self) -> Iterator[tuple[int, str | None, str | None, JobRecord | None]]:
        """This run's lines of this folder, in file order: ``(line, id, line error,
        record or None)``; the valid ones are the ids the registry claimed as mine."""
        cursor = self._db.execute(
            "SELECT l.line AS l_line, l.id AS l_id, l.error AS l_error, j.* FROM ("
            "SELECT line, id, NULL AS error FROM temp.claimed WHERE mine "
            "UNION ALL SELECT line, id, error FROM temp.invalid) AS l "
            "LEFT JOIN jobs AS j ON j.id = l.id AND l.error IS NULL ORDER BY l.line"
        )
        for row in cursor:
            record = JobRecord._from_row(row) if row["id"] is not None else None
            yield row["l_line"], row["l_id"], row["l_error"], record

    # -- writing --------------------------------------------------------------------

    def commit(self) -> None:
        """Make every write so far durable (one transaction)."""
        if self.broken is not None:
            raise JournalWriteError(f"the journal cannot be written: {self.broken}")
        try:
            self._db.commit()
        except sqlite3.Error as exc:
            self.broken = exc
            raise JournalWriteError(f"cannot write the journal {self.path}: {exc}") from exc
        self._writes = 0

    @property
    def uncommitted(self) -> int:
        """Writes since the last commit."""
        return self._writes

    def submitting(
        self,
        job_id: str,
        *,
        line: int,
        fingerprint: str,
        key: str,
        body: str,
        generation: int,
    ) -> None:
        """A submit under *key* carrying *body* is about to be sent (commit before it is)."""
        now = _now()

        self._run(
            lambda: self._db.execute(
                "INSERT INTO jobs (id, line, fingerprint, idempotency_key, state, "
                "request_body, attempts, generation, updated_at) "
                "VALUES (?, ?, ?, ?, 'submitting', ?, 1, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "line = excluded.line, fingerprint = excluded.fingerprint, "
                "idempotency_key = excluded.idempotency_key, state = 'submitting', "
                "request_body = excluded.request_body, attempts = attempts + 1, "
                "generation = excluded.generation, error = NULL, note = NULL, "
                "updated_at = excluded.updated_at",
                (job_id, line, fingerprint, key, body, generation, now),
            )
        )

    def submitted(self, job_id: str, task_id: str) -> None:
        """The service created task *task_id* for the job (commit at once)."""
        self._change(job_id, "submitted", task_id=task_id, **_NO_ERROR)

    def completed(
        self,
        job_id: str,
        task_id: str,
        urls: Sequence[str],
        expires_at: datetime | None,
        *,
        cost: float | None = None,
        credits_cost: float | None = None,
    ) -> None:
        """The task completed; its result URLs are valid until *expires_at*."""
        self._change(
            job_id,
            "completed",
            task_id=task_id,
            image_urls=json.dumps(list(urls)) if urls else None,
            expires_at=expires_at.isoformat() if expires_at else None,
            cost=cost,
            credits_cost=credits_cost,
            **_NO_ERROR,
        )

    def done(self, job_id: str, files: Sequence[str]) -> None:
        """Every image of the job is in the output folder as *files*."""
        self._change(job_id, "done", files=json.dumps(list(files)) if files else None, **_NO_ERROR)

    def failed(
        self,
        job_id: str,
        error: str,
        task_id: str | None = None,
        *,
        facts: ErrorFacts | None = None,
        cost: float | None = None,
        credits_cost: float | None = None,
    ) -> None:
        """The job failed for good this run (a rerun retries it with a new key)."""
        columns = _error_columns(error, facts)
        if task_id is not None:
            columns.update(task_id=task_id, cost=cost, credits_cost=credits_cost)
        self._change(job_id, "failed", detail=error, **columns)

    def uncertain(
        self, job_id: str, error: str, body: str | None, *, facts: ErrorFacts | None = None
    ) -> None:
        """The submit may or may not have created a task; the key is kept."""
        columns = _error_columns(error, facts)
        if body is not None:
            columns["request_body"] = body
        self._change(job_id, "uncertain", detail=error, **columns)

    def expired(self, job_id: str, error: str, *, facts: ErrorFacts | None = None) -> None:
        """The results expired before they were downloaded."""
        self._change(job_id, "expired", detail=error, **_error_columns(error, facts))

    def note_error(self, job_id: str, error: str, *, facts: ErrorFacts | None = None) -> None:
        """Record *error* without changing the state (a timeout, a failed download)."""
        self._change(job_id, None, detail=error, **_error_columns(error, facts))

    def seen(self, job_id: str, *, line: int, fingerprint: str) -> None:
        """Note the job's current line and request fingerprint (no state change)."""
        self._run(
            lambda: self._db.execute(
                "UPDATE jobs SET line = ?, fingerprint = ? WHERE id = ?",
                (line, fingerprint, job_id),
            )
        )

    def retry(self, job_id: str) -> int:
        """Make a failed job ``pending`` again, one generation on; return the generation."""
        record = self[job_id]
        generation = record.generation + 1
        self._change(
            job_id,
            "pending",
            detail="retry",
            generation=generation,
            task_id=None,
            request_body=None,
            image_urls=None,
            expires_at=None,
            files=None,
            cost=None,
            credits_cost=None,
            **_NO_ERROR,
        )
        return generation

    def adopt(
        self,
        job_id: str,
        *,
        state: State,
        task_id: str | None,
        files: Sequence[str] = (),
        key: str = "",
        detail: str,
    ) -> None:
        """Record what a rebuild or a recovery file knows about a job (a new row if none)."""
        now = _now()

        self._run(
            lambda: self._db.execute(
                "INSERT INTO jobs (id, line, fingerprint, idempotency_key, state, task_id, "
                "files, note, updated_at) VALUES (?, 0, '', ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, "
                "task_id = excluded.task_id, files = coalesce(excluded.files, files), "
                "note = excluded.note, updated_at = excluded.updated_at",
                (
                    job_id,
                    key,
                    state,
                    task_id,
                    json.dumps(list(files)) if files else None,
                    detail,
                    now,
                ),
            )
        )

    def _change(
        self, job_id: str, state: State | None, *, detail: str | None = None, **columns: Any
    ) -> None:
        # One UPDATE; the trigger logs it in history.
        if state is not None:
            columns["state"] = state
        columns["note"] = detail
        columns["updated_at"] = _now()
        assignments = ", ".join(f"{name} = ?" for name in columns)
        sql = f"UPDATE jobs SET {assignments} WHERE id = ?"
        self._run(lambda: self._db.execute(sql, (*columns.values(), job_id)))

    def _run(self, write: Callable[[], object]) -> None:
        if self.broken is not None:
            raise JournalWriteError(f"the journal cannot be written: {self.broken}")
        try:
            write()
        except sqlite3.Error as exc:
            self.broken = exc
            raise JournalWriteError(f"cannot write the journal {self.path}: {exc}") from exc
        self._writes += 1


def remove(directory: Path) -> None:
    """Delete the journal files of *directory* (the demo starts afresh each time)."""
    for name in (
        JOURNAL_NAME,
        f"{JOURNAL_NAME}-wal",
        f"{JOURNAL_NAME}-shm",
        f"{JOURNAL_NAME}-journal",
    ):
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


def _schema_version(db: sqlite3.Connection) -> int | None:
    """The journal's schema version; None for a new (empty) database."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "meta" not in tables:
        if tables:
            raise sqlite3.DatabaseError(
                f"not an apimart journal (tables: {', '.join(sorted(tables))})"
            )
        return None
    version = _meta(db, "schema_version")
    return 1 if version is None else int(version)


def _meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _read_through(db: sqlite3.Connection) -> None:
    """Check the file and read every row once, so that a damaged page or a byte that is
    not UTF-8 is found when the journal is opened, before anything is sent, and not
    in the middle of a run. O(rows): a few seconds per million rows, paid when a batch
    resumes (a new journal is empty)."""
    verdict = db.execute("PRAGMA quick_check").fetchone()[0]
    if verdict != "ok":
        raise sqlite3.DatabaseError(f"integrity check failed: {verdict}")
    for table in ("meta", "jobs", "history"):
        cursor = db.execute(f"SELECT * FROM {table}")
        while cursor.fetchmany(4096):
            pass


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
