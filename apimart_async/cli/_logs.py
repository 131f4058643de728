"""Log records while a command runs: on stderr, in the command line's words.

The library logs a WARNING when something needs a person's attention (a submit whose
outcome is unknown, a batch that stops submitting, a budget it cannot enforce). With
no handler, Python would print them raw through its last-resort handler, unguarded
(a closed stderr then raises) and in Python's words (``pass prices={...}``,
``client.wait(...)``). While a command runs, ``captured(ui)`` routes every WARNING and
above to ``ui.warn`` instead:

* what the command reports itself (a stop, an uncertain submit: the batch journals
  and summarises those) is dropped, so nothing is said twice;
* the library's messages that name a Python call are rewritten with the flag or the
  command to use;
* anything else (uvicorn, say) is shown as ``warning: <message>``.

What can go wrong: a record that cannot be formatted is shown as its bare message; the
handler never raises (``logging`` would print a traceback if it did).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Generator

    from ._ui import Ui

__all__ = ["captured"]

# Reported by the command itself (journal, notes, summary): not repeated.
_REPORTED = (
    "generate_many stops submitting",
    "submit outcome unknown",
    "orphaned task",
)
# Why a task goes on without its caller, when the command has it in hand already: a
# batch journals every task id as it arrives (and resumes it on the rerun); generate
# names the command that fetches its task when it is stopped.
_KEPT = (
    "generate_many ended before this job's outcome",
    "generate was cancelled while its task ran",
)


def _translate(record: logging.LogRecord) -> str | None:
    """The CLI's text for *record*, or None to drop it."""
    template = str(record.msg)
    args = record.args if isinstance(record.args, tuple) else ()
    if template.startswith(_REPORTED):
        return None
    if record.name == "apimart_async.budget" and "report no cost" in template and args:
        model = args[0]
        return (
            f"tasks of {model} report no cost and no --price was given for it: --max-cost "
            f"cannot be enforced for {model} (only images are counted); add --price "
            f"{model}=USD"
        )
    if "goes on at the service" in template and len(args) >= 3:
        why, task, key = args[0], args[1], args[2]
        if str(why) in _KEPT:
            return None
        return (
            f"{why}: task {task} (idempotency key {key}) goes on at the service; "
            f"`apimart task {task} --wait --download DIR` fetches it"
        )
    if template.startswith("submit cut short") and len(args) >= 2:
        return (
            f"a submit was cut short and its outcome is unknown ({args[0]}): a task may "
            f"exist (idempotency key {args[1]}); check the APIMart dashboard"
        )
    try:
        return " ".join(record.getMessage().split())
    except (TypeError, ValueError):
        return template


class _ToUi(logging.Handler):
    def __init__(self, ui: Ui) -> None:
        super().__init__(logging.WARNING)
        self._ui = ui

    def emit(self, record: logging.LogRecord) -> None:
        text = _translate(record)
        if text:
            self._ui.warn(text)


@contextlib.contextmanager
def captured(ui: Ui) -> Generator[None]:
    """Route WARNING and above of every logger to *ui* while the block runs."""
    handler = _ToUi(ui)
    root = logging.getLogger()
    root.addHandler(handler)
    # Retries are expected (and safe); stamina announces each one as a warning.
    stamina = logging.getLogger("stamina")
    level = stamina.level
    stamina.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(handler)
        stamina.setLevel(level)
