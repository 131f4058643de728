"""Every code block of README.md runs, as written, so the README cannot drift.

Python blocks run in a fresh interpreter each (they call ``asyncio.run``, set a global
tracer provider, configure logging) through ``readme_boot.py``, against an in-process
fake, and each has a check of what it printed, wrote and sent. Shell blocks run the
``apimart`` commands they show against the fake served over real HTTP; the install and
test commands are checked against ``pyproject.toml``, ``noxfile.py`` and ``.ci/run``.
The error tree is checked against the exception classes. A block without a check fails
``test_every_block_is_checked``, so a new example cannot slip in untested.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

import apimart_async
from apimart_async.testing import FakeApimart

from .images import jpeg, png

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BOOT = Path(__file__).with_name("readme_boot.py")
KEY = "readme-test-key"  # the key readme_boot.py's fake accepts


@dataclass(frozen=True)
class Block:
    section: str  # the nearest heading above it
    index: int  # its place among the blocks of that section
    lang: str
    code: str
    line: int  # where it starts in README.md

    @property
    def name(self) -> str:
        return f"{self.section}#{self.index}"


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    section, counts = "", dict[str, int]()
    lines = README.read_text(encoding="utf-8").splitlines()
    number = 0
    while number < len(lines):
        text = lines[number]
        if heading := re.match(r"#{2,3} (.+)", text):
            section = heading.group(1)
        elif fence := re.match(r"```(\w*)$", text):
            end = lines.index("```", number + 1)
            index = counts.get(section, 0)
            counts[section] = index + 1
            code = "\n".join(lines[number + 1 : end]) + "\n"
            blocks.append(Block(section, index, fence.group(1), code, number + 1))
            number = end
        number += 1
    return blocks


BLOCKS = readme_blocks()


def of(lang: str) -> list[Any]:
    return [pytest.param(b, id=b.name) for b in BLOCKS if b.lang == lang]


# -- python blocks ------------------------------------------------------------------------


@dataclass
class Ran:
    stdout: str
    stderr: str
    folder: Path
    report: dict[str, Any]

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self.report["stats"])

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


def run_python(block: Block, folder: Path, mode: str) -> Ran:
    (folder / "cat.jpg").write_bytes(jpeg())
    (folder / "photo.jpg").write_bytes(jpeg())
    (folder / "ref.png").write_bytes(png())
    # Padding keeps tracebacks pointing at the README's own line numbers.
    script = folder / "block.py"
    script.write_text("\n" * block.line + block.code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APIMART_", "OTEL_"))}
    env["APIMART_API_KEY"] = KEY
    done = subprocess.run(
        [sys.executable, str(BOOT), str(script), mode],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"README line {block.line}:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    return Ran(done.stdout, done.stderr, folder, report)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def check_quickstart(ran: Ran) -> None:
    (printed,) = ran.lines  # the two result URLs
    assert printed.count("https://") == 2
    assert len(files(ran.folder / "out")) == 2
    assert ran.stats["uploads"] == 1 and ran.stats["tasks_created"] == 1


def check_step_by_step(ran: Ran) -> None:
    status, cost = ran.stdout.split()
    assert status == "completed" and float(cost) > 0
    assert ran.stats["uploads"] == 1 and ran.stats["tasks_created"] == 1


def check_many(ran: Ran) -> None:
    *outcomes, total = ran.lines
    assert sorted(line.split()[0] for line in outcomes) == ["0", "1", "2"]
    assert all(".png" in line for line in outcomes)
    assert re.fullmatch(r"spent \d+\.\d\d USD; 0 jobs of unknown cost", total)
    assert len(files(ran.folder / "out")) == 3


def check_budget(ran: Ran) -> None:
    (printed,) = ran.lines
    assert re.fullmatch(r"50 done, \d+\.\d\d USD; the rest was not submitted", printed)
    assert ran.stats["tasks_created"] == 50


def check_sync(ran: Ran) -> None:
    assert sorted(ran.lines) == ["0 True", "1 True", "2 True"]
    assert ran.stats["tasks_created"] == 4
    assert len(files(ran.folder / "out")) == 1


def check_fastapi(ran: Ran) -> None:
    assert ran.report["status"] == 200
    assert [u.startswith("https://") for u in ran.report["body"]["urls"]] == [True]


def check_fastapi_disconnect(ran: Ran) -> None:
    # The client left while the task ran: the work stopped, the task was kept for the app.
    assert ran.report["body"] == {"urls": []}
    assert ran.report["orphans"] == ran.report["tasks"] and len(ran.report["tasks"]) == 1
    assert ran.stats["downloads"] == 0


def check_webhooks(ran: Ran) -> None:
    assert ran.report["status"] == "completed" and ran.report["received"] == 1
    (url,) = ran.report["webhooks"]
    assert re.fullmatch(r"https://example.com/hooks/[\w-]{20,}", url)


def check_tracing(ran: Ran) -> None:
    (printed,) = ran.lines
    names = set(re.findall(r"'([^']+)'", printed))
    stages = {"apimart.generate", "apimart.submit", "apimart.poll"}
    assert stages | {"POST /v1/images/generations", "GET /v1/tasks/{task_id}"} <= names
    assert "INFO apimart_async" in ran.stderr


def check_testing(ran: Ran) -> None:
    # The block asserts on its own fake; the stand-in client's fake was never used.
    assert ran.stdout == "" and ran.stats["requests_total"] == 0


# Each python block, by section and place: (mode for readme_boot.py, check).
PYTHON: dict[str, list[tuple[str, Callable[[Ran], None]]]] = {
    "Quickstart#0": [("plain", check_quickstart)],
    "Quickstart#1": [("plain", check_step_by_step)],
    "Many at once#0": [("plain", check_many)],
    "What it costs, and capping it#0": [("plain", check_budget)],
    "From synchronous code#0": [("plain", check_sync)],
    "In a FastAPI app#0": [
        ("fastapi", check_fastapi),
        ("fastapi-disconnect", check_fastapi_disconnect),
    ],
    "Webhooks#0": [("webhooks", check_webhooks)],
    "Logging and tracing#0": [("plain", check_tracing)],
    "Testing your code#0": [("plain", check_testing)],
}


@pytest.mark.parametrize("block", of("python"))
def test_python_block(block: Block, tmp_path: Path) -> None:
    for number, (mode, check) in enumerate(PYTHON[block.name]):
        folder = tmp_path / str(number)
        folder.mkdir()
        check(run_python(block, folder, mode))


# -- shell blocks ---------------------------------------------------------------------------


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def check_install(command: str) -> None:
    """``pip install ".[a,b]"`` or ``"apimart-async[a]"``: the package and extras exist."""
    for spec in re.findall(r"install \"?([^\s\"]+)\"?", command):
        if spec == "nox":
            continue
        target, _, extras = spec.partition("[")
        assert target in {".", PYPROJECT["project"]["name"]}, spec
        for extra in filter(None, extras.rstrip("]").split(",")):
            assert extra in PYPROJECT["project"]["optional-dependencies"], extra


def apimart(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = shutil.which("apimart", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "apimart_async.cli"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APIMART_", "OTEL_"))}
    return {**env, "COLUMNS": "100", **extra}


def test_two_commands_on_a_fresh_machine(tmp_path: Path) -> None:
    """The main job's command installs the cli extra and runs the demo; the test
    command is the one CI runs, and its nox session exists."""
    run_it, test_it = (b.code.strip() for b in BLOCKS if b.section.startswith("Two commands"))
    check_install(run_it)
    assert run_it.endswith("&& apimart demo")
    demo = apimart("demo", cwd=tmp_path, env=clean_env())
    assert demo.returncode == 0, demo.stderr
    assert "The demo ran as designed" in demo.stderr
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert f"{test_it} || exit 1" in ci_lines  # verbatim, and a failure fails CI
    assert re.search(r"^def tests\(", (ROOT / "noxfile.py").read_text(), flags=re.MULTILINE)


def test_install_block() -> None:
    (block,) = (b for b in BLOCKS if b.section == "Install" and b.lang == "sh")
    venv, install = block.code.strip().splitlines()
    assert venv == "python3 -m venv .venv && . .venv/bin/activate"
    check_install(install)


def test_development_sessions() -> None:
    """The nox sessions the README names exist."""
    text = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    section = README.read_text(encoding="utf-8").split("## Development", 1)[1]
    for session in re.findall(r"nox -s ([\w ]+?)`", section)[0].split():
        assert re.search(rf"^def {session}\(", text, flags=re.MULTILINE), session
    assert "bench" in re.findall(r"nox -s (\w+) --", section)
    assert re.search(r"^def bench\(", text, flags=re.MULTILINE)


@pytest.fixture
def served() -> Iterator[tuple[FakeApimart, str]]:
    """The fake over real HTTP, as ``APIMART_BASE_URL`` would point at it."""
    fake = FakeApimart(api_key=KEY)
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(fake.serve()) as url:
        yield fake, url


def test_command_line_block(served: tuple[FakeApimart, str], tmp_path: Path) -> None:
    """Every ``apimart`` line of the Command line section, against the served fake."""
    fake, url = served
    env = clean_env(APIMART_API_KEY=KEY, APIMART_BASE_URL=url)
    (tmp_path / "ref.png").write_bytes(png())
    (tmp_path / "photo.jpg").write_bytes(jpeg())
    ids = [f"job-{i}" for i in range(6)]
    (tmp_path / "jobs.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "model": "gemini-3.1-flash-image-preview", "prompt": i}) + "\n"
            for i in ids
        )
    )
    (block,) = (b for b in BLOCKS if b.section == "Command line" and b.lang == "sh")
    ran: list[str] = []
    for line in block.code.splitlines():
        command = shlex.split(line, comments=True)
        if command[1] == "demo":
            continue  # run by test_two_commands_on_a_fresh_machine
        args = [fake_task(fake) if a == "TASK_ID" else a for a in command[1:]]
        done = apimart(*args, cwd=tmp_path, env=env)
        expected = 0
        if args[0] == "merge":  # 1 while a shard has not run; only shard 0 did
            expected = 1 if done.stdout.split() else 0
            text = (tmp_path / "shards" / "results.jsonl").read_text(encoding="utf-8")
            merged = [json.loads(record) for record in text.splitlines()]
            done_ids = {r["id"] for r in merged if r["status"] == "done"}
            assert sorted(done_ids | set(done.stdout.split())) == ids
        assert done.returncode == expected, f"{line}\n{done.stdout}\n{done.stderr}"
        ran.append(args[0])
    assert ran.count("batch") == 3 and {"models", "balance", "generate", "task", "upload"} <= set(
        ran
    )
    assert len(files(tmp_path / "out")) == 1  # generate and task fetched the same image
    assert len([f for f in files(tmp_path / "batch") if f.endswith(".png")]) == len(ids)
    assert fake.stats.duplicate_keys() == [] and fake.stats.file_requests_with_auth == 0


def fake_task(fake: FakeApimart) -> str:
    return next(iter(fake.tasks))


# -- the error tree ---------------------------------------------------------------------


def test_error_tree_matches_the_classes() -> None:
    """Each class in the README's tree exists and derives from the one above it."""
    (block,) = (b for b in BLOCKS if b.section == "Errors" and b.lang == "")
    parents: dict[int, type] = {}
    seen: list[str] = []
    for line in block.code.splitlines():
        if not line.strip():
            continue
        connector = re.search(r"[├└]── ", line)
        depth = 0 if connector is None else connector.start() // 4 + 1
        body = line if connector is None else line[connector.end() :]
        for segment in body.split(" · "):
            name = segment.split()[0]
            cls = getattr(apimart_async, name, None) or getattr(builtins, name)
            assert isinstance(cls, type), name
            if depth:
                assert issubclass(cls, parents[depth - 1]), (name, parents[depth - 1])
            parents[depth] = cls
            seen.append(name)
    errors = {n for n in apimart_async.__all__ if n.endswith("Error")}
    assert errors <= set(seen), errors - set(seen)


# -- coverage -------------------------------------------------------------------------------


def test_every_block_is_checked() -> None:
    checked_sh = {"Two commands on a fresh machine", "Install", "Command line"}
    for block in BLOCKS:
        if block.lang == "python":
            assert block.name in PYTHON, f"README line {block.line}: add a check to PYTHON"
        elif block.lang == "sh":
            assert block.section in checked_sh, f"README line {block.line}: unchecked sh block"
        else:
            assert block.lang == "" and block.section == "Errors", block.name
    assert set(PYTHON) == {b.name for b in BLOCKS if b.lang == "python"}
