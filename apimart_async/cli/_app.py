"""Dispatch: parse the command line, run the command, turn failures into exit statuses.

Exit statuses: 0 success; 1 a job, task or request failed; 2 usage or configuration
error (argparse's own errors too); 3 a batch folder's journal belongs to another
service or is damaged (nothing sent); 4 a batch's journal write failed mid-run; 128+N
stopped by signal N (130 for Ctrl-C).

stdout and stderr are wrapped (``_streams.Guarded``): once a reader goes away (``| head``)
output goes quiet and the command carries on to the status its work earned.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import TYPE_CHECKING, cast

from ._args import build_parser
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
    from . import _commands

    commands: dict[str, Callable[[argparse.Namespace, Runtime, Ui], int]] = {
        "generate": _commands.cmd_generate,
        "upload": _commands.cmd_upload,
        "task": _commands.cmd_task,
        "models": _commands.cmd_models,
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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    ui = Ui(
        stdout=cast("TextIO", guard(stdout, default=sys.stdout)),
        stderr=cast("TextIO", guard(stderr, default=sys.stderr)),
        progress=getattr(args, "progress", "auto"),
    )
    # Retries are expected (and safe); stamina announces each one as a warning, which
    # would print through logging's last-resort handler in the middle of the display.
    logging.getLogger("stamina").setLevel(logging.ERROR)
    hint = require_rich()
    if hint is not None:
        ui.error(hint)
        return 2
    try:
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
