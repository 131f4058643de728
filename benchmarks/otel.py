"""The OpenTelemetry a worker process runs with (``python -m benchmarks.worker --otel``).

Set before the client exists: ``Telemetry.for_client`` reads the global providers
when a client is created. Four set-ups, for the tracing scenario (``tracing.py``):

* ``none``: the package hidden, as if not installed (``import opentelemetry`` raises);
* ``api``: installed, no provider set (a library user who never configured it; the
  worker's default);
* ``noop``: ``NoOpTracerProvider`` and ``NoOpMeterProvider`` set;
* ``sdk``: the SDK recording every span into an in-memory exporter and metrics into
  an in-memory reader: what tracing costs when it is on.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["OTEL_MODES", "OtelSetup"]

OTEL_MODES = ("none", "api", "noop", "sdk")


class OtelSetup:
    """The process-wide OpenTelemetry state of one worker, set before the client exists
    (``Telemetry.for_client`` reads the global providers when a client is created)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._exporter: Any = None  # sdk: InMemorySpanExporter
        self._reader: Any = None  # sdk: InMemoryMetricReader
        if mode == "none":
            # A None entry makes every ``import opentelemetry...`` raise ImportError,
            # exactly as when the package is not installed.
            for name in [m for m in sys.modules if m.split(".")[0] == "opentelemetry"]:
                del sys.modules[name]
            sys.modules["opentelemetry"] = None  # type: ignore[assignment]
        elif mode == "noop":
            from opentelemetry import metrics, trace

            trace.set_tracer_provider(trace.NoOpTracerProvider())
            metrics.set_meter_provider(metrics.NoOpMeterProvider())
        elif mode == "sdk":
            from opentelemetry import metrics, trace
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )

            # SimpleSpanProcessor exports each span as it ends, inside the measured
            # section (a BatchSpanProcessor would defer part of the work past it).
            self._exporter = InMemorySpanExporter()
            tracer_provider = TracerProvider()
            tracer_provider.add_span_processor(SimpleSpanProcessor(self._exporter))
            trace.set_tracer_provider(tracer_provider)
            self._reader = InMemoryMetricReader()
            metrics.set_meter_provider(MeterProvider(metric_readers=[self._reader]))

    def clear(self) -> None:
        """Forget the warm-up's spans, so the count covers the measured section."""
        if self._exporter is not None:
            self._exporter.clear()

    def report(self) -> dict[str, Any]:
        """What the worker's JSON says about OpenTelemetry: the mode, whether the package
        was imported at all, and (sdk) the spans and metric series recorded."""
        out: dict[str, Any] = {
            "otel": self.mode,
            "otel_imported": sys.modules.get("opentelemetry") is not None,
        }
        if self._exporter is not None:
            out["otel_spans"] = len(self._exporter.get_finished_spans())
            out["otel_metric_series"] = _metric_series(self._reader)
        return out


def _metric_series(reader: Any) -> int:
    """Data points (one per metric and attribute set) the reader collects now."""
    data = reader.get_metrics_data()
    if data is None:
        return 0
    return sum(
        len(metric.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    )
