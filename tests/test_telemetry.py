"""OpenTelemetry spans and metrics, logs, and the retry line, as a user sees them.

The SDK is installed as the global provider for the whole suite (``conftest``), with
an in-memory exporter and metric reader; these tests read the trees one ``generate``
produces on each transport (our aiohttp pool over loopback, httpx in process, trio),
a retried query, a failed task, and what logging does in a script that configured
nothing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

import apimart_async as am
from apimart_async.testing import FakeApimart, Faults, Latency, Variants

from . import conftest
from .conftest import FAST_LIMITS, FAST_POLL
from .images import png

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(conftest.SPANS is None, reason="opentelemetry-sdk is not installed"),
]

KEY = "sk-test-telemetry-0123456789"
GEM = "gemini-3.1-flash-image-preview"


def spans() -> list[Any]:
    return list(conftest.SPANS.get_finished_spans())


def named(name: str) -> list[Any]:
    return [s for s in spans() if s.name == name]


def children(parent: Any) -> list[Any]:
    return [
        s for s in spans() if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def metric_points(name: str) -> list[Any]:
    data = conftest.METRICS.get_metrics_data()
    points: list[Any] = []
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    points.extend(metric.data.data_points)
    return points


def check_tree(task: am.Task, fake: FakeApimart) -> None:
    """One pipeline span; upload, submit, poll stages under it; HTTP spans under those."""
    (root,) = named("apimart.generate")
    assert root.parent is None or root.parent.span_id not in {s.context.span_id for s in spans()}
    assert root.attributes["gen_ai.request.model"] == GEM
    assert root.attributes["apimart.task.id"] == task.id
    stages = {s.name for s in children(root)}
    assert stages == {"apimart.upload", "apimart.submit", "apimart.poll"}
    routes = {stage.name: {c.name for c in children(stage)} for stage in children(root)}
    assert routes == {
        "apimart.upload": {"POST /v1/uploads/images"},
        "apimart.submit": {"POST /v1/images/generations"},
        "apimart.poll": {"GET /v1/tasks/{task_id}"},
    }
    from opentelemetry.trace import SpanKind

    (submit,) = named("POST /v1/images/generations")
    assert submit.kind is SpanKind.CLIENT
    assert submit.attributes["http.request.method"] == "POST"
    assert submit.attributes["http.response.status_code"] == 200
    assert submit.attributes["url.full"].endswith("/v1/images/generations")
    assert submit.attributes["server.address"]
    # traceparent went to the API with each request, and nowhere else.
    api = [r for r in fake.requests if r.path.startswith("/v1/")]
    assert api and all("traceparent" in r.headers for r in api)
    trace_id = f"{root.context.trace_id:032x}"
    assert all(r.headers["traceparent"].split("-")[1] == trace_id for r in api)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_span_tree_on_the_aiohttp_transport() -> None:
    fake = FakeApimart(api_key=KEY)
    async with (
        fake.serve() as base,
        am.AsyncApimart(
            api_key=KEY,
            base_url=base,
            transport_backend="aiohttp",
            poll=FAST_POLL,
            limits=FAST_LIMITS,
        ) as client,
    ):
        task = await client.generate(model=GEM, prompt="a fox", image_urls=[png(seed=3)])
    check_tree(task, fake)


async def test_span_tree_on_httpx(client_for: Any) -> None:
    """httpx in process (asyncio and trio): the same tree."""
    fake = FakeApimart(api_key=KEY)
    async with client_for(fake) as client:
        task = await client.generate(model=GEM, prompt="a fox", image_urls=[png(seed=3)])
    check_tree(task, fake)


async def test_a_retried_query_shows_its_attempts(client_for: Any) -> None:
    """A 503 then a 200: two HTTP spans under the poll, the second a resend, and an event."""
    fake = FakeApimart(api_key=KEY)
    async with client_for(fake) as client:
        task = await client.submit(model=GEM, prompt="x")
        fake.script("poll", [503, None])
        await client.get_task(task.id)
    queries = named("GET /v1/tasks/{task_id}")
    assert [q.attributes["http.response.status_code"] for q in queries] == [503, 200]
    assert "http.request.resend_count" not in queries[0].attributes
    assert queries[1].attributes["http.request.resend_count"] == 1
    retries = metric_points("apimart.client.retries")
    assert sum(p.value for p in retries) >= 1


async def test_a_failed_task_marks_its_pipeline_span(client_for: Any) -> None:
    from opentelemetry.trace import StatusCode

    fake = FakeApimart(api_key=KEY, faults=Faults(task_failure=1.0))
    async with client_for(fake) as client:
        with pytest.raises(am.TaskFailedError) as info:
            await client.generate(model=GEM, prompt="x")
    (root,) = named("apimart.generate")
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes["error.type"] == "TaskFailedError"
    assert root.attributes["apimart.task.id"] == info.value.task_id


async def test_generate_many_gives_each_job_a_span(client_for: Any, tmp_path: Any) -> None:
    fake = FakeApimart(api_key=KEY, variants=Variants(include_cost=True))
    items = [{"model": GEM, "prompt": f"p{i}"} for i in range(5)]
    async with client_for(fake) as client, client.generate_many(items, download_to=tmp_path) as out:
        outcomes = [o async for o in out]
    jobs = named("apimart.job")
    assert sorted(j.attributes["apimart.job.index"] for j in jobs) == [0, 1, 2, 3, 4]
    assert {j.attributes["apimart.task.id"] for j in jobs} == {
        o.task.id for o in outcomes if o.task
    }
    for job in jobs:  # the download belongs to its job
        assert "apimart.download" in {c.name for c in children(job)}
    downloads = named("GET result")
    assert downloads and all("?" not in d.attributes["url.full"] for d in downloads)
    assert not any("traceparent" in r.headers for r in fake.requests if r.path.startswith("/f/"))


async def test_metrics_count_requests_submits_and_durations(client_for: Any) -> None:
    fake = FakeApimart(api_key=KEY, latency=Latency.fast())
    async with client_for(fake) as client:
        await client.generate(model=GEM, prompt="x")
    requests = metric_points("apimart.client.requests")
    assert {p.attributes["url.template"] for p in requests} >= {
        "/v1/images/generations",
        "/v1/tasks/{task_id}",
    }
    submits = metric_points("apimart.client.submits")
    assert any(p.attributes["apimart.outcome"] == "certain" and p.value >= 1 for p in submits)
    assert metric_points("apimart.pipeline.duration")
    assert metric_points("apimart.task.polls")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_without_a_provider_nothing_is_traced(monkeypatch: pytest.MonkeyPatch) -> None:
    """No provider set (the default): the client does no telemetry work at all."""
    from opentelemetry import metrics, trace

    from apimart_async._telemetry import Telemetry

    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    monkeypatch.setattr(metrics, "get_meter_provider", metrics.NoOpMeterProvider)
    assert Telemetry.for_client() is None
    fake = FakeApimart(api_key=KEY)
    async with am.AsyncApimart(api_key=KEY, transport=fake.transport(), poll=FAST_POLL) as client:
        await client.generate(model=GEM, prompt="x")
    assert spans() == []
    assert not any("traceparent" in r.headers for r in fake.requests)


def run_script(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_script_that_configured_no_logging_prints_no_retry_lines() -> None:
    """Retries print nothing (INFO is not shown, stamina's line is filtered for our
    calls); another stamina user in the same process keeps its line."""
    done = run_script(
        """
        import anyio, stamina
        from apimart_async import AsyncApimart, PollPolicy
        from apimart_async.testing import FakeApimart

        async def main():
            fake = FakeApimart(api_key="k")
            async with AsyncApimart(api_key="k", transport=fake.transport(),
                                    poll=PollPolicy().scaled(0.001),
                                    retry=__import__("apimart_async").RetryPolicy(
                                        wait_initial=0.001, wait_jitter=0.0)) as client:
                task = await client.submit(model="imagen-4.0-apimart", prompt="p")
                fake.script("poll", [503, 503, 503, None])
                await client.get_task(task.id)

            attempts = []

            @stamina.retry(on=ValueError, attempts=2, wait_initial=0.001, wait_jitter=0)
            def theirs():
                attempts.append(1)
                if len(attempts) == 1:
                    raise ValueError("theirs")

            theirs()

        anyio.run(main)
        """
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == ["stamina.retry_scheduled"]  # the other library's, and only it


def test_retries_are_logged_at_info_with_their_details(
    client_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import anyio

    async def main() -> None:
        fake = FakeApimart(api_key=KEY)
        async with client_for(fake) as client:
            task = await client.submit(model=GEM, prompt="x")
            fake.script("poll", [429, None])
            await client.get_task(task.id)

    with caplog.at_level("INFO", logger="apimart_async"):
        anyio.run(main)
    retries = [r for r in caplog.records if r.name == "apimart_async.retry"]
    assert len(retries) == 1
    message = retries[0].getMessage()
    assert "task query" in message and "attempt 2 of" in message and "RateLimitError" in message


def test_metrics_only_telemetry_ends_its_jobs() -> None:
    """A meter provider without a tracer: jobs in flight go back to 0, durations and
    polls are recorded (no span is made)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from apimart_async._telemetry import Telemetry

    reader = InMemoryMetricReader()
    telemetry = Telemetry(None, MeterProvider(metric_readers=[reader]).get_meter("t"))
    for _ in range(3):
        job = telemetry.start_job("apimart.generate", GEM)
        telemetry.end_job(job, model=GEM, task=None, polls=2, seconds=0.1, error=None)
    names = {
        m.name: m.data.data_points
        for r in reader.get_metrics_data().resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
    }
    assert [p.value for p in names["apimart.jobs.in_flight"]] == [0]
    assert [p.count for p in names["apimart.pipeline.duration"]] == [3]


def test_a_spent_retry_budget_logs_no_retry_that_never_happens(
    client_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import anyio

    async def main() -> None:
        fake = FakeApimart(api_key=KEY)
        async with client_for(fake, retry=am.RetryPolicy(attempts=3, wait_initial=0.0)) as client:
            task = await client.submit(model=GEM, prompt="x")
            fake.script("poll", [503] * 10)
            with pytest.raises(am.ServerError):
                await client.get_task(task.id)

    with caplog.at_level("INFO", logger="apimart_async"):
        anyio.run(main)
    retries = [r.getMessage() for r in caplog.records if r.name == "apimart_async.retry"]
    assert [m.split(",")[1].split(" in ")[0].strip() for m in retries] == [
        "attempt 2 of 3",
        "attempt 3 of 3",
    ]
    assert all(m.count("req_") <= 1 for m in retries)  # the request id named once


_CREATE_AND_USE = """
    import sys, anyio
    from apimart_async import AsyncApimart, PollPolicy
    from apimart_async.testing import FakeApimart

    async def main():
        fake = FakeApimart(api_key="k")
        async with AsyncApimart(api_key="k", transport=fake.transport(),
                                poll=PollPolicy().scaled(0.001)) as client:
            await client.generate(model="imagen-4.0-apimart", prompt="p")
        return fake

    fake = anyio.run(main)
    otel = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
    traced = any("traceparent" in r.headers for r in fake.requests)
    print(len(fake.requests), traced, " ".join(otel))
"""


def run_clean(env: dict[str, str]) -> list[str]:
    """Run ``_CREATE_AND_USE`` in a fresh interpreter with no OTEL_* variables but *env*."""
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CREATE_AND_USE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**clean, **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_program_that_never_imported_opentelemetry_does_not_import_it() -> None:
    """Nothing imported the API and no variable names a provider: none can be set, so
    creating and using a client imports no OpenTelemetry module at all."""
    requests, traced, *otel = run_clean({})
    assert int(requests) >= 2  # the client did talk to the fake (submit, poll)
    assert traced == "False"
    assert otel == []


def test_a_provider_named_by_the_environment_is_still_used() -> None:
    """``OTEL_PYTHON_TRACER_PROVIDER`` names a provider the API loads by itself on the
    first look-up: the client looks, so its requests carry a trace context."""
    requests, traced, *otel = run_clean({"OTEL_PYTHON_TRACER_PROVIDER": "sdk_tracer_provider"})
    assert int(requests) >= 2
    assert traced == "True"
    assert "opentelemetry.trace" in otel
