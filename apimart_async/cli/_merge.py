"""``apimart merge DIR``: combine the shards of a sharded batch into one result.

Each shard ``DIR/shard-K-of-N/`` holds a ``results.jsonl`` of its own jobs (the
record format of an unsharded batch, ``files`` relative to the shard folder) and a
``shard.json`` naming the batch file. ``merge`` reads them all and writes
``DIR/results.jsonl``: one record per job id, in line order, ``files`` relative to
``DIR`` (``shard-0-of-4/cat_0.png``), and a ``shard`` field. When a job appears in more
than one shard (the split changed between runs), the best status wins (done first).

Which jobs are missing: the batch file (``--jobs``, or the one the shards recorded) is
read again, ids derived exactly as ``batch`` derives them, and every job no shard
reported ``done`` is missing, including the jobs of a shard that never wrote results.
Without the batch file, only what the shards reported can be listed, and a shard with
no results makes the merge incomplete. Records go through a temporary sqlite database,
so a million jobs cost no memory.

Exit status: 0 when every job is done, 1 while any is missing (their ids are printed on
stdout, one per line; a line without an id as ``line N``), 2 when DIR holds no shards or
shards of different splits.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ._jobfile import IdRegistry, JobReader, LineError
from ._progress import counts_table, plain_rows
from ._selfcheck import RESULT_FIELDS, RESULTS_NAME
from ._setup import UsageError
from ._shard import shard_folders

if TYPE_CHECKING:
    import argparse

    from ._setup import Runtime
    from ._ui import Ui

__all__ = ["cmd_merge", "merge"]

SHARD_MANIFEST = "shard.json"
_RANK = {"done": 0, "completed": 1, "submitted": 2, "expired": 3, "failed": 4, "uncertain": 5}
_WORST = 9


def cmd_merge(args: argparse.Namespace, runtime: Runtime, ui: Ui) -> int:
    """``apimart merge DIR [--jobs JOBS.jsonl]``; see the module docstring."""
    del runtime
    return merge(Path(args.dir), ui, jobs=Path(args.jobs) if args.jobs else None)


def merge(directory: Path, ui: Ui, *, jobs: Path | None = None) -> int:
    """Merge the shards in *directory*; return the exit status."""
    shards = shard_folders(directory)
    if not shards:
        raise UsageError(f"{directory} holds no shard-K-of-N folders (nothing to merge)")
    counts = sorted({n for _, n in shards})
    if len(counts) > 1:
        raise UsageError(
            f"{directory} holds shards of different splits ({', '.join(map(str, counts))}); "
            "merge needs the shards of one split"
        )
    total = counts[0]
    db = sqlite3.connect("")  # private and temporary: flat memory for any size
    try:
        db.execute(
            "CREATE TABLE rec (id TEXT PRIMARY KEY, line INTEGER, rank INTEGER, "
            "shard INTEGER, status TEXT, json TEXT)"
        )
        db.execute("CREATE TABLE bad (line INTEGER PRIMARY KEY, json TEXT)")
        silent: list[int] = []
        recorded: set[str] = set()
        for index in range(total):
            folder = shards.get((index, total))
            if folder is None or not (folder / RESULTS_NAME).is_file():
                silent.append(index)
                continue
            _load(db, folder, index)
            with contextlib.suppress(OSError, ValueError):
                manifest = _object(json.loads((folder / SHARD_MANIFEST).read_text("utf-8")))
                if manifest is not None and isinstance(manifest.get("jobs_file"), str):
                    recorded.add(str(manifest["jobs_file"]))
        source = jobs or (Path(next(iter(recorded))) if len(recorded) == 1 else None)
        if source is not None and not source.is_file():
            ui.warn(f"batch file {source} not found: listing only what the shards reported")
            source = None
        missing = _missing(db, source)
        written = _write(db, directory / RESULTS_NAME)
    finally:
        db.close()
    return _report(ui, directory, total, silent, missing, written, source)


def _load(db: sqlite3.Connection, folder: Path, index: int) -> None:
    prefix = folder.name
    with (folder / RESULTS_NAME).open(encoding="utf-8") as fh:
        for text in fh:
            try:
                row = _object(json.loads(text))
            except ValueError:
                continue
            if row is None:
                continue
            names: list[Any] = row.get("files") or []
            row["files"] = [f"{prefix}/{name}" for name in names]
            row["shard"] = index
            status = str(row.get("status"))
            line = int(row["line"]) if isinstance(row.get("line"), int) else 0
            if row.get("id") is None:
                db.execute("INSERT OR REPLACE INTO bad VALUES (?, ?)", (line, json.dumps(row)))
                continue
            db.execute(
                "INSERT INTO rec VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "line = excluded.line, rank = excluded.rank, shard = excluded.shard, "
                "status = excluded.status, json = excluded.json WHERE excluded.rank < rank",
                (str(row["id"]), line, _RANK.get(status, _WORST), index, status, json.dumps(row)),
            )


def _object(value: object) -> dict[str, Any] | None:
    """*value* if it is a JSON object."""
    return cast("dict[str, Any]", value) if isinstance(value, dict) else None


def _missing(db: sqlite3.Connection, source: Path | None) -> list[str]:
    """Every job no shard finished: from the batch file if known, else from the records."""
    missing: list[str] = []
    if source is not None:
        reader = JobReader(source, IdRegistry(db))
        reader.check = False  # ids only: the shards checked their own lines
        for item in reader:
            if isinstance(item, LineError) and item.id is None:
                row = db.execute("SELECT 1 FROM bad WHERE line = ?", (item.line,)).fetchone()
                missing.append(f"line {item.line}")
                if row is None:
                    _unreported(db, item.line, None)
                continue
            found = db.execute("SELECT status FROM rec WHERE id = ?", (item.id,)).fetchone()
            if found is None:
                _unreported(db, item.line, item.id)
            if found is None or found[0] != "done":
                missing.append(str(item.id))
        return missing
    for (job_id,) in db.execute("SELECT id FROM rec WHERE status != 'done' ORDER BY line"):
        missing.append(str(job_id))
    for (line,) in db.execute("SELECT line FROM bad ORDER BY line"):
        missing.append(f"line {line}")
    return missing


def _unreported(db: sqlite3.Connection, line: int, job_id: str | None) -> None:
    row: dict[str, Any] = dict.fromkeys(RESULT_FIELDS)
    row.update(
        line=line,
        id=job_id,
        status="missing",
        files=[],
        urls=[],
        error="no shard reported this job",
        shard=None,
    )
    if job_id is None:
        db.execute("INSERT OR IGNORE INTO bad VALUES (?, ?)", (line, json.dumps(row)))
    else:
        db.execute(
            "INSERT OR IGNORE INTO rec VALUES (?, ?, ?, NULL, 'missing', ?)",
            (job_id, line, _WORST + 1, json.dumps(row)),
        )


def _write(db: sqlite3.Connection, path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    tmp = path.with_name(f".{RESULTS_NAME}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for status, text in db.execute(
            "SELECT status, json FROM (SELECT line, status, json FROM rec "
            "UNION ALL SELECT line, 'invalid', json FROM bad) ORDER BY line"
        ):
            fh.write(str(text) + "\n")
            counts[str(status)] += 1
    tmp.replace(path)
    return counts


def _report(
    ui: Ui,
    directory: Path,
    total: int,
    silent: list[int],
    missing: list[str],
    counts: Counter[str],
    source: Path | None,
) -> int:
    rows = [(status, str(count), "") for status, count in sorted(counts.items())]
    if ui.stderr.isatty():
        ui.err.print(counts_table(f"{total} shards merged", rows))
    else:
        ui.info(f"{total} shards merged")
        for text in plain_rows(("status", "jobs"), [row[:2] for row in rows]):
            ui.info(text)
    ui.info(f"results: {directory / RESULTS_NAME}")
    for index in silent:
        ui.warn(f"shard {index}/{total} has no results yet (DIR/shard-{index}-of-{total})")
    if silent and source is None:
        ui.warn("without the batch file, the jobs of those shards cannot be listed")
    if missing:
        ui.info(f"{len(missing)} job(s) not finished by any shard (ids on stdout)")
        for job_id in missing:
            ui.result(job_id)
    return 1 if missing or silent else 0
