"""Runs one README code block, as written, against an in-process ``FakeApimart``.

Used by ``test_readme.py`` as ``python readme_boot.py BLOCK.py MODE`` in a scratch
folder: the block is executed unchanged (``runpy``, as ``__main__``); only the clients
it constructs without a transport of their own are pointed at the fake and given the
test poll schedule, by standing configured subclasses in for ``AsyncApimart`` and
``Apimart``. *MODE* names what to do with what the block defined (serve its FastAPI
app, ...). The fake's counters and anything the mode observed are written to
``report.json`` for the test to check.
"""

from __future__ import annotations

import json
import runpy
import sys
from typing import Any

import anyio
import httpx

import apimart_async
from apimart_async import Limits, PollPolicy
from apimart_async.testing import FakeApimart, Latency

KEY = "readme-test-key"
# A task of the disconnect check outlives the endpoint's 0.5 s watch of its connection.
SLOW = {"fastapi-disconnect"}
FAKE = FakeApimart(
    api_key=KEY, latency=Latency.fixed(30.0) if sys.argv[2] in SLOW else Latency.fast()
)
FAST: dict[str, Any] = {
    "poll": PollPolicy().scaled(0.001),
    "limits": Limits(poll_rate=100_000.0, poll_burst=1_000),
}
report: dict[str, Any] = {}


def on_fake(kw: dict[str, Any]) -> dict[str, Any]:
    if {"transport", "http_client", "base_url"} & kw.keys():
        return kw  # the block chose its own service (the "Testing your code" example)
    return {**FAST, "transport": FAKE.transport(), **kw}


class AsyncApimart(apimart_async.AsyncApimart):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **on_fake(kw))


class Apimart(apimart_async.Apimart):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **on_fake(kw))


apimart_async.AsyncApimart = AsyncApimart  # type: ignore[misc]
apimart_async.Apimart = Apimart  # type: ignore[misc]


def serve_one(ns: dict[str, Any]) -> None:
    """POST /images to the block's app, with its lifespan, as a browser would."""
    from fastapi.testclient import TestClient

    with TestClient(ns["app"]) as http:
        response = http.post("/images", params={"prompt": "a fox"})
        report["status"], report["body"] = response.status_code, response.json()


async def leave_early(ns: dict[str, Any]) -> None:
    """POST /images, then disconnect once the task exists: the work stops, the task is kept."""
    app = ns["app"]
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        while FAKE.stats.tasks_created == 0:  # noqa: ASYNC110 - the fake's pace
            await anyio.sleep(0.001)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/images",
        "raw_path": b"/images",
        "query_string": b"prompt=a+fox",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    async with app.router.lifespan_context(app):
        with anyio.fail_after(20):
            await app(scope, receive, send)
        orphans = app.state.apimart.orphaned_tasks()
        report["orphans"] = [task.id for task in orphans]
    report["tasks"] = list(FAKE.tasks)
    report["body"] = json.loads(b"".join(m.get("body", b"") for m in sent if "body" in m))


async def push(ns: dict[str, Any]) -> None:
    """Run the block's app; the fake calls its mounted receiver back, in process."""
    app = ns["app"]
    async with (
        app.router.lifespan_context(app),
        FAKE.webhook_sender(transport=httpx.ASGITransport(app=app)),
    ):
        task = await app.state.apimart.generate(model="imagen-4.0-apimart", prompt="a fox")
    report["status"] = task.status.value
    report["received"] = ns["receiver"].stats.received
    report["webhooks"] = sorted({t.webhook or "" for t in FAKE.tasks.values()})


def main() -> None:
    block, mode = sys.argv[1], sys.argv[2]
    ns = runpy.run_path(block, run_name="__main__")
    if mode == "fastapi":
        serve_one(ns)
    elif mode == "fastapi-disconnect":
        anyio.run(leave_early, ns)
    elif mode == "webhooks":
        anyio.run(push, ns)
    report["stats"] = FAKE.stats.as_dict()
    with open("report.json", "w", encoding="utf-8") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main()
