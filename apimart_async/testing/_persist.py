"""The fake's state file: what a fake re-created in a new process must remember.

``FakeApimart(state_path=...)`` keeps its tasks (with their timelines), uploads,
idempotency keys, balance and finished webhook deliveries in one JSON Lines file, so
``apimart batch --fake`` can be stopped (Ctrl-C, ``kill -9``) and resumed: the new
fake knows every task id the old one handed out, and those tasks keep progressing,
because their times are stored as wall-clock (Unix) times and converted back onto the
new process's clock.

Format: a header line ``{"format": "apimart-fake-state", "version": 1}``, then one
record per line: ``task``, ``upload``, ``balance`` (the ledger's absolute values at a
wall time) and ``webhook_done``. Counters, the request log, scripts and the fake's
configuration (latency, faults, prices) are not state and are not stored.

Durability: every record is appended with one ``write`` to a file opened in append
mode *before* the answer that reveals it is sent, so a task id a client has seen is in
the file (in the operating system's hands: it survives ``kill -9``, though not a power
cut, since nothing is fsynced per record). When a fake opens an existing file it
rewrites it compacted, atomically (temporary file in the same folder, fsync, rename),
which also drops a last line torn by a crash mid-write. Cost per task: one short
``open``/``write``/``close``; thousands of tasks are cheap.

What can go wrong: a file that is not a fake state file (another format, a newer
version, a damaged line before the last) raises ``ValueError`` naming the file and the
line, rather than silently starting from nothing; two fakes writing one file at once is
not supported.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ._billing import to_usd
from ._task import FakeTask

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "FORMAT",
    "VERSION",
    "Record",
    "StateFile",
    "decode_task",
    "decode_upload",
    "encode_task",
    "encode_upload",
]

FORMAT = "apimart-fake-state"
VERSION = 1

Record = dict[str, Any]


class StateFile:
    """One state file on disk: read it, append records, rewrite it atomically."""

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"StateFile({str(self.path)!r})"

    def read(self) -> list[Record] | None:
        """The records after the header, or ``None`` if the file is missing or empty."""
        try:
            text = self.path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise ValueError(f"{self.path} is not a fake state file (not UTF-8)") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines:
            return None
        header = _parse(lines[0])
        if header is None or header.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not a fake state file (no {FORMAT!r} header)")
        if header.get("version") != VERSION:
            raise ValueError(
                f"{self.path} has state format version {header.get('version')!r}; "
                f"this fake reads version {VERSION}"
            )
        records: list[Record] = []
        for number, line in enumerate(lines[1:], start=2):
            record = _parse(line)
            if record is None or not isinstance(record.get("t"), str):
                if number == len(lines) and not text.endswith("\n"):
                    break  # a torn last line: the crash came mid-write; nothing was sent
                raise ValueError(f"{self.path}: line {number} is damaged")
            records.append(record)
        return records

    def append(self, record: Record) -> None:
        """Add one record (one ``write`` of one line, in append mode)."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self.path.open("ab") as fh:
            fh.write(line.encode())

    def rewrite(self, records: Iterable[Record]) -> None:
        """Replace the file with a header and *records*, atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                for record in ({"format": FORMAT, "version": VERSION}, *records):
                    fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode())
                    fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _parse(line: str) -> Record | None:
    try:
        value: object = json.loads(line)
    except ValueError:
        return None
    return cast("Record", value) if isinstance(value, dict) else None


def encode_task(
    task: FakeTask, *, created_wall: float, cost_micro: int, registered: bool
) -> Record:
    """A ``task`` record; *registered*: its idempotency key answers replays."""
    return {
        "t": "task",
        "id": task.id,
        "model": task.model,
        "prompt": task.prompt,
        "n": task.n,
        "image_urls": list(task.image_urls),
        "idempotency_key": task.idempotency_key,
        "body_hash": task.body_hash,
        "registered": registered,
        "created_wall": created_wall,
        "duration": task.duration,
        "real_duration": task.real_duration,
        "created_unix": task.created_unix,
        "estimated_time": task.estimated_time,
        "fate": task.fate,
        "reason": task.reason,
        "cost_micro": cost_micro,
        "webhook": task.webhook,
        "submit_response": task.submit_response,
    }


def decode_task(record: Record, *, clock_of_wall: float) -> tuple[FakeTask, int, bool]:
    """``(task, cost in micro-USD, registered)`` from a ``task`` record.

    *clock_of_wall* is what to subtract from a wall time to get this process's clock.
    Raises ``KeyError``/``TypeError``/``ValueError`` on a malformed record.
    """
    cost_micro = int(record["cost_micro"])
    fate = str(record["fate"])
    if fate not in ("complete", "fail", "stuck", "unknown_status"):
        raise ValueError(f"unknown task fate {fate!r}")
    task = FakeTask(
        id=str(record["id"]),
        model=str(record["model"]),
        prompt=str(record["prompt"]),
        n=int(record["n"]),
        image_urls=tuple(str(u) for u in record["image_urls"]),
        idempotency_key=record["idempotency_key"],
        body_hash=str(record["body_hash"]),
        created_at=float(record["created_wall"]) - clock_of_wall,
        duration=float(record["duration"]),
        real_duration=float(record["real_duration"]),
        created_unix=int(record["created_unix"]),
        estimated_time=int(record["estimated_time"]),
        fate=fate,  # type: ignore[arg-type]
        reason=record["reason"],
        cost=to_usd(cost_micro),
        submit_response=dict(record["submit_response"]),
        webhook=record["webhook"],
    )
    return task, cost_micro, bool(record["registered"])


def encode_upload(key: str, data: bytes, content_type: str) -> Record:
    """An ``upload`` record (the bytes as base64)."""
    return {
        "t": "upload",
        "key": key,
        "content_type": content_type,
        "data": base64.b64encode(data).decode("ascii"),
    }


def decode_upload(record: Record) -> tuple[str, bytes, str]:
    """``(key, bytes, content type)`` of an ``upload`` record."""
    return (
        str(record["key"]),
        base64.b64decode(str(record["data"]), validate=True),
        str(record["content_type"]),
    )
