"""A fake APIMart image service for tests, benchmarks and demos.

``FakeApimart`` implements the service's upload, submit, task and file endpoints with
its documented (and observed) bodies, tasks that progress on a clock, every response
variant the service has been seen to send, latency profiles and fault injection, and
counts everything so tests can assert on it. It also has the service's money (a key
balance that task costs draw down, 402 once it is spent, ``GET /v1/balance``), its
``GET /v1/model-schema`` answers, webhook callbacks (``Webhooks``,
``fake.webhook_sender()``), and an optional state file so a fake re-created in a new
process continues the old one's tasks (``state_path=``)::

    from apimart_async import AsyncApimart
    from apimart_async.testing import FakeApimart, Faults

    fake = FakeApimart(faults=Faults(rate_limit=0.1))
    async with AsyncApimart(api_key="test", transport=fake.transport()) as client:
        task = await client.generate(model="imagen-4.0-apimart", prompt="a lighthouse")
    assert fake.stats.tasks_created == 1 and not fake.duplicate_keys()

Run it as a real HTTP server with ``async with fake.serve() as base_url:`` or
``python -m apimart_async.testing --port 0`` (needs the ``server`` extra, uvicorn).

The fake is deliberately independent of the client's code (its own sniffing, its own
parsing), so that a test of the client against it can catch a bug in either.
"""

from __future__ import annotations

from ._app import MAX_UPLOAD_BYTES
from ._billing import Balance
from ._fake import DEFAULT_BASE_URL, DEFAULT_FILES_BASE_URL, FakeApimart
from ._images import RESULT_PNG
from ._options import (
    Endpoint,
    Fault,
    Faults,
    FaultsSpec,
    Latency,
    ManualClock,
    ScriptStep,
    Variants,
    Webhooks,
)
from ._state import MODELS, FakeStats, ModelRules, RecordedRequest
from ._task import FakeTask
from ._transport import FakeTransport
from ._webhooks import WebhookDelivery, WebhookSender

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_FILES_BASE_URL",
    "MAX_UPLOAD_BYTES",
    "MODELS",
    "RESULT_PNG",
    "Balance",
    "Endpoint",
    "FakeApimart",
    "FakeStats",
    "FakeTask",
    "FakeTransport",
    "Fault",
    "Faults",
    "FaultsSpec",
    "Latency",
    "ManualClock",
    "ModelRules",
    "RecordedRequest",
    "ScriptStep",
    "Variants",
    "WebhookDelivery",
    "WebhookSender",
    "Webhooks",
]


def _relabel() -> None:
    # Show public classes as ``apimart_async.testing.X`` in reprs and tracebacks.
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type):
            obj.__module__ = __name__


_relabel()
del _relabel
