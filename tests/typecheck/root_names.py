# pyright: reportUnnecessaryTypeIgnoreComment=true
"""Checked by ``mypy --strict`` and pyright in ``nox -s typecheck`` (not run by pytest).

The package root loads most names lazily (PEP 562), yet type checkers see each with its
real type, and a misspelled name is still an error: the ignore below must be needed
(mypy --strict and this file's pyright setting both report an unneeded one).
"""

from __future__ import annotations

from typing_extensions import assert_type

import apimart_async
from apimart_async import AsyncApimart, Task, TaskStatus


async def users_code(client: AsyncApimart) -> Task:
    task = await client.get_task("task_123")
    assert_type(task.status, TaskStatus)
    assert_type(apimart_async.Apimart, type[apimart_async.Apimart])
    _ = apimart_async.AsyncApimrt  # type: ignore[attr-defined]
    return task
