"""Output streams that a closed pipe cannot break: ``apimart batch ... | head -1``.

When the reader of stdout or stderr goes away (``head`` exits, a terminal closes, the
stream was closed at start-up), a write raises ``BrokenPipeError`` (or ``ValueError``
on a closed file, ``OSError`` for a bad descriptor). For a batch that is no reason to
stop: the work and the journal carry on, only the output goes quiet. ``Guarded`` wraps
a text stream, turns the first such failure into silence for good, and points the
process's own file descriptor at ``/dev/null`` so that the interpreter's final flush at
exit does not fail again (which would print "Exception ignored" and exit with 120).

What can go wrong: nothing is raised from a write or a flush once the stream is dead;
``dead`` tells whether output was lost.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TextIO

__all__ = ["Guarded", "guard"]

_FAILURES = (BrokenPipeError, ConnectionResetError, ValueError, OSError)


class Guarded(io.TextIOBase):
    """A text stream whose writes stop quietly once its reader is gone."""

    def __init__(self, inner: TextIO | None) -> None:
        super().__init__()
        self._inner = inner
        self.dead = inner is None

    def write(self, text: str) -> int:
        """Write *text*; once the stream has failed, drop it."""
        if not self.dead:
            try:
                assert self._inner is not None
                self._inner.write(text)
            except _FAILURES:
                self._die()
        return len(text)

    def flush(self) -> None:
        """Flush; a failure silences the stream."""
        if not self.dead:
            try:
                assert self._inner is not None
                self._inner.flush()
            except _FAILURES:
                self._die()

    def isatty(self) -> bool:
        """Whether the wrapped stream is a terminal (False once dead)."""
        if self.dead or self._inner is None:
            return False
        try:
            return self._inner.isatty()
        except _FAILURES:
            return False

    def fileno(self) -> int:
        """The wrapped stream's descriptor (``OSError`` if it has none, as io does)."""
        if self._inner is None:
            raise io.UnsupportedOperation("no file descriptor")
        return self._inner.fileno()

    def writable(self) -> bool:
        """Always: writes never fail, they are dropped once the reader is gone."""
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        """The wrapped stream's encoding (rich asks for it)."""
        return getattr(self._inner, "encoding", None) or "utf-8"

    def _die(self) -> None:
        self.dead = True
        inner, self._inner = self._inner, None
        if inner is None:
            return
        # If this is one of the process's own streams, send its descriptor to
        # /dev/null: whatever is still buffered then flushes harmlessly at exit.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = inner.fileno()
            if fd in (1, 2):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)


def guard(stream: TextIO | None, *, default: TextIO | None) -> Guarded:
    """*stream* (or *default*, e.g. ``sys.stdout``, which is None when closed) guarded."""
    if isinstance(stream, Guarded):
        return stream
    return Guarded(stream if stream is not None else default)


def std_streams() -> tuple[Guarded, Guarded]:
    """The process's stdout and stderr, guarded."""
    return guard(None, default=sys.stdout), guard(None, default=sys.stderr)
