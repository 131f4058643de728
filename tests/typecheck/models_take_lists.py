"""Checked by ``mypy --strict`` and pyright in ``nox -s typecheck`` (not run by pytest).

What users write must type-check: request models take plain lists for their sequence
fields, and the client's results have their real types.
"""

from __future__ import annotations

from pathlib import Path

from apimart_async import AsyncApimart, Task
from apimart_async.models import FluxKontextRequest, Gemini3ProImageRequest


async def users_code(client: AsyncApimart) -> list[Path]:
    request = Gemini3ProImageRequest(
        model="gemini-3-pro-image-preview",
        prompt="make it snow",
        image_urls=[Path("ref.png"), "https://example.com/a.png"],
        resolution="2K",
        n=2,
    )
    flux = FluxKontextRequest(
        model="flux-kontext-pro", prompt="x", image_urls=["https://e.com/a.png"]
    )
    task: Task = await client.generate(request)
    await client.submit(flux)
    return await client.download(task, "out/")
