"""Dispatch: parse the command line, run the command, turn failures into exit statuses.

Exit statuses: 0 success; 1 a job, task or request failed (also: a batch's spending
limit or a 402 stopped its submits); 2 usage or configuration error (argparse's own
errors too, and an API key the service rejects); 3 a batch folder's journal belongs to
another service or is damaged (nothing sent); 4 a batch's journal write failed mid-run;
128+N stopped by signal N (130 for Ctrl-C).

While a command runs, log records (the library's warnings) reach stderr through the
same guarded stream, in the command line's words (``_logs``).

stdout and stderr are wrapped (``_streams.Guarded``) for every command, and for
argparse's own help and errors too: once a reader goes away (``apimart models | head
-1``, ``| true``), output goes quiet, as with other Unix tools, and the command carries
on to the status its work earned (never a ``BrokenPipeError`` traceback, never status
120 from the interpreter's last flush).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import TYPE_CHECKING, cast

from ._args import build_parser
from ._logs import captured
from ._selfcheck import EXIT_REFUSED, JournalRefused
from ._setup import Runtime, UsageError
from ._signals import exit_status
from ._streams import guard
from ._ui import Ui, require_rich

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import TextIO

__all__ = ["run"]


def _command(name: str) -> Callable[[argparse.Namespace, Runtime, Ui], int]:
    # Imported on use: each command pulls in only what it needs.
    if name == "batch":
        from ._batch import cmd_batch

        return cmd_batch
    if name == "demo":
        from ._demo import cmd_demo

        return cmd_demo
    if name == "merge":
        from ._merge import cmd_merge

        return cmd_merge
    if name == "models":
        from ._models import cmd_models

        return cmd_models
    from . import _commands

    commands: dict[str, Callable[[argparse.Namespace, Runtime, Ui], int]] = {
        "generate": _commands.cmd_generate,
        "upload": _commands.cmd_upload,
        "task": _commands.cmd_task,
        "balance": _commands.cmd_balance,
    }
    return commands[name]


def run(
    argv: Sequence[str] | None = None,
    *,
    runtime: Runtime | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the ``apimart`` command line; return its exit status (never raises SystemExit)."""
    out = cast("TextIO", guard(stdout, default=sys.stdout))
    err = cast("TextIO", guard(stderr, default=sys.stderr))
    parser = build_parser()
    try:
        # argparse prints help, --version and usage errors to sys.stdout/sys.stderr.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        out.flush()
        err.flush()
        return exc.code if isinstance(exc.code, int) else 2
    ui = Ui(stdout=out, stderr=err, progress=getattr(args, "progress", "auto"))
    hint = require_rich()
    if hint is not None:
        ui.error(hint)
        return 2
    try:
        # Log records (the library's warnings, uvicorn's) go to stderr through the ui,
        # in the command line's words, rather than raw through logging's last resort.
        with captured(ui):
            return _command(args.command)(args, runtime or Runtime(), ui)
    except UsageError as exc:
        ui.error(str(exc))
        return 2
    except JournalRefused as exc:
        ui.error(str(exc))
        return EXIT_REFUSED
    except KeyboardInterrupt:
        ui.info("interrupted")
        return exit_status(signal.SIGINT)
