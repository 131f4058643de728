"""OpenTelemetry spans and metrics, when the application set up OpenTelemetry.

Optional twice over: ``opentelemetry-api`` is the ``otel`` extra, and even installed
it costs nothing until the application installs a tracer or meter provider. The
decision is made once per client, when it is created, from the global providers
(``opentelemetry.trace`` / ``opentelemetry.metrics``): a provider set after
``import apimart_async`` is used by clients created afterwards. Without one,
``Telemetry.for_client()`` returns None and every call site skips its one check; when
nothing imported the API at all (and no ``OTEL_PYTHON_TRACER_PROVIDER`` /
``OTEL_PYTHON_METER_PROVIDER`` names a provider), it does not import it either.

What is recorded, the same on every transport (aiohttp, httpx, a borrowed client),
because it is recorded above the transport seam:

* a span per pipeline (``apimart.generate``, ``apimart.wait``, one per
  ``generate_many`` job) with ``gen_ai.request.model`` and ``apimart.task.id``;
  under it the stages ``apimart.upload``, ``apimart.submit``, ``apimart.poll`` and
  ``apimart.download``, and under those one CLIENT span per HTTP request following the
  HTTP semantic conventions (``http.request.method``, ``url.full`` without query or
  credentials, ``server.address``, ``http.response.status_code``, ``error.type``,
  ``http.request.resend_count`` on retries); retries are span events with the reason;
* metrics: requests by endpoint and status, retries, submits (certain/uncertain),
  queries per task, pipeline duration, jobs in flight;
* ``traceparent`` (the configured propagator) on API requests, never to other hosts.

Nothing recorded carries the API key (it lives only in a header we never record) or a
prompt (only its length).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Generator

    from .types import Task

__all__ = ["Telemetry"]

_SCOPE = "apimart_async"
_UNTRACED = object()  # a job's "span" when only metrics are recorded
# Imported by whatever sets a global provider (``set_tracer_provider``, the SDK).
_OTEL_MODULES = ("opentelemetry.trace", "opentelemetry.metrics")
# Provider classes (entry point names) the API loads by itself on the first look-up.
_OTEL_PROVIDER_VARIABLES = ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER")
_UNSET_PROVIDERS = frozenset(
    {"ProxyTracerProvider", "NoOpTracerProvider", "_ProxyMeterProvider", "NoOpMeterProvider"}
)


def _otel_configured() -> bool:
    """Whether an OpenTelemetry provider may be set: the API was imported, or the
    environment names a provider for it to load."""
    return any(name in sys.modules for name in _OTEL_MODULES) or any(
        os.environ.get(name) for name in _OTEL_PROVIDER_VARIABLES
    )


def _route(path: str) -> str:
    """The low-cardinality route of an API path (task ids are not part of it)."""
    if path == "result":
        return "{result_url}"  # a download from the result host
    if path.startswith("/v1/tasks/"):
        return "/v1/tasks/{task_id}"
    return path.split("?", 1)[0]


class Telemetry:
    """The tracer and instruments of one client; see the module docstring."""

    __slots__ = (
        "_context",
        "_duration",
        "_in_flight",
        "_polls",
        "_propagate",
        "_requests",
        "_retries",
        "_submits",
        "_trace",
        "tracer",
    )

    def __init__(self, tracer: Any, meter: Any) -> None:
        from opentelemetry import context, propagate, trace

        self._trace = trace
        self._context = context
        self._propagate = propagate
        self.tracer = tracer
        self._requests = self._retries = self._submits = None
        self._polls = self._duration = self._in_flight = None
        if meter is not None:
            self._requests = meter.create_counter(
                "apimart.client.requests", unit="{request}", description="HTTP requests sent"
            )
            self._retries = meter.create_counter(
                "apimart.client.retries", unit="{retry}", description="Attempts repeated"
            )
            self._submits = meter.create_counter(
                "apimart.client.submits",
                unit="{submit}",
                description="Paid submits, by whether their outcome is known",
            )
            self._polls = meter.create_histogram(
                "apimart.task.polls", unit="{query}", description="Task queries per task"
            )
            self._duration = meter.create_histogram(
                "apimart.pipeline.duration", unit="s", description="Whole pipelines"
            )
            self._in_flight = meter.create_up_down_counter(
                "apimart.jobs.in_flight", unit="{job}", description="Pipelines under way"
            )

    @classmethod
    def for_client(cls) -> Telemetry | None:
        """Telemetry from the global providers, or None when none is set (or installed).

        A provider is set by code that imported ``opentelemetry.trace`` or
        ``opentelemetry.metrics`` (the SDK, ``opentelemetry-instrument``), or named by
        the ``OTEL_PYTHON_*_PROVIDER`` variables (loaded on the first look-up). With
        neither, none can be set, and importing the API (milliseconds) is skipped.
        """
        if not _otel_configured():
            return None
        try:
            from opentelemetry import metrics, trace
        except ImportError:
            return None
        tracer_provider = trace.get_tracer_provider()
        meter_provider = metrics.get_meter_provider()
        tracing = type(tracer_provider).__name__ not in _UNSET_PROVIDERS
        metering = type(meter_provider).__name__ not in _UNSET_PROVIDERS
        if not tracing and not metering:
            return None
        tracer = tracer_provider.get_tracer(_SCOPE, __version__) if tracing else None
        meter = meter_provider.get_meter(_SCOPE, __version__) if metering else None
        return cls(tracer, meter)

    # -- spans ----------------------------------------------------------------------------

    def start_job(self, name: str, model: str | None, *, index: int | None = None) -> Any:
        """Start a pipeline span (not made current: its stages name it as their parent)."""
        if self._in_flight is not None:
            self._in_flight.add(1)
        if self.tracer is None:
            return _UNTRACED  # metrics only: still a job to end
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "image_generation",
            "gen_ai.provider.name": "apimart",
        }
        if model:
            attributes["gen_ai.request.model"] = model
        if index is not None:
            attributes["apimart.job.index"] = index
        return self.tracer.start_span(name, attributes=attributes)

    def end_job(
        self,
        span: Any,
        *,
        model: str | None,
        task: Task | None,
        polls: int,
        seconds: float,
        error: BaseException | str | None,
    ) -> None:
        """End a pipeline span and record its metrics (*error* may just say "cancelled")."""
        outcome = (
            "ok" if error is None else error if isinstance(error, str) else type(error).__name__
        )
        if self._in_flight is not None:
            self._in_flight.add(-1)
        if self._duration is not None and self._polls is not None:
            attributes = {"gen_ai.request.model": model or "", "apimart.outcome": outcome}
            self._duration.record(seconds, attributes)
            if polls:
                self._polls.record(polls, {"gen_ai.request.model": model or ""})
        if span is None or span is _UNTRACED:
            return
        if task is not None:
            span.set_attribute("apimart.task.id", task.id)
            span.set_attribute("apimart.task.status", task.status.value)
            if task.cost is not None:
                span.set_attribute("apimart.task.cost", task.cost)
        span.set_attribute("apimart.task.polls", polls)
        if error is not None:
            self._fail(span, error)
        span.end()

    @contextlib.contextmanager
    def stage(self, parent: Any, name: str, **attributes: Any) -> Generator[Any]:
        """A stage span under the pipeline span *parent*, current while it runs."""
        if self.tracer is None:
            yield None
            return
        context = None
        if parent is not None and parent is not _UNTRACED:
            context = self._trace.set_span_in_context(parent)
        with self.tracer.start_as_current_span(
            name, context=context, attributes=attributes, record_exception=False
        ) as span:
            try:
                yield span
            except Exception as exc:
                self._fail(span, exc)
                raise

    @contextlib.contextmanager
    def http(
        self, method: str, url: str, path: str, headers: dict[str, str] | None
    ) -> Generator[Any]:
        """A CLIENT span for one request; injects ``traceparent`` into *headers* (API
        requests only: a download passes None)."""
        if self.tracer is None:
            yield None
            return
        from opentelemetry.trace import SpanKind

        from ._retry import current_attempt

        parsed = _split(url)
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.full": parsed[0],
            "url.template": _route(path),
            "server.address": parsed[1],
        }
        if parsed[2] is not None:
            attributes["server.port"] = parsed[2]
        attempt = current_attempt()
        if attempt:
            attributes["http.request.resend_count"] = attempt
        name = f"{method} {_route(path)}" if path != "result" else f"{method} result"
        with self.tracer.start_as_current_span(
            name, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False
        ) as span:
            if headers is not None:
                self._propagate.inject(headers)
            try:
                yield span
            except Exception as exc:
                self._fail(span, exc)
                raise

    def status(self, span: Any, status: int, path: str) -> None:
        """Record an HTTP answer on its span and in the request counter."""
        if span is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 400:
                from opentelemetry.trace import Status, StatusCode

                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        if self._requests is not None:
            attributes = {"url.template": _route(path), "http.response.status_code": status}
            self._requests.add(1, attributes)

    def retry(self, call: str, attempt: int, wait: float, reason: BaseException) -> None:
        """A retry: an event on the current span, and the retry counter."""
        if self.tracer is not None:
            self._trace.get_current_span().add_event(
                "apimart.retry",
                {
                    "apimart.call": call,
                    "apimart.attempt": attempt,
                    "apimart.wait": wait,
                    "error.type": type(reason).__name__,
                },
            )
        if self._retries is not None:
            self._retries.add(1, {"apimart.call": call, "error.type": type(reason).__name__})

    def submitted(self, *, certain: bool) -> None:
        """Count a submit by whether its outcome is known."""
        if self._submits is not None:
            self._submits.add(1, {"apimart.outcome": "certain" if certain else "uncertain"})

    def bind(self, fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
        """*fn*, run later in another task (the submit keeper) under today's context."""
        captured = self._context.get_current()
        context = self._context

        async def bound(arg: Any) -> Any:
            token = context.attach(captured)
            try:
                return await fn(arg)
            finally:
                context.detach(token)

        return bound

    def _fail(self, span: Any, exc: BaseException | str) -> None:
        from opentelemetry.trace import Status, StatusCode

        kind = exc if isinstance(exc, str) else type(exc).__name__
        if kind == "cancelled" or "Cancel" in kind and not isinstance(exc, Exception):
            # The caller went away: not a failure of the job (the status stays unset).
            span.set_attribute("apimart.outcome", "cancelled")
            return
        if not isinstance(exc, str):
            span.record_exception(exc)
        span.set_attribute("error.type", kind)
        span.set_status(Status(StatusCode.ERROR, kind))


def _split(url: str) -> tuple[str, str, int | None]:
    """``url.full`` without query, fragment or credentials; the host; the port."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    if ":" in host and port is None:
        netloc = f"[{host}]"
    return f"{parts.scheme}://{netloc}{parts.path}", host, port
