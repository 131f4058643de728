"""Where output goes: results on stdout, progress and messages on stderr.

Results (saved file paths, URLs, tables, JSON) go to stdout so they can be piped; live
progress, notes, warnings and errors go to stderr. A live display (rich) is used when
stderr is a terminal or ``--progress bar`` forces it; otherwise progress is printed as
plain lines (``plain``) or not at all (``off``). rich is imported only when output is
rendered, so ``apimart --help`` stays fast.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Literal, TextIO

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = ["INSTALL_HINT", "ProgressMode", "Ui", "require_rich"]

ProgressMode = Literal["auto", "bar", "plain", "off"]
INSTALL_HINT = (
    "the apimart command needs the cli extra (rich): pip install 'apimart-async[cli]', "
    "or from a checkout of the source: pip install '.[cli]'"
)


def require_rich() -> str | None:
    """None if rich can be imported, else the install hint."""
    try:
        import rich.console  # noqa: F401  # pyright: ignore[reportUnusedImport]
    except ImportError:
        return INSTALL_HINT
    return None


class Ui:
    """The two streams and how progress is shown on them."""

    def __init__(
        self,
        *,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        progress: ProgressMode = "auto",
    ) -> None:
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        if progress == "auto":
            progress = "bar" if _isatty(self.stderr) else "plain"
        self.mode: Literal["bar", "plain", "off"] = progress
        self._out: Console | None = None
        self._err: Console | None = None

    @property
    def out(self) -> Console:
        """A rich console on stdout (for tables)."""
        if self._out is None:
            self._out = _console(self.stdout, force=None)
        return self._out

    @property
    def err(self) -> Console:
        """A rich console on stderr (for live displays); a terminal if ``bar`` is forced."""
        if self._err is None:
            self._err = _console(self.stderr, force=True if self.mode == "bar" else None)
        return self._err

    def result(self, text: str) -> None:
        """One line of results on stdout, unformatted (paths, URLs, JSON)."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def show(self, renderable: RenderableType) -> None:
        """A rich renderable (a table) on stdout."""
        self.out.print(renderable)

    def info(self, text: str) -> None:
        """A message for the person at the terminal (stderr)."""
        self.stdout.flush()  # keep the order of the two streams on a shared terminal
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def warn(self, text: str) -> None:
        """A warning on stderr."""
        self.info(f"warning: {text}")

    def error(self, text: str) -> None:
        """An error on stderr, in argparse's style."""
        self.info(f"apimart: error: {text}")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _console(stream: TextIO, *, force: bool | None) -> Console:
    from rich.console import Console

    return Console(file=stream, force_terminal=force, highlight=False, soft_wrap=False)
