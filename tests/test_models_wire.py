"""The exact JSON body each model family puts on the wire, checked at the transport."""

from __future__ import annotations

import json
from typing import Any

import pytest

from apimart_async import AsyncApimart
from apimart_async.models import Gemini31FlashImageRequest

from .conftest import FAST_POLL
from .mock import SUBMIT_A, Script, reply

pytestmark = pytest.mark.anyio

CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (
        {
            "model": "flux-kontext-pro",
            "prompt": "blue hair",
            "image_urls": ["https://x.test/a.png"],
        },
        {
            "model": "flux-kontext-pro",
            "prompt": "blue hair",
            "image_urls": ["https://x.test/a.png"],
        },
    ),
    (
        {"model": "flux-kontext-max", "prompt": "p", "size": "21:9", "safety_tolerance": 2},
        {"model": "flux-kontext-max", "prompt": "p", "size": "21:9", "safety_tolerance": 2},
    ),
    (
        {"model": "imagen-4.0-apimart", "prompt": "lighthouse", "size": "4:3", "n": 1},
        {"model": "imagen-4.0-apimart", "prompt": "lighthouse", "size": "4:3", "n": 1},
    ),
    (
        {
            "model": "gemini-3-pro-image-preview",
            "prompt": "p",
            "n": 4,
            "resolution": "4K",
            "official_fallback": True,
        },
        {
            "model": "gemini-3-pro-image-preview",
            "prompt": "p",
            "n": 4,
            "resolution": "4K",
            "official_fallback": True,
        },
    ),
    (
        {
            "model": "gemini-2.5-flash-image-preview-official",
            "prompt": "p",
            "image_urls": ["data:image/png;base64,iVBORw0KGgo="],
        },
        {
            "model": "gemini-2.5-flash-image-preview-official",
            "prompt": "p",
            "image_urls": ["data:image/png;base64,iVBORw0KGgo="],
        },
    ),
    (
        {
            "model": "gemini-3.1-flash-image-preview",
            "prompt": "p",
            "size": "8:1",
            "resolution": "0.5K",
            "google_search": True,
            "google_image_search": True,
            "n": 2,
        },
        {
            "model": "gemini-3.1-flash-image-preview",
            "prompt": "p",
            "size": "8:1",
            "resolution": "0.5K",
            "google_search": True,
            "google_image_search": True,
            "n": 2,
        },
    ),
    (
        {"model": "brand-new-model", "prompt": "p", "seed": 7},
        {"model": "brand-new-model", "prompt": "p", "seed": 7},
    ),
]


@pytest.mark.parametrize(("request_", "expected"), CASES)
async def test_body_on_the_wire(request_: dict[str, Any], expected: dict[str, Any]) -> None:
    """The transport receives exactly the expected JSON (types included: n is an int)."""
    script = Script(reply(200, SUBMIT_A))
    async with AsyncApimart(api_key="k", transport=script.transport(), poll=FAST_POLL) as client:
        await client.submit(request_, allow_unknown=True)
    sent = json.loads(script.requests[0].content)
    assert sent == expected
    assert {k: type(v) for k, v in sent.items()} == {k: type(v) for k, v in expected.items()}


async def test_model_instance_goes_out_unchanged() -> None:
    """A model instance serialises to the same bytes as its dict form."""
    script = Script(reply(200, SUBMIT_A))
    fields = {"model": "gemini-3.1-flash-image-preview", "prompt": "p", "n": 3}
    async with AsyncApimart(api_key="k", transport=script.transport(), poll=FAST_POLL) as client:
        await client.submit(Gemini31FlashImageRequest(**fields))
        await client.submit(fields)
    assert script.requests[0].content == script.requests[1].content
