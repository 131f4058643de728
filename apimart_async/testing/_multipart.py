"""A small ``multipart/form-data`` parser: just enough to read an upload's ``file`` field.

Why our own: the fake must not depend on a web framework, and the standard library's
``cgi`` module is gone (3.13). The body is already fully in memory (uploads are capped
at 20 MB by the service), so the parser works on one ``bytes`` object with
``bytes.find`` and copies each part's content exactly once.

What can go wrong: a body that does not follow the framing (no boundary, no closing
delimiter, a part without a header block) raises ``MultipartError``, which the app
answers with the service's "Missing file field" 400, as a real server would not
find the field either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MultipartError", "Part", "boundary_of", "parse_multipart"]

# `; name=value` or `; name="quoted \" value"` pairs of a header's parameters.
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class MultipartError(ValueError):
    """The body is not well-formed ``multipart/form-data``."""


@dataclass(frozen=True, slots=True)
class Part:
    """One form field: its *name*, the *filename* if it is a file, and its bytes."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def _params(header_value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, raw in _PARAM.findall(header_value):
        value = raw.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        # httpx and browsers percent-escape a quote inside a filename (HTML5 rules).
        out[key.lower()] = value.replace("%22", '"')
    return out


def boundary_of(content_type: str) -> str | None:
    """The boundary of a ``multipart/form-data`` Content-Type, or ``None``."""
    media_type, _, _ = content_type.partition(";")
    if media_type.strip().lower() != "multipart/form-data":
        return None
    boundary = _params(content_type[len(media_type) :]).get("boundary")
    return boundary or None


def parse_multipart(body: bytes, boundary: str) -> list[Part]:
    """Split *body* into its parts. Raises ``MultipartError`` on broken framing."""
    delimiter = b"--" + boundary.encode("latin-1")
    pos = body.find(delimiter)
    if pos < 0:
        raise MultipartError("no boundary delimiter in the body")
    parts: list[Part] = []
    next_delimiter = b"\r\n" + delimiter
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return parts  # the closing delimiter
        if not body.startswith(b"\r\n", pos):
            raise MultipartError("malformed delimiter line")
        head_start = pos + 2
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            raise MultipartError("part without a header block")
        end = body.find(next_delimiter, head_end + 4)
        if end < 0:
            raise MultipartError("no closing delimiter")
        parts.append(_part(body[head_start:head_end], body[head_end + 4 : end]))
        pos = end + 2


def _part(head: bytes, data: bytes) -> Part:
    name: str | None = None
    filename: str | None = None
    content_type: str | None = None
    for line in head.decode("utf-8", "replace").split("\r\n"):
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "content-disposition":
            params = _params(value[value.find(";") :] if ";" in value else "")
            name = params.get("name")
            filename = params.get("filename")
        elif key == "content-type":
            content_type = value.strip()
    if name is None:
        raise MultipartError("part without a name")
    return Part(name, filename, content_type, data)
