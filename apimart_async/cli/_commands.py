"""The single-shot commands: ``generate``, ``upload``, ``task`` and ``balance``.

Each returns its exit status: 0 on success, 1 when the service or a task failed, 2 for
usage or configuration errors (``UsageError``, raised before any request; also a key
the service rejects), 128+N when stopped by signal N. Results go to stdout (file paths,
URLs, JSON); the live status line and messages go to stderr, errors in the command
line's words (``_errors``), each with what to run next where there is something.

``--fake`` keeps the embedded fake's state in the output folder (``generate --out``,
``task --download``, default the current directory), so ``apimart task ID --fake
--wait --download DIR`` picks up a task that ``apimart generate --fake --out DIR`` left
running when it was interrupted.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from apimart_async import (
    ApimartError,
    AuthenticationError,
    InsufficientBalanceError,
    InvalidRequestError,
    SubmissionUncertainError,
    TaskError,
    TaskStatus,
    TaskTimeoutError,
)
from apimart_async.models import parse_request
from apimart_async.types import (
    CompletedEvent,
    ProgressEvent,
    SubmittedEvent,
    UploadedEvent,
)

from ._args import FAKE_STATE_NAME
from ._errors import describe, explain
from ._jobfile import local_image
from ._progress import StatusLine
from ._setup import ClientOptions, UsageError, make_client
from ._signals import exit_status, interruptible

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable

    from apimart_async import AccountBalance, AsyncApimart, Event, Task
    from apimart_async.models import BaseImageRequest

    from ._setup import Runtime
    from ._ui import Ui

__all__ = [
    "balance_fields",
    "balance_text",
    "build_request",
    "cmd_balance",
    "cmd_generate",
    "cmd_task",
    "cmd_upload",
]


def event_text(event: Event) -> tuple[str, bool] | None:
    """The status line for *event*, and whether it is worth a line of its own."""
    if isinstance(event, UploadedEvent):
        cached = " (already uploaded)" if event.cached else ""
        return f"uploaded {event.image.filename}{cached}", True
    if isinstance(event, SubmittedEvent):
        return f"task {event.task_id} submitted; waiting for it", True
    if isinstance(event, ProgressEvent):
        percent = f" {event.progress}%" if event.progress is not None else ""
        return f"task {event.task_id}: {event.status.value}{percent} ({event.elapsed:.0f}s)", False
    if isinstance(event, CompletedEvent):
        count = len(event.task.image_urls)
        return f"task {event.task.id} completed; downloading {count} image(s)", True
    return None


def _existing_image(entry: str, base: Path) -> str | Path:
    path = local_image(entry, base)
    if path is None:
        return entry
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise UsageError(f"image path {entry!r} {what}")
    return path


def build_request(args: argparse.Namespace) -> BaseImageRequest:
    """The request ``generate``'s flags describe, validated for its model."""
    data: dict[str, Any] = {"model": args.model, "prompt": args.prompt}
    if args.image:
        data["image_urls"] = [_existing_image(entry, Path.cwd()) for entry in args.image]
    for name in ("size", "resolution", "n"):
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    for param in args.param or ():
        key, sep, text = str(param).partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param takes KEY=VALUE (got {param!r})")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        data[key.strip()] = value
    try:
        return parse_request(data, allow_unknown=args.allow_unknown_models)
    except InvalidRequestError as exc:
        raise UsageError(explain(exc)) from None


def _resume_command(task_id: str, folder: str = "DIR", *, fake: bool = False) -> str:
    """The command that waits for *task_id* again and downloads its images."""
    return f"apimart task {task_id} --wait --download {folder}" + (" --fake" if fake else "")


def _failure(exc: BaseException, ui: Ui, *, resume: Callable[[str], str] = _resume_command) -> int:
    """Report a failed call (with what to do next); return the exit status.

    *resume(task_id)*: the command that picks a task up again.
    """
    if isinstance(exc, SubmissionUncertainError):
        ui.error(
            f"{describe(exc)}\nThe task may exist: check the APIMart dashboard before "
            "running the command again (a new run sends a new submit, which may be paid "
            "again)."
        )
        return 1
    if isinstance(exc, TaskTimeoutError):
        ui.error(f"{describe(exc)}\nTo wait for it again: {resume(exc.task_id)}")
        return 1
    if isinstance(exc, InsufficientBalanceError):
        ui.error(f"{describe(exc)}\nThe balance is exhausted: see `apimart balance`.")
        return 1
    if isinstance(exc, AuthenticationError):
        ui.error(f"{describe(exc)}\nThe API key was rejected: check APIMART_API_KEY or --api-key.")
        return 2
    ui.error(describe(exc))
    return 1


def _stop_note(ui: Ui) -> Callable[[int], None]:
    def note(signum: int) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        ui.info(f"{name}: stopping (a submit already sent is allowed to answer first)")

    return note


async def _guarded(
    body: Callable[[], Awaitable[None]],
    ui: Ui,
    *,
    resume: Callable[[str], str] = _resume_command,
    client: AsyncApimart | None = None,
) -> int:
    """Run *body* interruptibly, then close *client* if given (a command that submits:
    a second Ctrl-C while it hears out a submit on the wire quits at once); map a
    failure to an exit status."""
    then = None if client is None else client.aclose
    try:
        stopped = await interruptible(body, on_stop=_stop_note(ui), then=then)
    except InvalidRequestError as exc:  # e.g. an image that is not an image
        ui.error(explain(exc))
        return 2
    except ApimartError as exc:
        return _failure(exc, ui, resume=resume)
    except OSError as exc:  # the output folder cannot be written, say
        ui.error(str(exc))
        return 1
    return 0 if stopped is None else exit_status(stopped)


# -- generate -------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace, runtime: Runtime, ui: Ui) -> int:
    """``apimart generate``: one pipeline with a live status line; prints saved paths."""
    request = build_request(args)
    out = Path(args.out)
    client, fake = make_client(ClientOptions.from_args(args), runtime, state_dir=out)
    fake_flag = bool(args.fake) and fake is not None
    return anyio.run(_generate, client, request, out, ui, runtime, fake_flag, backend=args.backend)


async def _generate(
    client: AsyncApimart,
    request: BaseImageRequest,
    out: Path,
    ui: Ui,
    runtime: Runtime,
    fake: bool,
) -> int:
    saved: list[Path] = []
    submitted: list[str] = []

    def resume(task_id: str) -> str:
        return _resume_command(task_id, str(out), fake=fake)

    async with client:

        async def body() -> None:
            # Nothing is announced before the first step happens: a request that fails
            # its checks (an image that is not one, say) prints only its error.
            with StatusLine(ui, f"{request.model}: starting", announce=False) as status:

                def on_event(event: Event) -> None:
                    if isinstance(event, SubmittedEvent):
                        submitted.append(event.task_id)
                    shown = event_text(event)
                    if shown is not None:
                        status.update(shown[0], important=shown[1])
                    if runtime.on_event is not None:
                        runtime.on_event(event)

                task = await client.generate(request, on_event=on_event)
                saved.extend(await client.download(task, out))

        code = await _guarded(body, ui, resume=resume, client=client)
    for path in saved:
        ui.result(str(path))
    if code >= 128 and submitted and not saved:
        ui.info(f"task {submitted[0]} may still complete: {resume(submitted[0])}")
    return code


# -- upload ---------------------------------------------------------------------------


def cmd_upload(args: argparse.Namespace, runtime: Runtime, ui: Ui) -> int:
    """``apimart upload PATH``: prints the public URL (valid 72 hours)."""
    path = Path(args.path).expanduser()
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise UsageError(f"image path {args.path!r} {what}")
    client, _ = make_client(ClientOptions.from_args(args), runtime)
    return anyio.run(_upload, client, path, args.json, ui, backend=args.backend)


async def _upload(client: AsyncApimart, path: Path, as_json: bool, ui: Ui) -> int:
    async with client:

        async def body() -> None:
            image = await client.upload_image(path)
            if as_json:
                ui.result(image.model_dump_json())
            else:
                ui.result(image.url)
                ui.info(
                    f"uploaded {image.filename} ({image.bytes:,} bytes, {image.content_type}); "
                    f"the URL is valid until {image.expires_at:%Y-%m-%d %H:%M %Z}"
                )

        return await _guarded(body, ui)


# -- task -----------------------------------------------------------------------------


def cmd_task(args: argparse.Namespace, runtime: Runtime, ui: Ui) -> int:
    """``apimart task TASK_ID [--wait] [--download DIR] [--fake]``."""
    folder = Path(args.download or ".")
    if args.fake and runtime.fake is None and not (folder / FAKE_STATE_NAME).is_file():
        ui.warn(
            f"{folder / FAKE_STATE_NAME} does not exist: this fake service knows no task "
            "yet (with --fake, pass the folder `apimart generate --fake --out DIR` wrote "
            "to as --download DIR)"
        )
    client, _ = make_client(ClientOptions.from_args(args), runtime, state_dir=folder)
    return anyio.run(_task, client, args, ui, runtime, backend=args.backend)


def _show_task(task: Task, ui: Ui, *, as_json: bool) -> None:
    if as_json:
        ui.result(task.model_dump_json())
        return
    progress = f" ({task.progress}%)" if task.progress is not None else ""
    ui.result(f"id:      {task.id}")
    ui.result(f"status:  {task.status.value}{progress}")
    for url in task.image_urls:
        ui.result(f"image:   {url}")
    if task.expires_at is not None:
        ui.result(f"expires: {task.expires_at.isoformat()}")
    if task.error is not None:
        ui.result(f"error:   {task.error.message}")


async def _task(client: AsyncApimart, args: argparse.Namespace, ui: Ui, runtime: Runtime) -> int:
    state: dict[str, Task] = {}
    async with client:

        async def body() -> None:
            task = await client.get_task(args.task_id)
            if args.wait and not task.is_terminal:
                with StatusLine(ui, f"task {task.id}: {task.status.value}") as status:

                    def on_event(event: Event) -> None:
                        shown = event_text(event)
                        if shown is not None:
                            status.update(shown[0], important=shown[1])
                        if runtime.on_event is not None:
                            runtime.on_event(event)

                    try:
                        task = await client.wait(task.id, on_event=on_event)
                    except TaskError as exc:
                        if exc.task is None or isinstance(exc, TaskTimeoutError):
                            raise
                        task = exc.task
            state["task"] = task

        def resume(task_id: str) -> str:
            return _resume_command(task_id, args.download or "DIR", fake=bool(args.fake))

        code = await _guarded(body, ui, resume=resume)
        task = state.get("task")
        if task is None:
            return code
        _show_task(task, ui, as_json=args.json)
        if task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
            return 1
        if args.download is None or code:
            return code
        if task.status is not TaskStatus.COMPLETED:
            ui.error(f"task {task.id} is {task.status.value}, not completed: add --wait")
            return 1
        saved: list[Path] = []

        async def fetch() -> None:
            saved.extend(await client.download(task, args.download))

        code = await _guarded(fetch, ui)
        for path in saved:
            ui.result(str(path))
        return code


# -- balance --------------------------------------------------------------------------


def cmd_balance(args: argparse.Namespace, runtime: Runtime, ui: Ui) -> int:
    """``apimart balance [--account] [--json]``: what is left to spend (costs nothing)."""
    client, _ = make_client(ClientOptions.from_args(args), runtime)
    return anyio.run(_balance, client, args, ui, backend=args.backend)


def balance_text(balance: AccountBalance) -> str:
    """A balance as ``12.34 USD left (5.00 used)``, or ``unlimited``."""
    unit = balance.unit or "USD"
    used = f" ({balance.used:.2f} {unit} used)" if balance.used is not None else ""
    if balance.unlimited:
        return f"unlimited{used}"
    left = "unknown" if balance.remaining is None else f"{balance.remaining:.2f}"
    return f"{left} {unit} left{used}"


def balance_fields(balance: AccountBalance) -> dict[str, Any]:
    """A balance as the JSON outputs show it."""
    return {
        "remaining": balance.remaining,
        "used": balance.used,
        "unlimited": balance.unlimited,
        "unit": balance.unit,
    }


async def _balance(client: AsyncApimart, args: argparse.Namespace, ui: Ui) -> int:
    async with client:

        async def body() -> None:
            balance = await client.balance(account=args.account)
            if args.json:
                scope = "account" if args.account else "key"
                ui.result(json.dumps({"scope": scope, **balance_fields(balance)}))
            else:
                ui.result(f"{'account' if args.account else 'key'}: {balance_text(balance)}")

        return await _guarded(body, ui)
