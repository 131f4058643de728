"""Valid PNG images built in code: tiny distinct ones and one 20 MB file.

Every pipeline in a like-for-like comparison uploads its *own* image (a pixel encodes
its index), so apimart_async's content-hash dedup cannot skip uploads the raw loops
make; the "shared" rows reuse one image on purpose.
"""

from __future__ import annotations

import struct
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["BIG_IMAGE_BYTES", "png", "write_big_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 20 MiB is the service's (and the client's) upload limit; stay a little below it.
BIG_IMAGE_BYTES = 20 * 1024 * 1024 - 4096


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(index: int = 0, side: int = 26) -> bytes:
    """A valid RGB PNG of about 2 KB (stored, uncompressed) unique to *index*.

    ``side=26`` gives 26 rows of 79 bytes: 2,054 bytes of pixel data, ~2.1 KB in all.
    """
    row = bytearray(1 + side * 3)  # filter byte 0, then RGB triples
    for x in range(side * 3):
        row[1 + x] = (x * 7) & 0xFF
    raw = bytearray(bytes(row) * side)
    raw[1:4] = (index & 0xFFFFFF).to_bytes(3, "big")  # the first pixel encodes the index
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(bytes(raw), 0))
        + _chunk(b"IEND", b"")
    )


def write_big_png(path: Path, size: int = BIG_IMAGE_BYTES) -> Path:
    """Write a valid PNG of exactly *size* bytes to *path*, without holding it in memory.

    A small image followed by one private ancillary chunk (``paDd``: decoders skip it)
    of zeros, then ``IEND``; the CRC is computed incrementally.
    """
    small = png(0)
    head = small[: -len(_chunk(b"IEND", b""))]
    tail = _chunk(b"IEND", b"")
    pad = size - len(head) - len(tail) - 12
    if pad < 0:
        raise ValueError(f"size {size} is too small for a padded PNG")
    block = bytes(1024 * 1024)
    with path.open("wb") as fh:
        fh.write(head)
        fh.write(struct.pack(">I", pad) + b"paDd")
        crc = zlib.crc32(b"paDd")
        left = pad
        while left:
            part = block[: min(left, len(block))]
            fh.write(part)
            crc = zlib.crc32(part, crc)
            left -= len(part)
        fh.write(struct.pack(">I", crc))
        fh.write(tail)
    return path
