"""Scenario ``webhooks`` (issue 21): task queries and detection lag, pushed vs polled.

On the fake's realistic task durations (scaled like scenario 4), the same pipelines
run three times, each against a fresh fake whose callbacks lose *drop* of their
deliveries (``--webhooks '{"drop": 0.01}'``):

* our ``generate_many`` with adaptive polling (no webhook): the baseline;
* ``generate_many`` on a client created with ``webhooks=receiver``;
* one ``generate`` per pipeline on such a client (the web-app shape).

The worker serves the ``WebhookReceiver`` under uvicorn on a loopback port, on its own
event loop; its ``public_url`` is a public-looking name (the client refuses loopback
webhooks, as the service would never call them) that the fake's
``--webhook-rewrite`` maps to that port. Per task, the fake counts the queries it
answered, and the worker records when the outcome reached it: detection lag is that
moment minus the fake's completion time (one system-wide monotonic clock). Tasks with
no query at all were resolved by their push; the others (lost callbacks) by the
client's safety-net poll.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from .fakeserver import FakeServer
from .report import Scenario, Target
from .runs import LABELS, Runner, Sizes, check_complete, fake_requests, free_port, ms, per_pipe

__all__ = ["webhooks"]

PUBLIC_ORIGIN = "https://hooks.bench.example.com"
PUBLIC_URL = f"{PUBLIC_ORIGIN}/hooks"
QUERIES_TARGET = 0.3  # issue 21: task queries per pipeline with 1% of callbacks dropped
LAG_TARGET = 1.0  # issue 21: detection lag <= 1% of the task's time (percent)
# (impl, results pushed?)
RUNS = (("apimart", False), ("apimart-generate", True), ("apimart", True))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def webhooks(sizes: Sizes, verbose: bool) -> Scenario:
    """Queries per pipeline and detection lag with webhooks against adaptive polling."""
    n, conc = sizes.webhooks_pipelines, sizes.webhooks_concurrency
    scale, drop = sizes.webhooks_scale, sizes.webhooks_drop
    sc = Scenario(
        "webhooks",
        f"5. Webhooks: {n} pipelines at concurrency {conc}, realistic latency x{scale:g} "
        f"(median task {15 * scale * 1000:.0f} ms), {100 * drop:g}% of callbacks dropped",
        [
            "client, results by",
            "queries/pipe",
            "pushed",
            "by poll",
            "lag ms",
            "p95 ms",
            "lag/dur",
            "lag/dur all",
            "median all",
            "net lag s",
            "callbacks ok/lost",
            "wall s",
            "CPU ms/pipe",
            "req/pipe",
        ],
        settings={
            "pipelines": n,
            "concurrency": conc,
            "latency": "realistic",
            "time_scale": scale,
            "webhooks": {"drop": drop},
            "public_url": PUBLIC_URL,
            "fake_commands": [],
        },
    )
    results: list[tuple[str, bool, dict[str, Any]]] = []
    for impl, pushed in RUNS:
        port = free_port()
        extra = ["--webhooks", json.dumps({"drop": drop})]
        extra += ["--webhook-rewrite", f"{PUBLIC_ORIGIN}=http://127.0.0.1:{port}"]
        # A fresh fake per run: its counters, schedule and callback connections are
        # this run's alone.
        with FakeServer(latency="realistic", time_scale=scale, extra_args=extra) as fake:
            sc.settings["fake_commands"].append(shlex.join(fake.command()))
            runner = Runner(fake, sc, verbose=verbose)
            options: dict[str, Any] = {
                "pipelines": n,
                "concurrency": conc,
                "lags": True,
                "poll": "adaptive",
                "poll_scale": scale,
                "poll_rate": 50.0 / scale,  # the default poll budget, scaled like the clock
            }
            if pushed:
                options.update(webhook_port=port, webhook_public_url=PUBLIC_URL)
            run = runner.run(impl, **options)
        check_complete(sc, run)
        results.append((impl, pushed, run))
        _row(sc, impl, pushed, run)
    for impl, pushed, run in results:
        if not pushed:
            continue
        lags = run.get("lags") or {}
        on_push = lags.get("pushed") or {}
        sc.targets.append(
            Target(
                f"{LABELS[impl]} with webhooks: task queries per pipeline",
                lags.get("polls_mean"),
                QUERIES_TARGET,
            )
        )
        value = on_push.get("lag_over_duration_mean")
        sc.targets.append(
            Target(
                f"{LABELS[impl]} with webhooks: detection lag / task time (mean over pushed tasks)",
                None if value is None else 100 * value,
                LAG_TARGET,
                unit="%",
                note=f"{ms(on_push.get('lag_mean_s'))} ms mean",
            )
        )
        receiver = run.get("receiver") or {}
        if receiver.get("rejected"):
            sc.notes.append(f"{LABELS[impl]}: the receiver rejected {receiver['rejected']}")
        counts = run.get("fake") or {}
        retried = counts.get("webhook_attempts", 0) - counts.get("webhooks_delivered", 0)
        if retried > 0:
            sc.notes.append(
                f"{LABELS[impl]}: {retried} callback attempts got no 2xx (retried by the fake)"
            )
    sc.notes.append(
        "lag ms, p95 ms, lag/dur: tasks resolved by their push (the mean of per-task lag / "
        "task duration); lag/dur all and median all: every task; net lag s: the mean lag "
        "of tasks found by the safety-net poll (their callback was lost)"
    )
    sc.notes.append(
        "lag = the worker's time.monotonic() when the outcome reached it - the fake's "
        "completion time (one system-wide monotonic clock). At this time "
        f"scale tasks are {1 / scale:g}x shorter than the service's while the push's "
        "absolute delay (an HTTP hop on a shared machine) is not scaled, so the relative "
        "lag is that much larger than it would be in production"
    )
    sc.notes.append(
        "by poll = tasks whose callback was dropped, found by the client's safety-net "
        "query: the first at max(push_safety_min, push_safety_factor x estimated time; "
        "push_expected_time when the submit answer gives none) x time_scale (PollPolicy)"
    )
    return sc


def _label(impl: str, pushed: bool) -> str:
    return f"{LABELS[impl]}, {'webhooks' if pushed else 'adaptive polls'}"


def _row(sc: Scenario, impl: str, pushed: bool, run: dict[str, Any]) -> None:
    lags = run.get("lags") or {}
    if not lags.get("matched"):
        sc.rows.append([_label(impl, pushed), *["-"] * (len(sc.columns) - 1)])
        return
    on_push = lags.get("pushed") or {}
    by_poll = lags.get("queried") or {}
    fake = run.get("fake") or {}
    sc.rows.append(
        [
            _label(impl, pushed),
            f"{lags['polls_mean']:.3f}",
            str(on_push.get("count", 0)),
            str(by_poll.get("count", 0)),
            ms(on_push.get("lag_mean_s")),
            ms(on_push.get("lag_p95_s")),
            _pct(on_push.get("lag_over_duration_mean")),
            _pct(lags.get("lag_over_duration_mean")),
            _pct(lags.get("lag_over_duration_median")),
            "-" if not by_poll.get("count") else f"{by_poll['lag_mean_s']:.2f}",
            f"{fake.get('webhooks_delivered', 0)}/{fake.get('webhooks_dropped', 0)}",
            f"{run.get('wall_s', 0):.2f}",
            ms(per_pipe(run, "cpu_s")),
            fake_requests(run),
        ]
    )
    if lags.get("returned_before_detected") or lags.get("lag_min_s", 0) < 0:
        sc.notes.append(f"{LABELS[impl]}: clock check failed (a return before detection)")
