"""Sharded batches: ``--shard K/N`` and ``--shard auto``, one folder per shard.

Engines that restart failed workers (a Kubernetes Indexed Job, a Slurm array,
``xargs -P``) run ``apimart batch JOBS --out DIR --shard K/N`` once per index. Shard K
takes the jobs whose id hashes to K (``sha256(id) mod N``): a stable partition by job
id, so reordering the file never moves a job to another shard. Each shard works in its
own folder ``DIR/shard-K-of-N/``, exactly like an unsharded batch folder (its journal,
its ``results.jsonl`` holding only its jobs, its images), so shards never write the
same file, and the folder lock keeps a second process for the same index out (also on
NFS, where Linux maps ``flock`` onto NFS locks). Sharded journals use SQLite's
rollback journal instead of WAL, which needs shared memory that a network filesystem
cannot provide across hosts. ``apimart merge DIR`` combines the shards' results.

K counts from 0, as ``JOB_COMPLETION_INDEX`` does. ``--shard auto`` reads
``JOB_COMPLETION_INDEX`` and ``JOB_COMPLETIONS`` (Kubernetes sets the first; set the
second to the Job's ``completions``), or ``SLURM_ARRAY_TASK_ID`` and
``SLURM_ARRAY_TASK_COUNT`` with K = ``SLURM_ARRAY_TASK_ID`` - ``SLURM_ARRAY_TASK_MIN``
(0 when unset).

Limits: ``--concurrency`` and ``--poll-rps`` are totals for the whole batch, since the
account's limits are shared: each of the N shards takes its share (concurrency split
as evenly as possible, at least 1 each; the poll rate divided by N, the library's
default of 50 per second when not given).

What can go wrong: an invalid spec (``4/4``, ``x/y``, ``auto`` without the variables)
is a ``ValueError`` whose message names ``--shard``, raised before any request.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

__all__ = ["SHARD_FOLDER", "Shard", "parse_shard", "shard_folders"]

SHARD_FOLDER = re.compile(r"^shard-(\d+)-of-(\d+)$")
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard *index* of *count* (0 <= index < count)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def folder(self) -> str:
        """The shard's folder name under the batch folder."""
        return f"shard-{self.index}-of-{self.count}"

    def owns(self, job_id: str) -> bool:
        """Whether the job with *job_id* belongs to this shard."""
        digest = hashlib.sha256(job_id.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def share(self, total: int) -> int:
        """This shard's part of *total* (split as evenly as possible, at least 1)."""
        part = total // self.count + (1 if self.index < total % self.count else 0)
        return max(1, part)


def parse_shard(text: str, env: Mapping[str, str] | None = None) -> Shard:
    """``K/N`` or ``auto`` (from *env*, default ``os.environ``) as a ``Shard``."""
    if text.strip().lower() == "auto":
        return _auto(os.environ if env is None else env)
    match = _SPEC.match(text)
    if match is None:
        raise ValueError(f"--shard takes K/N (e.g. 0/4) or auto, got {text!r}")
    return _checked(int(match[1]), int(match[2]), f"--shard {text.strip()}")


def _checked(index: int, count: int, what: str) -> Shard:
    if count < 1:
        raise ValueError(f"{what}: N must be at least 1")
    if not 0 <= index < count:
        raise ValueError(f"{what}: K counts from 0 and must be below N (0 <= K < {count})")
    return Shard(index, count)


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--shard auto: {name} must be an integer, got {value!r}") from None


def _auto(env: Mapping[str, str]) -> Shard:
    index = _int(env, "JOB_COMPLETION_INDEX")
    if index is not None:
        count = _int(env, "JOB_COMPLETIONS")
        if count is None:
            raise ValueError(
                "--shard auto: JOB_COMPLETION_INDEX is set but JOB_COMPLETIONS is not; "
                "set it to the Job's spec.completions in the pod's env"
            )
        return _checked(index, count, "--shard auto (Kubernetes)")
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        count = _int(env, "SLURM_ARRAY_TASK_COUNT")
        if count is None:
            raise ValueError(
                "--shard auto: SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT"
            )
        first = _int(env, "SLURM_ARRAY_TASK_MIN") or 0
        return _checked(
            task - first,
            count,
            "--shard auto (Slurm; use a contiguous --array=0-N-1 without a step)",
        )
    raise ValueError(
        "--shard auto: neither JOB_COMPLETION_INDEX (Kubernetes Indexed Job) nor "
        "SLURM_ARRAY_TASK_ID (Slurm array) is set; give --shard K/N"
    )


def shard_folders(directory: Path) -> dict[tuple[int, int], Path]:
    """The ``shard-K-of-N`` folders in *directory*, by ``(K, N)``."""
    found: dict[tuple[int, int], Path] = {}
    try:
        entries = list(directory.iterdir())
    except OSError:
        return found
    for entry in entries:
        match = SHARD_FOLDER.match(entry.name)
        if match is not None and entry.is_dir():
            found[int(match[1]), int(match[2])] = entry
    return found
