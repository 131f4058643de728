"""Checked by ``mypy --strict`` and pyright in ``nox -s typecheck`` (not run by pytest).

The blocking client's methods have their real return types (not ``Any``): what a user
of ``Apimart`` writes type-checks exactly as it would against ``AsyncApimart``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from typing_extensions import assert_type

from apimart_async import (
    AccountBalance,
    Apimart,
    Outcome,
    OutcomeIterator,
    Task,
    UploadedImage,
)


def users_code(client: Apimart) -> list[Path]:
    uploaded = client.upload_image(b"\x89PNG...")
    assert_type(uploaded, UploadedImage)
    task = client.submit(model="flux-kontext-pro", prompt="x", image_urls=[uploaded.url])
    assert_type(task, Task)
    assert_type(client.get_task(task.id), Task)
    assert_type(client.wait(task, timeout=None), Task)
    done = client.generate(model="gemini-3-pro-image-preview", prompt="a fox")
    assert_type(done, Task)
    assert_type(client.orphaned_tasks(), list[Task])
    with client.generate_many([{"model": "imagen-4.0-apimart", "prompt": "y"}]) as outcomes:
        assert_type(outcomes, OutcomeIterator)
        iterator: Iterator[Outcome] = outcomes  # a plain iterator of Outcomes
        for outcome in iterator:
            assert_type(outcome, Outcome)
        assert_type(outcomes.spent, float)
    assert_type(client.balance(), AccountBalance)
    return client.download(done, "out/")


def scripted() -> None:
    with Apimart() as client:
        assert_type(client, Apimart)
        users_code(client)
