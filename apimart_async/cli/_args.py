"""The ``apimart`` command line (argparse; nothing heavy is imported here)."""

from __future__ import annotations

import argparse
import math

__all__ = ["FAKE_STATE_NAME", "build_parser"]

FAKE_STATE_NAME = ".apimart-fake-state.jsonl"
"""The embedded fake's state file, in the command's output folder (``--fake``)."""

DESCRIPTION = """\
Generate images with APIMart: one at a time, or a whole batch file with a resumable
journal. Configuration comes from flags, then APIMART_API_KEY and APIMART_BASE_URL.
Try it without a key: apimart demo"""

BATCH_EPILOG = """\
Each line of JOBS is a JSON object: {"id": "cat-1", "model": "gemini-3-pro-image-preview",
"prompt": "...", "image_urls": ["ref.png", "https://..."], "size": "16:9"}. Local image
paths are relative to the file; "id" is optional. The file is streamed: each line is
checked as it is read and a bad one is skipped (--strict checks every line first and
submits nothing if any is bad). Rerun the same command to resume: finished jobs are
skipped, submitted tasks are waited for by id (never resubmitted), missing files are
downloaded again.

Each job's idempotency key is derived from the batch id, its id and its request, so a
rerun without the journal (another machine, a replaced pod) sends the same key again.
The journal is bound to the service and account it was made with; a folder holding a
--fake trial run is refused for a real run (exit status 3), and so is a missing or
damaged journal where results exist (see --rebuild-journal).

Spending: --max-cost, --max-images and a 402 (balance exhausted) or 401 (key rejected)
from the service stop submitting; jobs already submitted are still waited for and
downloaded. Rerun the same command (with a higher limit, after a top-up, with a valid
key) to continue: nothing is paid twice. --fake keeps the fake service's state in DIR,
so a --fake run resumes too. Each run writes DIR/results.jsonl, one record per line.

Exit status: 0 all done; 1 some job not done (also: a spending limit or a 402 stopped
submitting); 2 usage error (also: the API key was rejected); 3 the folder's journal
belongs to another service or is damaged (nothing sent); 4 a journal write failed (task
ids saved to recovered-task-ids.txt); 128+N stopped by signal N."""

MERGE_EPILOG = """\
Reads DIR/shard-K-of-N/results.jsonl for every K, writes DIR/results.jsonl (one record
per job id; "files" relative to DIR) and prints a summary on stderr and, on stdout, the
id of every job that no shard finished (an invalid line without an id as "line N").
Exit status 0 when every job of the batch file is done, 1 while any is missing."""


# Each type function raises ArgumentTypeError with its own text: argparse would
# otherwise say "invalid _positive_float value", naming our function.


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _count(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0 (got {text})")
    return value


def _usd(text: str) -> float:
    value = _number(text.strip().removeprefix("$"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more USD (got {text})")
    return value


def _price(text: str) -> tuple[str, float]:
    model, sep, usd = text.partition("=")
    if not sep or not model.strip() or not usd.strip():
        raise argparse.ArgumentTypeError(
            f"takes MODEL=USD, the price of one image (e.g. flux-kontext-pro=0.04), got {text!r}"
        )
    try:
        return model.strip(), _usd(usd)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{model.strip()}: {exc}") from None


def _listen(text: str) -> tuple[str, int]:
    from ._webhook_server import parse_listen

    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shard_spec(text: str) -> str:
    # Checked here so that a bad spec is an argparse error naming --shard (exit 2).
    from ._shard import parse_shard

    try:
        parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--shard ")) from None
    return text


def _batch_id(text: str) -> str:
    from ._keys import check_batch_id

    try:
        return check_batch_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
        help="run against the built-in fake service (no key, no network); its state is "
        f"kept in the output folder ({FAKE_STATE_NAME}), so a rerun resumes its tasks",
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
    group.add_argument(
        "--fake-balance",
        type=_usd,
        metavar="USD",
        help="the fake key's balance: submits it cannot pay are refused with 402 "
        "(default: unlimited; given again on a rerun, it tops the balance up)",
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
        "--allow-unknown-models",
        "--allow-unknown-model",
        dest="allow_unknown_models",
        action="store_true",
        help="send a model id without local rules, unvalidated",
    )

    batch = commands.add_parser(
        "batch",
        parents=[api, fake, progress],
        help="run a JSONL file of requests into a folder, resumably",
        description="Run every request of a JSONL file and download the results into DIR,\n"
        "with a journal (DIR/journal.sqlite3) that makes reruns resume.",
        epilog=BATCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("jobs", metavar="JOBS.jsonl", help="the batch file")
    batch.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder")
    batch.add_argument(
        "--concurrency",
        "-c",
        type=_positive_int,
        default=32,
        help="jobs at once (32); with --shard, the total over all shards",
    )
    batch.add_argument(
        "--poll-rps",
        type=_positive_float,
        metavar="R",
        help="task queries per second (50); with --shard, the total over all shards",
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
    batch.add_argument(
        "--json",
        action="store_true",
        help="print the summary as JSON on stdout (counts by results.jsonl status, spend)",
    )
    batch.add_argument(
        "--dry-run",
        action="store_true",
        help="check every line and print the jobs and images per model (and the estimated "
        "cost, when every model has a --price); sends nothing but a balance read",
    )
    money = batch.add_argument_group("spending limits (this run's submits)")
    money.add_argument(
        "--max-cost",
        type=_usd,
        metavar="USD",
        help="submit no job that could take this run's spend over USD (finished tasks' "
        "costs plus what submits under way may cost)",
    )
    money.add_argument(
        "--max-images", type=_count, metavar="N", help="submit at most N images in this run"
    )
    money.add_argument(
        "--price",
        type=_price,
        action="append",
        metavar="MODEL=USD",
        help="what one image of MODEL costs, to estimate jobs before their tasks report a "
        "cost (a higher reported cost wins); repeatable",
    )
    hooks = batch.add_argument_group("webhooks (results pushed instead of polled)")
    hooks.add_argument(
        "--webhook-public-url",
        metavar="URL",
        help="the public http(s) URL (port 443 or 80; https outside a trial) at which "
        "APIMart reaches --webhook-listen",
    )
    hooks.add_argument(
        "--webhook-listen",
        type=_listen,
        metavar="HOST:PORT",
        help="where this process listens for the callbacks (needs the server extra)",
    )
    sharding = batch.add_argument_group("sharding and keys")
    sharding.add_argument(
        "--shard",
        type=_shard_spec,
        metavar="K/N",
        help="run only shard K of N (K from 0) in DIR/shard-K-of-N; 'auto' reads "
        "JOB_COMPLETION_INDEX/JOB_COMPLETIONS or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT",
    )
    sharding.add_argument(
        "--batch-id",
        type=_batch_id,
        metavar="ID",
        help="part of every job's idempotency key (default: 16 hex digits of the SHA-256 "
        "of JOBS, so any edit to the file changes every key; give the same ID to keep the "
        "keys of unchanged lines across edits)",
    )
    journal = batch.add_argument_group("journal recovery")
    journal.add_argument(
        "--rebuild-journal",
        action="store_true",
        help="rebuild a missing, empty, damaged or partly dropped journal from "
        "results.jsonl, the images and any recovery file before anything is sent",
    )
    journal.add_argument(
        "--same-account",
        action="store_true",
        help="accept a journal made with another API key or origin of the same account",
    )

    merge = commands.add_parser(
        "merge",
        parents=[progress],
        help="combine the results of a sharded batch",
        description="Combine the shards of `apimart batch --shard K/N` in DIR.",
        epilog=MERGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("dir", metavar="DIR", help="the --out folder of the shards")
    merge.add_argument(
        "--jobs",
        metavar="JOBS.jsonl",
        help="the batch file, to list jobs no shard reported (default: the one the "
        "shards recorded)",
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
        parents=[api, fake],
        help="show a task; optionally wait for it and download its images",
        description="Show a task's status and result URLs. With --fake, the embedded fake "
        f"is the one whose state is in the --download folder ({FAKE_STATE_NAME}; default: "
        "the current directory), where `apimart generate --fake --out DIR` kept it.",
    )
    task.add_argument("task_id", metavar="TASK_ID")
    task.add_argument("--wait", "-w", action="store_true", help="wait until it finishes")
    task.add_argument("--download", "-d", metavar="DIR", help="download its images into DIR")
    task.add_argument("--json", action="store_true", help="print the task as JSON")

    models = commands.add_parser(
        "models",
        help="list the models and what each accepts",
        description="What each model accepts: sizes, resolutions, n, reference images. "
        "One block per model on a terminal; one tab-separated line per model when piped.",
    )
    models.add_argument("--json", action="store_true", help="print the rules as JSON")

    balance = commands.add_parser(
        "balance",
        parents=[api],
        help="show what the API key (or the account) has left to spend",
        description="Read the balance of the API key (GET /v1/balance), or of the whole "
        "account with --account (GET /v1/user/balance). Costs nothing.",
    )
    balance.add_argument(
        "--account", action="store_true", help="the account's balance rather than the key's"
    )
    balance.add_argument("--json", action="store_true", help="print the balance as JSON")

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
