"""Deterministic idempotency keys: the same job sends the same key, wherever it runs.

A job's key is derived from three things and nothing else::

    key = "apimart-" + sha256(batch id, job id, submit body, generation)[:40 hex]

* the **batch id**: ``--batch-id``, or by default the first 16 hex digits of the
  SHA-256 of the batch file's bytes as this run reads them. Any edit to the file gives
  a new default batch id, so every job's key changes; pass the same ``--batch-id`` to
  keep the keys of unchanged lines across edits (a line keeps its key however other
  lines change or move, since neither the line number nor other lines enter the key);
* the **job id** (the line's ``id``, or the id derived from its content);
* the **submit body**: the exact JSON the client sends (``request.to_body()``,
  canonicalised with sorted keys), so editing a line changes its key, and a key is
  never sent with a different body (``check_body`` verifies every submit before it
  goes out);
* the **generation**: 0, then one more each time a failed job is retried (a failed
  task is refunded; retrying it under the old key would only replay the failure).

So a shard restarted on another machine without its journal, or a second pod for the
same index, sends the same key for the same job: a service that honours keys answers
with the task it already created, and nothing is paid twice. A service that ignores
keys creates a second task; then only the journal protects (a job whose task id it
recorded is never submitted again).

Jobs whose line names a local image file are the exception: the upload's URL is part of
the body and differs on every upload, so their key cannot be derived from the line;
they get a random key, recorded in the journal before the submit is sent (as every key
is), and have only the journal's protection.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from apimart_async.models import BaseImageRequest

__all__ = [
    "BATCH_ID_PATTERN",
    "canonical",
    "check_batch_id",
    "derived_key",
    "file_digest",
    "random_key",
]

BATCH_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CHUNK = 1 << 20


def check_batch_id(text: str) -> str:
    """*text* if it is a valid ``--batch-id``; ``ValueError`` naming the rule otherwise."""
    if not BATCH_ID_PATTERN.match(text):
        raise ValueError(
            f"must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit (got {text!r})"
        )
    return text


def file_digest(path: Path) -> tuple[str, int, bool]:
    """The default batch id of *path* (16 hex digits of its SHA-256), its line count
    (a last line without a newline counts), and whether it holds anything but
    whitespace; one streamed read.

    Raises ``UnicodeDecodeError`` (its position counted from the start of the file)
    if the file is not UTF-8 text.
    """
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines = 0
    content = False
    offset = 0
    last = b"\n"
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                start, end = offset + exc.start, offset + exc.end
                raise UnicodeDecodeError(exc.encoding, exc.object, start, end, exc.reason) from None
            offset += len(chunk)
            newlines += chunk.count(b"\n")
            content = content or bool(chunk.strip())
            last = chunk[-1:]
        decoder.decode(b"", final=True)
    return digest.hexdigest()[:16], newlines + (last != b"\n"), content


def canonical(body: Any) -> str:
    """A submit body as canonical JSON (sorted keys, no spaces): equal bodies, equal text."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def derived_key(
    batch_id: str, job_id: str, request: BaseImageRequest, generation: int
) -> tuple[str, str] | None:
    """The job's deterministic key and the canonical body it stands for, or None when
    the request names local files (their upload URLs are not known yet)."""
    if request.local_images():
        return None
    body = canonical(request.to_body())
    return key_for(batch_id, job_id, body, generation), body


def key_for(batch_id: str, job_id: str, body: str, generation: int) -> str:
    """The key of (batch id, job id, canonical body, generation)."""
    material = "\0".join((batch_id, job_id, body, str(generation))).encode()
    return "apimart-" + hashlib.sha256(material).hexdigest()[:40]


def random_key() -> str:
    """A fresh key for a job whose body is known only at submit time."""
    return f"apimart-cli-{uuid.uuid4().hex}"
