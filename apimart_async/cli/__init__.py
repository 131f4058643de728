"""The ``apimart`` command: generate, batch (resumable, shardable, with spending limits
and webhooks), merge, upload, task, balance, models, demo.

Install with the ``cli`` extra (``pip install 'apimart-async[cli]'``, or ``pip install
'.[cli]'`` from a checkout; ``--webhook-listen`` also needs the ``server`` extra) and
run ``apimart --help``, or ``python -m apimart_async.cli``. It uses only the public API
of ``apimart_async``; ``apimart demo`` runs an example batch against the embedded fake
service, with no key and no network, and ``--fake`` runs any command against it (its
state kept in the output folder, so an interrupted run resumes).

Output: results on stdout (tab-separated when it is not a terminal, JSON with
``--json``), progress and messages on stderr; errors in the command line's words
(``_errors``); a closed pipe ends output quietly (``_streams``).
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
