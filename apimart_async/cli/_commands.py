"""The single-shot commands: ``generate``, ``upload``, ``task`` and ``models``.

Each returns its exit status: 0 on success, 1 when the service or a task failed, 2 for
usage or configuration errors (``UsageError``, raised before any request), 128+N when
stopped by signal N. Results go to stdout (file paths, URLs, JSON); the live status
line and messages go to stderr.
"""

from __future__ import annotations

import json
import signal
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from apimart_async import (
    ApimartError,
    AuthenticationError,
    InvalidRequestError,
    SubmissionUncertainError,
    TaskError,
    TaskStatus,
    TaskTimeoutError,
)
from apimart_async.models import MODELS, parse_request
from apimart_async.types import (
    CompletedEvent,
    ProgressEvent,
    SubmittedEvent,
    UploadedEvent,
)

from ._batch import describe
from ._jobfile import local_image
from ._progress import StatusLine
from ._setup import ClientOptions, UsageError, make_client
from ._signals import exit_status, interruptible

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable

    from apimart_async import AsyncApimart, Event, Task
    from apimart_async.models import BaseImageRequest

    from ._setup import Runtime
    from ._ui import Ui

__all__ = ["build_request", "cmd_generate", "cmd_models", "cmd_task", "cmd_upload"]


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
        return parse_request(data, allow_unknown=args.allow_unknown_model)
    except InvalidRequestError as exc:
        raise UsageError(str(exc)) from None


def _failure(exc: BaseException, ui: Ui) -> int:
    """Report a failed call; return the exit status."""
    if isinstance(exc, SubmissionUncertainError):
        ui.error(
            f"{describe(exc)}\nThe task may exist: check your APIMart dashboard before trying "
            "again, or resend with the same idempotency key."
        )
        return 1
    if isinstance(exc, TaskTimeoutError):
        ui.error(
            f"{describe(exc)}\nIt may still complete: apimart task {exc.task_id} --wait "
            "--download DIR"
        )
        return 1
    ui.error(describe(exc))
    return 2 if isinstance(exc, AuthenticationError) else 1


def _stop_note(ui: Ui) -> Callable[[int], None]:
    def note(signum: int) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        ui.info(f"{name}: stopping (a submit already sent is allowed to answer first)")

    return note


async def _guarded(body: Callable[[], Awaitable[None]], ui: Ui) -> int:
    """Run *body* interruptibly; map its failure to an exit status."""
    try:
        stopped = await interruptible(body, on_stop=_stop_note(ui))
    except InvalidRequestError as exc:  # e.g. an image that is not an image
        ui.error(str(exc))
        return 2
    except ApimartError as exc:
        return _failure(exc, ui)
    except OSError as exc:  # the output folder cannot be written, say
        ui.error(str(exc))
        return 1
    return 0 if stopped is None else exit_status(stopped)


# -- generate -------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace, runtime: Runtime, ui: Ui) -> int:
    """``apimart generate``: one pipeline with a live status line; prints saved paths."""
    request = build_request(args)
    client, _ = make_client(ClientOptions.from_args(args), runtime)
    return anyio.run(_generate, client, request, Path(args.out), ui, runtime, backend=args.backend)


async def _generate(
    client: AsyncApimart, request: BaseImageRequest, out: Path, ui: Ui, runtime: Runtime
) -> int:
    saved: list[Path] = []
    submitted: list[str] = []
    async with client:

        async def body() -> None:
            with StatusLine(ui, f"{request.model}: starting") as status:

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

        code = await _guarded(body, ui)
    for path in saved:
        ui.result(str(path))
    if code >= 128 and submitted and not saved:
        ui.info(
            f"task {submitted[0]} may still complete: "
            f"apimart task {submitted[0]} --wait --download {out}"
        )
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
    """``apimart task TASK_ID [--wait] [--download DIR]``."""
    client, _ = make_client(ClientOptions.from_args(args), runtime)
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

        code = await _guarded(body, ui)
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


# -- models ---------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace, runtime: Runtime, ui: Ui) -> int:
    """``apimart models``: what each model accepts (the local validation rules)."""
    del runtime
    classes = list(dict.fromkeys(MODELS.values()))
    rules = [cls.rules() for cls in classes]
    if args.json:
        ui.result(json.dumps([asdict(r) for r in rules], indent=2))
        return 0
    from rich.table import Table

    table = Table(title="models and what they accept", title_justify="left", show_lines=True)
    table.add_column("model", no_wrap=True)
    for column in ("size", "resolution", "n", "images", "data URIs", "other fields"):
        table.add_column(column, overflow="fold")
    notes: list[str] = []
    for r in rules:
        n = "-" if r.n_range is None else "-".join(dict.fromkeys(map(str, r.n_range)))
        images = "any" if r.max_images is None else str(r.max_images)
        extras = "\n".join(r.extra_fields) or "-"
        if r.max_prompt_chars is not None:
            extras += f"\nprompt <= {r.max_prompt_chars} chars"
        table.add_row(
            "\n".join(r.models),
            ", ".join(r.sizes) or "-",
            ", ".join(r.resolutions) or "-",
            n,
            images,
            "yes" if r.data_uris else "no",
            extras,
        )
        if r.notes:
            notes.append(f"{r.models[0]}: {r.notes}")
    ui.show(table)
    for note in notes:
        ui.result(note)
    ui.result(
        "other model ids: generate --allow-unknown-model / batch --allow-unknown-models "
        "send them without local validation"
    )
    return 0
