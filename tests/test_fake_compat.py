"""FakeApimart as other APIMart clients meet it: ``GET /v1/model-schema``, the versioned
submit answer (including the synchronous result), English messages by default.

The official skill client (``apimart-ai/apimart-skills``, ``apimart-media.mjs``) reads
the schema before every submit and requires a JSON object with string ``model`` and
``operation`` and an object ``input_schema``; it pins ``X-APIMart-Response-Version``
and reads ``data.id`` / ``data.object`` from the answer. These tests replay that flow.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from apimart_async import AsyncApimart, TaskStatus
from apimart_async.testing import MODELS, FakeApimart, Fault, Latency, Variants
from tests.conftest import FAST_LIMITS, FAST_POLL

pytestmark = pytest.mark.anyio

API = "https://api.apimart.ai"
VERSION = {"X-APIMart-Response-Version": "2026-07-27"}


def client(fake: FakeApimart, *, key: bool = True) -> httpx.AsyncClient:
    """A plain httpx client wired to *fake* (with its key unless *key* is False)."""
    headers = {"Authorization": f"Bearer {fake.api_key}"} if key else {}
    return httpx.AsyncClient(transport=fake.transport(), base_url=API, headers=headers)


async def schema(c: httpx.AsyncClient, model: str, **params: str) -> httpx.Response:
    """GET the model schema the way the skill client asks for it."""
    query = {"model": model, "operation": "image_generation", **params}
    return await c.get("/v1/model-schema", params=query)


# -- model schema ---------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(MODELS))
async def test_every_known_model_has_a_schema_the_skill_client_accepts(model: str) -> None:
    """model/operation strings, an object input_schema (JSON Schema without ``model``),
    and the fields the tool contract names."""
    fake = FakeApimart()
    async with client(fake) as c:
        response = await schema(c, model)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "model.schema"
    assert body["model"] == model and body["operation"] == "image_generation"
    assert body["endpoint"] == "/v1/images/generations"
    assert body["schema_version"] == body["response_contract"] == "2026-07-27"
    assert body["idempotency"]["header"] == "Idempotency-Key"
    input_schema = body["input_schema"]
    assert input_schema["type"] == "object" and input_schema["required"] == ["prompt"]
    properties = input_schema["properties"]
    assert "model" not in properties
    assert {"prompt", "webhook", "language"} <= set(properties)
    assert input_schema["additionalProperties"] is False
    for spec in properties.values():
        assert spec["type"] in ("string", "integer", "boolean", "array")
        assert isinstance(spec["description"], str) and spec["description"]
        if "enum" in spec and "default" in spec:
            assert spec["default"] in spec["enum"]
    assert fake.stats.schema_reads == 1


async def test_schema_limits_per_model() -> None:
    """Each family's documented fields, allowed values and limits (§4)."""
    fake = FakeApimart()
    async with client(fake) as c:
        flux = (await schema(c, "flux-kontext-max")).json()["input_schema"]["properties"]
        imagen = (await schema(c, "imagen-4.0-apimart")).json()["input_schema"]["properties"]
        pro = (await schema(c, "gemini-3-pro-image-preview")).json()["input_schema"]["properties"]
        pro_official = (await schema(c, "gemini-3-pro-image-preview-official")).json()
        flash = (await schema(c, "gemini-2.5-flash-image-preview")).json()["input_schema"]
        nb2 = (await schema(c, "gemini-3.1-flash-image-preview")).json()["input_schema"]
    assert flux["image_urls"]["maxItems"] == 1 and "n" not in flux
    assert "match_input_image" in flux["size"]["enum"]
    assert "image_urls" not in imagen and imagen["n"]["maximum"] == 1
    assert imagen["size"]["default"] == "16:9" and "21:9" not in imagen["size"]["enum"]
    assert pro["n"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 4,
        "default": 1,
        "description": pro["n"]["description"],
    }
    assert pro["resolution"]["enum"] == ["1K", "2K", "4K"]
    assert pro["image_urls"]["maxItems"] == 14 and "official_fallback" in pro
    assert "official_fallback" not in pro_official["input_schema"]["properties"]
    assert flash["properties"]["prompt"]["maxLength"] == 1000
    assert flash["properties"]["resolution"]["enum"] == ["1K"]
    nb2_props = nb2["properties"]
    assert {"1:8", "8:1", "auto"} <= set(nb2_props["size"]["enum"])
    assert nb2_props["resolution"]["enum"] == ["0.5K", "1K", "2K", "4K"]
    assert {"google_search", "google_image_search"} <= set(nb2_props)


async def test_schema_errors_use_the_error_envelope() -> None:
    """Unknown model: 404; no model: 400; another operation: 400; no key: 401."""
    fake = FakeApimart()
    async with client(fake) as c, client(fake, key=False) as anon:
        unknown = await schema(c, "dall-e-3")
        missing = await c.get("/v1/model-schema")
        video = await schema(c, "flux-kontext-pro", operation="video_generation")
        default_op = await c.get("/v1/model-schema", params={"model": "flux-kontext-pro"})
        no_key = await schema(anon, "flux-kontext-pro")
        wrong_verb = await c.post("/v1/model-schema", params={"model": "flux-kontext-pro"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "not_found_error"
    assert "dall-e-3" in unknown.json()["error"]["message"]
    assert missing.status_code == 400 and "model is required" in missing.text
    assert video.status_code == 400 and "video_generation" in video.text
    assert default_op.status_code == 200
    assert default_op.json()["operation"] == "image_generation"
    assert no_key.status_code == 401 and wrong_verb.status_code == 405


async def test_unknown_models_get_a_permissive_schema_when_accepted() -> None:
    """With ``accept_unknown_models``, any id gets an open schema with generic limits."""
    fake = FakeApimart(accept_unknown_models=True)
    async with client(fake) as c:
        body = (await schema(c, "gpt-image-2")).json()
    input_schema = body["input_schema"]
    assert body["model"] == "gpt-image-2" and input_schema["additionalProperties"] is True
    assert input_schema["properties"]["n"]["maximum"] == 10


async def test_the_official_skill_client_flow() -> None:
    """schema -> submit with the pinned version and a key -> data.id -> task query
    without language, which answers in English for an unknown id."""
    fake = FakeApimart(latency=Latency.zero())
    async with client(fake) as c:
        found = (await schema(c, "gemini-3.1-flash-image-preview")).json()
        assert found["operation"] == "image_generation"
        submitted = await c.post(
            "/v1/images/generations",
            json={"model": found["model"], "prompt": "a fox", "resolution": "1K"},
            headers={**VERSION, "Idempotency-Key": "job-1"},
        )
        body = submitted.json()
        data = body["data"]
        assert isinstance(data, dict) and data["object"] == "generation.task"
        assert isinstance(body["request_id"], str) and data["status"] == "submitted"
        assert submitted.headers["idempotency-replayed"] == "false"
        task = (await c.get(f"/v1/tasks/{data['id']}")).json()["data"]
        unknown = await c.get("/v1/tasks/task_does_not_exist")
    assert task["status"] == "completed"
    assert unknown.status_code == 400
    assert unknown.json()["error"]["message"].startswith("Invalid task ID")


# -- the synchronous result (§3.3 D) ------------------------------------------------------


async def test_synchronous_result_answer_is_the_finished_task() -> None:
    """``submit_shape="result"``: ``generation.result`` with the finished task in the
    versioned envelope; the task is queryable afterwards with the same data."""
    fake = FakeApimart(latency=Latency.fixed(30.0), variants=Variants(submit_shape="result"))
    async with client(fake) as c:
        response = await c.post(
            "/v1/images/generations",
            json={"model": "gemini-3-pro-image-preview", "prompt": "x", "n": 2},
            headers=VERSION,
        )
        body = response.json()
        data = body["data"]
        queried = (await c.get(f"/v1/tasks/{data['id']}")).json()["data"]
    assert response.status_code == 200 and body["code"] == 200
    assert body["request_id"].startswith("req_")
    assert data["object"] == "generation.result" and data["status"] == "completed"
    assert data["progress"] == 100 and len(data["result"]["images"][0]["url"]) == 2
    assert data["cost"] == pytest.approx(2 * fake.price_of("gemini-3-pro-image-preview"))
    assert {k: v for k, v in data.items() if k != "object"} == queried
    task = fake.task(data["id"])
    assert task.detected_at == task.created_at and task.real_duration == 0


async def test_synchronous_result_of_a_failed_or_stuck_task() -> None:
    """A task that fails at once is a ``generation.result`` with status failed (cost 0,
    refunded); one that cannot finish is answered as a ``generation.task``."""
    fake = FakeApimart(balance=1.0, variants=Variants(submit_shape="result"))
    fake.script("task", [Fault.TASK_FAILED, Fault.TASK_STUCK])
    async with client(fake) as c:
        failed = (
            await c.post(
                "/v1/images/generations", json={"model": "imagen-4.0-apimart", "prompt": "x"}
            )
        ).json()
        stuck = (
            await c.post(
                "/v1/images/generations", json={"model": "imagen-4.0-apimart", "prompt": "y"}
            )
        ).json()
    assert failed["data"]["object"] == "generation.result"
    assert failed["data"]["status"] == "failed" and failed["data"]["cost"] == 0
    assert "error" in failed["data"]
    assert stuck["data"] == {
        "id": stuck["data"]["id"],
        "status": "submitted",
        "object": "generation.task",
    }
    # The failed task was refunded at once; the stuck one keeps its reservation.
    assert fake.balance.used == pytest.approx(fake.price_of("imagen-4.0-apimart"))


async def test_client_takes_a_synchronous_result_as_a_definite_answer() -> None:
    """Through the real client: the submit returns the task (completed), never a
    ``SubmissionUncertainError``, and waiting on it needs no further work."""
    fake = FakeApimart(api_key="test-key", variants=Variants(submit_shape="result"))
    async with AsyncApimart(
        api_key="test-key", transport=fake.transport(), poll=FAST_POLL, limits=FAST_LIMITS
    ) as api:
        submitted = await api.submit(model="flux-kontext-pro", prompt="x")
        finished = await api.wait(submitted.id)
    assert submitted.id in fake.tasks and submitted.status is TaskStatus.COMPLETED
    assert finished.status is TaskStatus.COMPLETED and len(finished.image_urls) == 1
    assert fake.stats.tasks_created == 1


async def test_client_pins_the_version_and_gets_shape_d_by_default() -> None:
    """The default fake answers the client's pinned version with shape D."""
    fake = FakeApimart(api_key="test-key")
    async with AsyncApimart(
        api_key="test-key", transport=fake.transport(), poll=FAST_POLL, limits=FAST_LIMITS
    ) as api:
        task = await api.submit(model="flux-kontext-pro", prompt="x")
    (request,) = [r for r in fake.requests if r.endpoint == "submit"]
    assert request.headers["x-apimart-response-version"] == "2026-07-27"
    response: dict[str, Any] = fake.task(task.id).submit_response
    assert response["data"]["object"] == "generation.task" and "request_id" in response
