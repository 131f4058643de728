"""The ``apimart`` command line (argparse; nothing heavy is imported here)."""

from __future__ import annotations

import argparse

__all__ = ["build_parser"]

DESCRIPTION = """\
Generate images with APIMart: one at a time, or a whole batch file with a resumable
journal. Configuration comes from flags, then APIMART_API_KEY and APIMART_BASE_URL.
Try it without a key: apimart demo"""

BATCH_EPILOG = """\
Each line of JOBS is a JSON object: {"id": "cat-1", "model": "gemini-3-pro-image-preview",
"prompt": "...", "image_urls": ["ref.png", "https://..."], "size": "16:9"}. Local image
paths are relative to the file; "id" is optional. Every line is checked before anything
is submitted. Rerun the same command to resume: finished jobs are skipped, submitted
tasks are waited for by id (never resubmitted), missing files are downloaded again."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0 (got {text})")
    return value


def _parents() -> dict[str, argparse.ArgumentParser]:
    api = argparse.ArgumentParser(add_help=False)
    group = api.add_argument_group("service")
    group.add_argument("--api-key", metavar="KEY", help="API key (default: $APIMART_API_KEY)")
    group.add_argument(
        "--base-url", metavar="URL", help="API origin (default: $APIMART_BASE_URL or APIMart's)"
    )
    # Scales the poll schedule (and the embedded fake's clock): tests and benchmarks.
    group.add_argument("--time-scale", type=_positive_float, help=argparse.SUPPRESS)

    fake = argparse.ArgumentParser(add_help=False)
    group = fake.add_argument_group("embedded fake service")
    group.add_argument(
        "--fake",
        action="store_true",
        help="run against the built-in fake service (no key, no network)",
    )
    group.add_argument(
        "--fake-latency",
        metavar="SPEC",
        help="task durations: fast (milliseconds) | zero | fixed:SECONDS | realistic[:MEDIAN] "
        "(default; around 15 s); SECONDS and MEDIAN run 10x faster",
    )
    group.add_argument(
        "--fake-faults",
        metavar="JSON",
        help='faults to inject, e.g. \'{"rate_limit": 0.1, "task_failure": 0.05}\'',
    )
    group.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)

    progress = argparse.ArgumentParser(add_help=False)
    progress.add_argument(
        "--progress",
        nargs="?",
        const="bar",
        default="auto",
        choices=("auto", "bar", "plain", "off"),
        help="live display: a bar on a terminal (auto), or plain lines; "
        "--progress alone forces the bar",
    )
    return {"api": api, "fake": fake, "progress": progress}


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line."""
    from apimart_async import __version__

    parser = argparse.ArgumentParser(
        prog="apimart",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Which event loop runs the command (tests cover trio too).
    parser.add_argument(
        "--backend", choices=("asyncio", "trio"), default="asyncio", help=argparse.SUPPRESS
    )
    parents = _parents()
    api, fake, progress = parents["api"], parents["fake"], parents["progress"]
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser(
        "generate",
        parents=[api, fake, progress],
        help="generate images from one prompt and save them",
        description="Upload local images, submit, wait and download: one pipeline, with a "
        "live status line. Prints the saved file paths.",
    )
    gen.add_argument("--model", "-m", required=True, help="model id (see: apimart models)")
    gen.add_argument("--prompt", "-p", required=True, help="the prompt")
    gen.add_argument(
        "--image",
        "-i",
        action="append",
        metavar="PATH_OR_URL",
        help="reference image: a local file (uploaded first) or an http(s) URL; repeatable",
    )
    gen.add_argument("--size", "-s", help="aspect ratio, e.g. 16:9")
    gen.add_argument("--resolution", "-r", help="e.g. 1K, 2K, 4K")
    gen.add_argument("-n", type=_positive_int, help="number of images")
    gen.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="another request field (VALUE parsed as JSON if it can be); repeatable",
    )
    gen.add_argument("--out", "-o", default=".", metavar="DIR", help="where to save (.)")
    gen.add_argument("--timeout", type=_positive_float, metavar="SECONDS", help="deadline")
    gen.add_argument(
        "--allow-unknown-model",
        action="store_true",
        help="send a model id without local rules, unvalidated",
    )

    batch = commands.add_parser(
        "batch",
        parents=[api, fake, progress],
        help="run a JSONL file of requests into a folder, resumably",
        description="Run every request of a JSONL file and download the results into DIR, "
        "with a journal (DIR/journal.sqlite3) that makes reruns resume.",
        epilog=BATCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("jobs", metavar="JOBS.jsonl", help="the batch file")
    batch.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder")
    batch.add_argument(
        "--concurrency", "-c", type=_positive_int, default=32, help="jobs at once (32)"
    )
    batch.add_argument(
        "--poll-rps", type=_positive_float, metavar="R", help="task queries per second (50)"
    )
    batch.add_argument(
        "--timeout", type=_positive_float, metavar="SECONDS", help="deadline per job (900)"
    )
    batch.add_argument(
        "--strict", action="store_true", help="stop before submitting anything if a line is bad"
    )
    batch.add_argument(
        "--resubmit-uncertain",
        action="store_true",
        help="resend jobs whose submit outcome is unknown, with the same idempotency key",
    )
    batch.add_argument(
        "--allow-unknown-models",
        action="store_true",
        help="send model ids without local rules, unvalidated",
    )

    upload = commands.add_parser(
        "upload",
        parents=[api],
        help="upload an image; print its public URL (valid 72 h)",
        description="Upload one image and print its public URL (valid 72 hours).",
    )
    upload.add_argument("path", metavar="PATH", help="JPEG, PNG, WebP or GIF, up to 20 MB")
    upload.add_argument("--json", action="store_true", help="print the upload as JSON")

    task = commands.add_parser(
        "task",
        parents=[api],
        help="show a task; optionally wait for it and download its images",
        description="Show a task's status and result URLs.",
    )
    task.add_argument("task_id", metavar="TASK_ID")
    task.add_argument("--wait", "-w", action="store_true", help="wait until it finishes")
    task.add_argument("--download", "-d", metavar="DIR", help="download its images into DIR")
    task.add_argument("--json", action="store_true", help="print the task as JSON")

    models = commands.add_parser(
        "models",
        help="list the models and what each accepts",
        description="The local validation rules per model: sizes, resolutions, n, images.",
    )
    models.add_argument("--json", action="store_true", help="print the rules as JSON")

    demo = commands.add_parser(
        "demo",
        parents=[progress],
        help="run an example batch against the built-in fake service",
        description="Run the bundled example batch against the embedded fake service (no "
        "key, no network), with a few injected faults, and save the images.",
    )
    demo.add_argument(
        "--jobs", "-j", type=_positive_int, default=24, metavar="N", help="how many jobs (24)"
    )
    demo.add_argument(
        "--out",
        "-o",
        default="apimart-demo-output",
        metavar="DIR",
        help="output folder (./apimart-demo-output)",
    )
    demo.add_argument("--concurrency", "-c", type=_positive_int, default=8, help="jobs at once (8)")
    demo.add_argument("--time-scale", type=_positive_float, help=argparse.SUPPRESS)
    demo.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return parser
