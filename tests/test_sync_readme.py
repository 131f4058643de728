"""The README's "From synchronous code" example runs as written.

The block is executed unchanged against ``FakeApimart``: only the client it constructs
is pointed at the fake (its transport) and given the test poll schedule, by standing a
configured ``Apimart`` in for the one it imports.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

import apimart_async
from apimart_async import Apimart
from apimart_async.testing import FakeApimart

from .conftest import FAST_LIMITS, FAST_POLL

README = Path(__file__).resolve().parents[1] / "README.md"


def section_code(title: str) -> list[str]:
    """The ```python blocks of the README section titled *title*."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


def test_from_synchronous_code_example_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example generates, downloads and runs a batch of three, printing each outcome."""
    (block,) = section_code("From synchronous code")
    assert "from apimart_async import Apimart" in block and "Apimart()" in block
    fake = FakeApimart(api_key="test-key")
    monkeypatch.setenv("APIMART_API_KEY", "test-key")
    configured = functools.partial(
        Apimart, transport=fake.transport(), poll=FAST_POLL, limits=FAST_LIMITS
    )
    monkeypatch.setattr(apimart_async, "Apimart", configured)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})  # noqa: S102 - our README
    assert fake.stats.tasks_created == 4
    assert [p.name.endswith(".png") for p in (tmp_path / "out").iterdir()] == [True]
    printed = sorted(capsys.readouterr().out.splitlines())
    assert printed == ["0 True", "1 True", "2 True"]
