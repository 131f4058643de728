"""Real image bytes for the fake's result URLs, and magic-byte sniffing for uploads.

The result image is a genuine 8x8 RGB PNG built with ``zlib`` and ``struct`` (valid
CRCs, a real IDAT stream), so a client that verifies or decodes what it downloads
works end to end. It is built once at import time: bytes are immutable, so sharing
it between fakes is not shared mutable state.

The sniffer is deliberately our own and independent of the client's: if both shared
code, a bug in it could never show up as a disagreement in tests. It only looks at
signatures, like the service: a truncated file with a valid header is accepted here
(and by the service), so detecting truncation is the client's job.
"""

from __future__ import annotations

import struct
import zlib

__all__ = ["RESULT_PNG", "sniff_image_type"]


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    # A diagonal gradient; filter byte 0 (None) at the start of every scanline.
    rows = b"".join(
        b"\x00" + b"".join(bytes(((x * 32) % 256, (y * 32) % 256, 128)) for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


RESULT_PNG: bytes = _png(8, 8)
"""The bytes every result URL serves (an 8x8 RGB PNG)."""


def sniff_image_type(data: bytes) -> str | None:
    """The MIME type the magic bytes of *data* announce, or ``None`` if not an accepted
    upload format (JPEG, PNG, WebP, GIF: the service's list)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None
