"""``apimart demo``: the bundled example batch against the embedded fake service.

No key, no network: a ``FakeApimart`` in this process answers with realistic task
durations (lognormal around 15 s, the service's own shape) run ``1 / time_scale``
times faster, and the client's poll schedule is scaled the same way. A few faults are
injected on purpose: 429s and 5xx answers that the client retries on its own, and two
tasks that the service fails (they appear in the summary as failed, which is the
point). The run uses the real ``batch`` machinery: journal, progress, downloads,
``results.jsonl`` and the summary.

The demo starts afresh each time: the journal of an earlier demo in the output folder
is removed first (a folder holding a real batch's journal is refused).

Exit status 0 means the demo ran as designed: every job is done except exactly the
injected task failures.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apimart_async.testing import RESULT_PNG, Endpoint, FakeApimart, Fault, Faults, Latency

from ._batch import RESULTS_NAME, BatchSettings, run_batch
from ._journal import JOURNAL_NAME, read_meta, remove
from ._setup import ClientOptions, Runtime, UsageError

if TYPE_CHECKING:
    import argparse

    from ._ui import Ui

__all__ = ["DEMO_JOBS", "cmd_demo", "demo_fake", "demo_lines"]

DEMO_JOBS = 24
DEMO_TIME_SCALE = 0.1
JOBS_NAME = "demo_jobs.jsonl"
REFERENCE_NAME = "reference.png"
# Request latency in service seconds (scaled like everything else).
_REQUEST_LATENCY = (0.2, 1.2)
_FAULTS: dict[Endpoint, Faults] = {
    "upload": Faults(server_error=0.2),
    "submit": Faults(rate_limit=0.1),
    "poll": Faults(server_error=0.02, rate_limit=0.02, reset=0.01),
    "download": Faults(server_error=0.05),
}


def demo_lines(jobs: int) -> list[dict[str, Any]]:
    """The bundled batch, cut or repeated (with ``-2``, ``-3``... ids) to *jobs* lines."""
    text = resources.files("apimart_async.cli").joinpath(JOBS_NAME).read_text(encoding="utf-8")
    base: list[dict[str, Any]] = [json.loads(line) for line in text.splitlines() if line.strip()]
    lines: list[dict[str, Any]] = []
    for i in range(jobs):
        line = dict(base[i % len(base)])
        round_ = i // len(base)
        if round_:
            line["id"] = f"{line['id']}-{round_ + 1}"
        lines.append(line)
    return lines


def failure_positions(jobs: int) -> list[int]:
    """Which created tasks (0-based, in creation order) the demo fails on purpose."""
    return [] if jobs < 4 else sorted({jobs // 4, (3 * jobs) // 4})


def demo_fake(jobs: int, *, time_scale: float, seed: int = 0) -> FakeApimart:
    """The demo's fake: realistic scaled latency, a few retried faults, scripted failures."""
    low, high = _REQUEST_LATENCY
    fake = FakeApimart(
        api_key="demo",
        latency=Latency.realistic(
            time_scale=time_scale, request_latency=(low * time_scale, high * time_scale)
        ),
        faults=dict(_FAULTS),
        seed=seed,
    )
    failures = failure_positions(jobs)
    if failures:
        fates: list[Fault | None] = [None] * (failures[-1] + 1)
        for position in failures:
            fates[position] = Fault.TASK_FAILED
        fake.script("task", fates)
    return fake


def _prepare(out: Path, jobs: int) -> Path:
    """Write the demo batch and its reference image into *out*; drop an old demo journal."""
    if (out / JOURNAL_NAME).exists():
        kind = read_meta(out, "kind")
        if kind != "demo":
            raise UsageError(
                f"{out} holds the journal of a real batch; choose another folder with --out"
            )
        remove(out)
        (out / RESULTS_NAME).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / REFERENCE_NAME).write_bytes(RESULT_PNG)
    path = out / JOBS_NAME
    with path.open("w", encoding="utf-8") as fh:
        for line in demo_lines(jobs):
            fh.write(json.dumps(line) + "\n")
    return path


def cmd_demo(args: argparse.Namespace, runtime: Runtime, ui: Ui) -> int:
    """``apimart demo [--jobs N] [--out DIR]``; see the module docstring."""
    jobs: int = args.jobs
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    scale: float = args.time_scale or DEMO_TIME_SCALE
    out = Path(args.out)
    jobs_path = _prepare(out, jobs)
    fake = demo_fake(jobs, time_scale=scale, seed=args.seed)
    expected = len(failure_positions(jobs))
    ui.info(
        f"apimart demo: {jobs} jobs against the built-in fake service (no key, no network), "
        f"{1 / scale:g}x faster than real time. Injected on purpose: 429 and 5xx answers "
        f"(retried automatically) and {expected} task failure(s)."
    )
    settings = BatchSettings(
        jobs_path=jobs_path,
        out=out,
        concurrency=args.concurrency,
        kind="demo",
        title="demo",
    )
    result = run_batch(
        settings,
        ClientOptions(time_scale=scale),
        Runtime(fake=fake, on_event=runtime.on_event),
        ui,
        backend=args.backend,
    )
    injected = {k: v for k, v in sorted(fake.stats.faults.items()) if v}
    if injected:
        ui.result("injected faults: " + ", ".join(f"{k} x{v}" for k, v in injected.items()))
    if result.exit_code not in (0, 1):
        return result.exit_code
    failed = [r for r in result.records.values() if r.state != "done"]
    as_designed = len(failed) == expected and all(
        r.state == "failed" and (r.error or "").startswith("TaskFailedError") for r in failed
    )
    ui.result(f"images: {out.resolve()}")
    if as_designed:
        ui.info(
            f"The demo ran as designed: {len(result.records) - expected} jobs done, "
            f"{expected} failed on purpose. Run your own with: apimart batch JOBS.jsonl "
            f"--out DIR (see {jobs_path} for the format)"
        )
        return 0
    ui.error("the demo did not run as designed: see the summary above")
    return 1
