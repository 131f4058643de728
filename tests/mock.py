"""A scripted ``httpx.MockTransport`` for exact response shapes and transport faults."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx

Step = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def reply(status: int = 200, body: Any = None, **headers: str) -> httpx.Response:
    """A JSON response (or raw bytes/str body) with *headers*."""
    if isinstance(body, (bytes, str)):
        content = body.encode() if isinstance(body, str) else body
        return httpx.Response(status, content=content, headers=headers)
    return httpx.Response(status, content=json.dumps(body).encode(), headers=headers)


class Script:
    """Answers requests from a queue of steps and records every request it saw.

    A step is a response, an exception to raise (a transport fault), or a callable
    that builds the response from the request. The last step repeats when the queue
    runs dry, so "always 500" is one step.
    """

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise step
        if isinstance(step, httpx.Response):
            return httpx.Response(step.status_code, content=step.content, headers=step.headers)
        return step(request)

    def transport(self) -> httpx.MockTransport:
        """The transport to hand to ``AsyncApimart(transport=...)``."""
        return httpx.MockTransport(self)

    def bodies(self) -> list[Any]:
        """JSON bodies of the recorded requests (None where not JSON)."""
        out: list[Any] = []
        for r in self.requests:
            try:
                out.append(json.loads(r.content))
            except ValueError:
                out.append(None)
        return out


SUBMIT_A = {"code": 200, "data": [{"status": "submitted", "task_id": "task_A"}]}
SUBMIT_B = {
    "code": 200,
    "data": {
        "created": 1757156493,
        "id": "task_B",
        "model": "gpt-4o-image",
        "object": "image.generation.task",
        "progress": 0,
        "status": "pending",
        "task_info": {"can_cancel": True, "estimated_time": 100},
        "type": "image",
    },
}
SUBMIT_C = {"id": "task_C", "status": "submitted"}
SUBMIT_D = {
    "request_id": "req_1",
    "data": {"id": "task_D", "status": "submitted", "object": "generation.task"},
}


def task_body(
    task_id: str = "task_A",
    status: str = "completed",
    *,
    urls: Any = ("https://upload.apimart.ai/f/image/a_0.png",),
    url_shape: str = "list",
    **extra: Any,
) -> dict[str, Any]:
    """A task-query body in the documented envelope."""
    data: dict[str, Any] = {
        "id": task_id,
        "status": status,
        "progress": 100 if status == "completed" else 40,
        "created": 1763088289,
        "estimated_time": 60,
    }
    if status == "completed":
        expires = int(time.time()) + 86400
        if url_shape == "list":
            images = [{"url": list(urls), "expires_at": expires}]
        else:
            images = [{"url": u, "expires_at": expires} for u in urls]
        data.update(
            result={"images": images},
            completed=1763088308,
            actual_time=19,
            cost=0.15,
            credits_cost=1.5,
        )
    data.update(extra)
    return {"code": 200, "data": data}
