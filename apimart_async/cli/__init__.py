"""The ``apimart`` command: generate, batch (resumable, shardable), merge, upload, task,
models, demo.

Install with the ``cli`` extra (``pip install 'apimart-async[cli]'``) and run
``apimart --help``, or ``python -m apimart_async.cli``. It uses only the public API of
``apimart_async``; ``apimart demo`` runs an example batch against the embedded fake
service, with no key and no network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with *argv* (default: ``sys.argv[1:]``); return the exit status."""
    from ._app import run

    return run(argv)
