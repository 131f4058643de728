"""Before anything is sent: is this folder's journal ours, and is it whole?

A batch folder's journal is what keeps a rerun from paying twice, so a batch never
trusts it blindly:

* **Bound to one service.** The journal records the service it was made with: the API
  origin, whether it is the embedded fake, and an account fingerprint (a salted
  SHA-256 of the API key, 16 hex digits; never the key). A run against another service
  is refused (exit status 3): a ``--fake`` trial run and a real run never share a
  folder, in either order. ``--same-account`` accepts a new API key or origin for the
  same account (a rotated key, a moved endpoint); fake and real are never mixed.
* **Whole.** A journal that is missing, empty (zero bytes) or damaged, in a folder that
  holds results (``results.jsonl``, result images, a recovery file), is refused with
  the ways to recover, and so is a journal that knows less than the folder's
  ``results.jsonl`` or its result images (partly dropped: say, its ``-wal`` file was
  lost after a ``kill -9``, before ``results.jsonl`` was rewritten). Every row is read
  once when the journal opens, so damage is found there, not halfway through a run.
  Starting over there could pay again for every job already done.
  ``--rebuild-journal`` rebuilds it from what the folder holds, before any submit:
  ``results.jsonl`` (task ids, done jobs whose files are present), the result images
  (``<id>_<n>.<ext>``) and the recovery files; a damaged file is kept aside as
  ``journal.sqlite3.damaged-<time>``. Jobs found nowhere are submitted again, under
  their derived idempotency keys.
* **Recovered task ids come back.** When a journal write fails mid-run, the batch
  writes every task id it could not record to ``recovered-task-ids.txt`` (in the
  folder, else the working directory, else the temporary directory). The next run
  adopts them (only those written for this very journal) before anything is sent, so
  those jobs are waited for by task id, never paid again.

What can go wrong: ``JournalRefused`` (exit status 3) says what does not match and how
to proceed; nothing has been sent when it is raised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._journal import JOURNAL_NAME, Journal, JournalBusyError, JournalError, State

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = [
    "EXIT_JOURNAL_FAILED",
    "EXIT_REFUSED",
    "RECOVERY_NAME",
    "RESULTS_NAME",
    "RESULTS_STAMP",
    "RESULT_FIELDS",
    "JournalRefused",
    "Service",
    "bind",
    "check_results",
    "folder_evidence",
    "open_checked",
    "results_stamp",
    "write_recovery",
]

EXIT_REFUSED = 3
"""The folder's journal belongs to another service, or is damaged: nothing was sent."""
EXIT_JOURNAL_FAILED = 4
"""A journal write failed mid-run: submits stopped, task ids written to a recovery file."""
RESULTS_NAME = "results.jsonl"
RESULT_FIELDS = (
    "line",
    "id",
    "status",
    "task_id",
    "files",
    "urls",
    "expires_at",
    "cost",
    "credits_cost",
    "error",
    "error_type",
    "error_code",
    "request_id",
)
"""The keys of every ``results.jsonl`` record, in order (``apimart merge`` adds ``shard``)."""
RESULTS_STAMP = "results_stamp"
"""Meta key: ``results_stamp()`` of the results.jsonl the journal last wrote."""
RECOVERY_NAME = "recovered-task-ids.txt"
_IMAGE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)_(\d+)\.(png|jpg|webp|gif)$")
_MAX_LISTED = 5


class JournalRefused(Exception):
    """The folder's journal cannot be trusted for this run (exit status 3)."""


@dataclass(frozen=True, slots=True)
class Service:
    """The service a run talks to: what a journal is bound to."""

    kind: Literal["api", "fake"]
    url: str
    key: str = field(repr=False)
    """The API key: only ever hashed with the journal's salt, never stored or shown."""

    def describe(self) -> str:
        """How a message names it."""
        if self.kind == "fake":
            return "the built-in fake service (--fake)"
        return f"APIMart at {self.url}"

    def fingerprint(self, salt: str) -> str:
        """The account fingerprint under *salt*."""
        return hashlib.sha256(f"{salt}\0{self.key}".encode()).hexdigest()[:16]


def _describe(kind: str, url: str) -> str:
    return "the built-in fake service (--fake)" if kind == "fake" else f"APIMart at {url}"


def bind(journal: Journal, service: Service, *, same_account: bool) -> str | None:
    """Check (or record) the service *journal* belongs to; a note if it was rebound.

    Raises ``JournalRefused`` when the journal was made with another service.
    """
    kind = journal.meta("service_kind")
    url = journal.meta("service_url") or ""
    folder = journal.directory
    if kind is None:
        if journal.count() and not same_account:
            raise JournalRefused(
                f"{folder} holds a journal from an older apimart that did not record which "
                f"service it belongs to. If it was made with {service.describe()} and this "
                "account, rerun with --same-account; a trial run against the fake service "
                "must not be resumed for real: use another --out folder"
            )
        _record(journal, service)
        return (
            "bound an older journal to this service (--same-account)" if journal.count() else None
        )
    if kind != service.kind:
        trial = kind == "fake"
        raise JournalRefused(
            f"{folder} holds a batch run against {_describe(kind, url)}, and this run uses "
            f"{service.describe()}. "
            + (
                "Its images and task ids are not real. Use another --out folder for the real "
                f"run (or delete {folder} to start over)."
                if trial
                else "Run the trial with another --out folder; this folder's journal keeps "
                "the real batch from being paid twice."
            )
        )
    problems: list[str] = []
    if url != service.url:
        problems.append(f"its API origin was {url}, this run uses {service.url}")
    salt = journal.meta("account_salt") or ""
    if journal.meta("account_hash") != service.fingerprint(salt):
        problems.append("it was made with another API key (account fingerprint differs)")
    if not problems:
        return None
    if service.kind == "api" and same_account:
        _record(journal, service)
        return "journal rebound to this API key and origin (--same-account): " + "; ".join(problems)
    hint = (
        "If it is the same account (a rotated key, a moved endpoint), rerun with "
        "--same-account; otherwise use another --out folder."
        if service.kind == "api"
        else "Use the same fake settings or another --out folder."
    )
    raise JournalRefused(
        f"{folder}'s journal belongs to another service: {'; '.join(problems)}. {hint}"
    )


def _record(journal: Journal, service: Service) -> None:
    salt = secrets.token_hex(8)
    journal.set_meta("service_kind", service.kind)
    journal.set_meta("service_url", service.url)
    journal.set_meta("account_salt", salt)
    journal.set_meta("account_hash", service.fingerprint(salt))
    journal.commit()


# -- is the journal whole? -----------------------------------------------------------


def folder_evidence(directory: Path) -> list[str]:
    """What in *directory* shows that a batch already ran there (results, images)."""
    found: list[str] = []
    results = directory / RESULTS_NAME
    with contextlib.suppress(OSError):
        if results.stat().st_size > 0:
            found.append(RESULTS_NAME)
    found.extend(str(path) for path in recovery_paths(directory) if path.is_file())
    images = 0
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            if _IMAGE.match(entry.name):
                images += 1
                if images > _MAX_LISTED:
                    break
    if images:
        found.append(
            f"result images such as *_0.png ({images}{'+' if images > _MAX_LISTED else ''})"
        )
    return found


def open_checked(
    directory: Path, *, shared: bool, rebuild: bool, fresh_ok: bool
) -> tuple[Journal, bool]:
    """Open the folder's journal; refuse a missing, empty or damaged one where results
    exist, unless *rebuild*. Returns the journal and whether it must be rebuilt.

    *fresh_ok*: starting afresh is fine whatever the folder holds (the demo).
    """
    path = directory / JOURNAL_NAME
    problem: str | None = None
    if not path.exists():
        problem = "missing"
    elif path.stat().st_size == 0:
        problem = "empty (zero bytes)"
    if problem is not None:
        evidence = [] if fresh_ok else folder_evidence(directory)
        if evidence and not rebuild:
            raise JournalRefused(_lost_message(directory, problem, evidence))
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == 0:
                _set_aside(path)
        return Journal.open(directory, shared=shared), bool(evidence)
    try:
        journal = Journal.open(directory, shared=shared)
    except JournalBusyError:
        raise
    except JournalError as exc:
        if "newer apimart" in str(exc):
            raise
        if not rebuild:
            evidence = folder_evidence(directory)
            raise JournalRefused(
                _lost_message(directory, f"damaged ({exc.__cause__ or exc})", evidence)
            ) from None
        _set_aside(path)
        return Journal.open(directory, shared=shared), True
    return journal, rebuild


def _lost_message(directory: Path, problem: str, evidence: Sequence[str]) -> str:
    held = f" but the folder holds {', '.join(evidence)}" if evidence else ""
    return (
        f"the journal {directory / JOURNAL_NAME} is {problem}{held}. Starting over could "
        "pay again for jobs already submitted. To recover: restore the journal (with its "
        "-wal file) from a backup, or rerun with --rebuild-journal to rebuild it from "
        "results.jsonl, the images and any recovery file (jobs found in none of them are "
        "submitted again, under their derived idempotency keys), or use another --out "
        "folder."
    )


def _set_aside(path: Path) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for suffix in ("", "-wal", "-shm", "-journal"):
        source = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            source.rename(path.with_name(f"{path.name}{suffix}.damaged-{stamp}"))


def _results(directory: Path) -> Iterator[dict[str, Any]]:
    path = directory / RESULTS_NAME
    try:
        fh = path.open(encoding="utf-8")
    except OSError:
        return
    with fh:
        for text in fh:
            with contextlib.suppress(ValueError):
                row: object = json.loads(text)
                if isinstance(row, dict):
                    yield row


def check_results(journal: Journal, *, rebuild: bool, images: bool = True) -> list[str]:
    """Compare the journal with the folder's ``results.jsonl``, recovery files and
    images (unless not *images*: the demo may start afresh over old ones); adopt what
    it lacks when *rebuild*, else refuse. Returns notes.

    Recovered task ids written for this journal are always adopted (that is what the
    recovery file is for).
    """
    notes: list[str] = []
    directory = journal.directory
    adopted = _adopt_recovered(journal)
    if adopted:
        notes.append(f"adopted {adopted} task id(s) from a recovery file: waiting for them by id")
    if images and not rebuild:
        _refuse_if_images_outrun(journal)
    behind: list[str] = []
    rebuilt = 0
    if not rebuild and journal.meta(RESULTS_STAMP) == results_stamp(directory):
        # The journal committed this very results.jsonl after writing it, so it holds
        # everything the file records: no need to read a million lines again. A journal
        # that lost commits (a dropped -wal) lost this stamp too and is checked in full.
        journal.commit()
        return notes
    for row in _results(directory):
        job_id, task_id, status = row.get("id"), row.get("task_id"), row.get("status")
        if not isinstance(job_id, str) or status in (None, "pending", "invalid"):
            continue
        known = journal.task_ids(job_id)
        record = journal.get(job_id)
        if (isinstance(task_id, str) and task_id in known) or (task_id is None and record):
            continue
        if not rebuild:
            behind.append(job_id)
            continue
        listed: list[object] = row.get("files") or []
        files = [f for f in listed if isinstance(f, str)]
        if status == "done" and files and all((directory / f).is_file() for f in files):
            journal.adopt(job_id, state="done", task_id=task_id, files=files, detail="rebuilt")
        elif isinstance(task_id, str):
            state: State = "failed" if status in ("failed", "expired") else "submitted"
            journal.adopt(job_id, state=state, task_id=task_id, detail="rebuilt")
        else:
            journal.adopt(job_id, state="uncertain", task_id=None, detail="rebuilt")
        rebuilt += 1
    if behind:
        raise JournalRefused(
            f"the journal {journal.path} knows less than {directory / RESULTS_NAME}: "
            f"{len(behind)} job(s) recorded there are missing from it ({_some(behind)}); it was "
            "partly dropped (a lost -wal file?). Restore it, or rerun with "
            "--rebuild-journal to adopt what results.jsonl records."
        )
    if rebuild:
        rebuilt += _adopt_images(journal)
        notes.append(f"rebuilt the journal from the folder: {rebuilt} job(s) adopted")
    journal.commit()
    return notes


# A job with result images got its task id before they were written, and that id was
# committed: a journal that has no row for it, or one still before its submit, lost
# commits (say, its -wal file after a kill -9, before results.jsonl was rewritten).
_BEFORE_ITS_TASK: frozenset[str] = frozenset({"pending", "submitting"})


def _refuse_if_images_outrun(journal: Journal) -> None:
    """Refuse when the folder holds result images of jobs the journal does not know
    were submitted: a rerun trusting it would pay for them again."""
    jobs = _images_by_job(journal.directory)
    states = journal.states(jobs)
    behind = sorted(j for j in jobs if states.get(j, "pending") in _BEFORE_ITS_TASK)
    if behind:
        raise JournalRefused(
            f"the journal {journal.path} knows less than the folder: {len(behind)} job(s) "
            f"have result images but no submit in it ({_some(behind)}); it was partly dropped (a "
            "lost -wal file?). Restore it, or rerun with --rebuild-journal to adopt the "
            "images and results.jsonl."
        )


def _some(ids: Sequence[str]) -> str:
    """The first few of *ids*, for a message."""
    return ", ".join(ids[:_MAX_LISTED]) + (" ..." if len(ids) > _MAX_LISTED else "")


def _images_by_job(directory: Path) -> dict[str, list[str]]:
    """The result images (``<id>_<n>.<ext>``) in *directory*, by job id."""
    files: dict[str, list[str]] = {}
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            match = _IMAGE.match(entry.name)
            if match is not None:
                files.setdefault(match[1], []).append(entry.name)
    return files


def results_stamp(directory: Path) -> str | None:
    """Size and modification time of the folder's ``results.jsonl`` (None if absent)."""
    try:
        stat = (directory / RESULTS_NAME).stat()
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _adopt_images(journal: Journal) -> int:
    files = _images_by_job(journal.directory)
    count = 0
    for job_id, names in files.items():
        record = journal.get(job_id)
        if record is None or record.state not in ("done", "submitted", "completed"):
            names.sort(key=lambda n: int(_IMAGE.match(n)[2]))  # type: ignore[index]
            journal.adopt(
                job_id, state="done", task_id=None, files=names, detail="rebuilt from images"
            )
            count += 1
    return count


# -- recovery files -------------------------------------------------------------------


def recovery_paths(directory: Path) -> list[Path]:
    """Where the recovery file of *directory* may be: the folder, the working
    directory, the temporary directory (the first writable one is used)."""
    tag = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:10]
    other = f"apimart-{tag}-{RECOVERY_NAME}"
    return [directory / RECOVERY_NAME, Path.cwd() / other, Path(tempfile.gettempdir()) / other]


def write_recovery(
    directory: Path, journal_id: str, entries: Sequence[tuple[str, str, str]]
) -> Path | None:
    """Append ``(task id, job id, key)`` entries to the first writable recovery file."""
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    text = "".join(f"{task}\t{job}\t{key}\t{journal_id}\t{at}\n" for task, job, key in entries)
    for path in recovery_paths(directory):
        try:
            new = not path.exists()
            with path.open("a", encoding="utf-8") as fh:
                if new:
                    fh.write(
                        f"# task ids apimart batch could not record in {directory}/"
                        f"{JOURNAL_NAME}\n# task_id\tjob_id\tidempotency_key\tjournal\tat; "
                        "the next run adopts them (or: apimart task TASK_ID --wait "
                        "--download DIR)\n"
                    )
                fh.write(text)
                fh.flush()
        except OSError:
            continue
        return path
    return None


def _adopt_recovered(journal: Journal) -> int:
    own = journal.meta("journal_id")
    count = 0
    for path in recovery_paths(journal.directory):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for text in lines:
            parts = text.split("\t")
            if text.startswith("#") or len(parts) < 4 or parts[3] != own:
                continue
            task_id, job_id, key = parts[0], parts[1], parts[2]
            if task_id in journal.task_ids(job_id):
                continue
            record = journal.get(job_id)
            if record is not None and record.state in ("done", "completed"):
                continue
            journal.adopt(job_id, state="submitted", task_id=task_id, key=key, detail="recovered")
            count += 1
    return count
