"""CLI errors speak CLI: flags and commands, the service's message once, English glosses.

The library's messages are for Python callers (``allow_unknown=True``, ``wait('…')``,
``max_cost=``); the command line rewrites every one of them (``_errors.explain``), and
shows a service error as ``HTTP 400: <message> (request id: …)`` with the code only
when it adds something, plus an English gloss where the service answered in Chinese.
Checked on the errors themselves, through the command in process (asyncio and trio),
and through the installed command against a service that answers in Chinese.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from apimart_async import (
    BadRequestError,
    BudgetExceededError,
    InsufficientBalanceError,
    ResultMissingError,
    ServerError,
    SubmissionUncertainError,
    TaskFailedError,
    TaskTimeoutError,
)
from apimart_async.cli._errors import describe, explain, facts, gloss
from apimart_async.models import parse_request
from apimart_async.testing import FakeApimart, Latency, Variants

from .test_cli_batch import cli, jobs, results, write_jobs
from .test_cli_terminal import GEM, piped

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

# What a Python caller would be told, and a person at a shell must not be.
PYTHON_ADVICE = (
    "allow_unknown=True",
    "RawRequest(",
    "wait(",
    "idempotency_key=",
    "max_cost=",
    "max_images=",
    "prices={",
    "=True",
    "_positive_float",
    "_positive_int",
    "invalid _",
)


def speaks_cli(text: str) -> bool:
    """Whether *text* is free of Python-call advice."""
    return not any(advice in text for advice in PYTHON_ADVICE)


def _unknown_model() -> Exception:
    try:
        parse_request({"model": "gemini-3-pro-image-previw", "prompt": "x"})
    except ValueError as exc:
        return exc
    raise AssertionError("an unknown model was accepted")


def _bool_rule() -> Exception:
    request = {"model": "gemini-3.1-flash-image-preview", "prompt": "x"}
    try:
        parse_request({**request, "google_image_search": True})
    except ValueError as exc:
        return exc
    raise AssertionError("google_image_search without google_search was accepted")


LIBRARY_ERRORS: list[tuple[str, Callable[[], BaseException], str]] = [
    ("unknown model", _unknown_model, "--allow-unknown-models"),
    ("bool rule", _bool_rule, "google_search=true"),
    (
        "timeout",
        lambda: TaskTimeoutError(task_id="task_1", task=None, timeout=5.0),
        "did not finish within 5s",
    ),
    (
        "no result URL",
        lambda: ResultMissingError(task_id="task_1", task=None, queries=3),
        "rather than submitting it again",
    ),
    (
        "uncertain submit",
        lambda: SubmissionUncertainError(idempotency_key="k1", request={}, reason="read timeout"),
        "idempotency key is k1",
    ),
    (
        "cost limit",
        lambda: BudgetExceededError(
            "max_cost=1.00 USD reached: ...",
            budget="max_cost",
            spent=0.9,
            reserved=0.05,
            limit=1.0,
        ),
        "--max-cost 1.00 USD reached",
    ),
    (
        "image limit",
        lambda: BudgetExceededError(
            "max_images=3 reached: ...",
            budget="max_images",
            spent=3.0,
            reserved=0.0,
            limit=3.0,
        ),
        "--max-images 3 reached",
    ),
]


@pytest.mark.parametrize(
    ("what", "make", "says"), LIBRARY_ERRORS, ids=[e[0] for e in LIBRARY_ERRORS]
)
def test_library_errors_are_rewritten_with_flags_and_commands(
    what: str, make: Callable[[], BaseException], says: str
) -> None:
    """Each error whose library message names a Python call is explained without it."""
    error = make()
    assert not speaks_cli(str(error)), what  # the library's own text advises Python
    text = explain(error)
    assert says in text and speaks_cli(text), text


def test_a_service_error_shows_its_message_once_with_code_and_request_id() -> None:
    """``HTTP 400 [400]: 无效的任务ID`` becomes the message once, glossed, the request id
    at the end; a code that adds something (``get_channel_failed``) is kept."""
    error = BadRequestError(
        "无效的任务ID (request id: req_9)", status_code=400, code=400, type="invalid_request_error"
    )
    assert str(error).startswith("HTTP 400 [400]")  # the library's form
    assert (
        explain(error) == "HTTP 400: 无效的任务ID (in English: invalid task ID) (request id: req_9)"
    )
    assert facts(error).code == 400 and facts(error).request_id == "req_9"
    busy = ServerError(
        "Please wait and try again later. (request id: r2)",
        status_code=500,
        code="get_channel_failed",
    )
    assert explain(busy) == (
        "HTTP 500 get_channel_failed: Please wait and try again later. (request id: r2)"
    )
    assert describe(busy).startswith("ServerError: HTTP 500 get_channel_failed")


def test_chinese_messages_get_an_english_gloss() -> None:
    """The known message is translated; another Chinese one gets the meaning of its
    status; English and unknown-status messages are left alone."""
    assert gloss("无效的任务ID") == "无效的任务ID (in English: invalid task ID)"
    assert gloss("余额不足", 402) == "余额不足 (in English, roughly: insufficient balance)"
    assert gloss("Invalid task ID", 400) == "Invalid task ID"
    failed = TaskFailedError(task_id="t1", task=None, reason="生成失败", code="task_failed")
    assert explain(failed) == "task t1 failed: 生成失败 (code task_failed)"
    uncertain = SubmissionUncertainError(idempotency_key="k", request={}, reason="x")
    uncertain.__cause__ = InsufficientBalanceError(
        "余额不足 (request id: r3)", status_code=402, code=""
    )
    assert facts(uncertain).request_id == "r3"
    assert "HTTP 402: 余额不足 (in English, roughly: insufficient balance)" in explain(uncertain)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("--timeout", "abc"), "argument --timeout: expected a number, got 'abc'"),
        (("--concurrency", "many"), "argument --concurrency/-c: expected a whole number"),
        (("--max-cost", "-1"), "argument --max-cost: must be 0 or more USD"),
        (("--max-images", "x"), "argument --max-images: expected a whole number"),
        (("--price", "flux-kontext-pro"), "argument --price: takes MODEL=USD"),
        (("--price", f"{GEM}=cheap"), f"argument --price: {GEM}: expected a number"),
        (("--webhook-listen", "8080"), "argument --webhook-listen: takes HOST:PORT"),
    ],
)
def test_bad_flag_values_name_the_flag_not_a_python_function(
    tmp_path: Path, argv: tuple[str, ...], says: str
) -> None:
    """argparse's errors say what the flag expects (exit 2), never the name of the
    function that parsed it."""
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(1))
    ran = cli("batch", str(src), "--out", str(tmp_path / "out"), *argv)
    assert ran.code == 2 and says in ran.err and speaks_cli(ran.err), ran.err


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_generate_names_the_flag_for_an_unknown_model_and_takes_it(
    tmp_path: Path, backend: str
) -> None:
    """An unknown model: exit 2 naming --allow-unknown-models (no request sent); with
    the flag (either spelling), the model is sent as it is."""
    fake = FakeApimart(accept_unknown_models=True)
    argv = ("--backend", backend, "generate", "-m", "brand-new-model", "-p", "x")
    ran = cli(*argv, "--out", str(tmp_path), fake=fake)
    assert ran.code == 2 and "--allow-unknown-models" in ran.err and speaks_cli(ran.err)
    assert fake.stats.requests_total == 0
    for flag in ("--allow-unknown-models", "--allow-unknown-model"):
        ran = cli(*argv, "--out", str(tmp_path), flag, fake=fake)
        assert ran.code == 0, ran.err
    assert fake.stats.tasks_created == 2


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_generate_says_nothing_before_a_validation_error(tmp_path: Path, backend: str) -> None:
    """A reference that is not an image: the only output is the error (no "starting"
    line first), exit 2, nothing sent."""
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    fake = FakeApimart()
    ran = cli(
        "--backend", backend, "generate", "-m", GEM, "-p", "x", "--image", str(bad),
        "--progress", "plain", "--out", str(tmp_path / "out"), fake=fake,
    )  # fmt: skip
    assert ran.code == 2
    assert ran.err.splitlines() == [ran.err.strip()] and ran.err.startswith("apimart: error:")
    assert "starting" not in ran.err and "is not a JPEG, PNG, WebP or GIF" in ran.err
    assert fake.stats.requests_total == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_timed_out_generate_says_which_command_resumes_it(tmp_path: Path, backend: str) -> None:
    """The deadline passes: the error names ``apimart task ID --wait --download DIR``,
    never ``wait('…')``."""
    fake = FakeApimart(latency=Latency.fixed(60.0))
    out = tmp_path / "out"
    ran = cli(
        "--backend", backend, "generate", "-m", GEM, "-p", "x", "--timeout", "0.05",
        "--out", str(out), fake=fake,
    )  # fmt: skip
    assert ran.code == 1 and speaks_cli(ran.err), ran.err
    task_id = next(iter(fake.tasks))
    assert f"To wait for it again: apimart task {task_id} --wait --download {out}" in ran.err


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_budget_that_cannot_be_enforced_is_said_with_the_flag_to_add(
    tmp_path: Path, backend: str
) -> None:
    """Tasks that report no cost and no --price: the library's warning reaches stderr
    rewritten (add --price MODEL=USD), once, and the batch runs on images."""
    fake = FakeApimart(variants=Variants(include_cost=False))
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(4))
    ran = cli(
        "--backend", backend, "batch", str(src), "--out", str(tmp_path / "out"),
        "--max-cost", "5", "--progress", "off", fake=fake,
    )  # fmt: skip
    assert ran.code == 0, ran.err
    assert ran.err.count(f"add --price {GEM}=USD") == 1 and speaks_cli(ran.err), ran.err
    assert all(r["cost"] is None for r in results(tmp_path / "out"))
    assert "(+ 4 job(s) of unknown cost)" in ran.err


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_batch_records_errors_with_type_code_and_request_id(tmp_path: Path, backend: str) -> None:
    """results.jsonl: a failed task has its class, code and (refunded) cost; a refused
    submit its HTTP error's code and request id; the error text speaks CLI."""
    fake = FakeApimart(variants=Variants(error_code="string"))
    fake.script("task", [None, "task_failed"])
    fake.script("submit", [None, None, 400])
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(3))
    ran = cli(
        "--backend", backend, "batch", str(src), "--out", str(tmp_path / "out"), "-c", "1",
        "--progress", "off", fake=fake,
    )  # fmt: skip
    assert ran.code == 1
    rows = {r["id"]: r for r in results(tmp_path / "out")}
    failed = rows["j1"]
    assert failed["status"] == "failed" and failed["error_type"] == "TaskFailedError"
    assert failed["error_code"] == "task_failed" and failed["cost"] == 0
    refused = rows["j2"]
    assert refused["status"] == "failed" and refused["error_type"] == "BadRequestError"
    assert refused["request_id"] and refused["request_id"] in refused["error"]
    assert refused["error"].count(refused["request_id"]) == 1 and "[" not in refused["error"]
    assert rows["j0"]["status"] == "done" and rows["j0"]["error_type"] is None


# -- a service that answers in Chinese, through the installed command -------------------


@contextlib.contextmanager
def chinese_service() -> Iterator[str]:
    """An HTTP service answering in Chinese: task queries 400 (the documented body),
    submits 402; yields its base URL."""
    import uvicorn

    async def app(
        scope: dict[str, Any], receive: Any, send: Callable[..., Awaitable[None]]
    ) -> None:
        assert scope["type"] == "http"
        if scope["path"].startswith("/v1/tasks/"):
            status, error = 400, {"code": 400, "message": "无效的任务ID (request id: req_cn_1)",
                                  "type": "invalid_request_error"}  # fmt: skip
        else:
            status, error = 402, {"code": "", "message": "余额不足 (request id: req_cn_2)",
                                  "type": "apimart_error"}  # fmt: skip
        body = json.dumps({"error": error}, ensure_ascii=False).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started and thread.is_alive():
            threading.Event().wait(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_the_installed_command_glosses_a_chinese_answer_once(tmp_path: Path) -> None:
    """``apimart task`` and ``apimart generate`` against a service answering in Chinese:
    the message once, its English meaning, the request id once, no ``[400]``."""
    with chinese_service() as url:
        api = ("--base-url", url, "--api-key", "k")
        task = piped("task", "task_unknown", *api, cwd=tmp_path)
        gen = piped("generate", "-m", GEM, "-p", "x", *api, cwd=tmp_path)
    assert task.code == 1, task.err
    assert task.err.strip() == (
        "apimart: error: BadRequestError: HTTP 400: 无效的任务ID (in English: invalid task ID) "
        "(request id: req_cn_1)"
    )
    assert gen.code == 1, gen.err
    assert "HTTP 402: 余额不足 (in English, roughly: insufficient balance) (request id: " in gen.err
    assert gen.err.count("req_cn_2") == 1 and "`apimart balance`" in gen.err
    assert speaks_cli(task.err + gen.err)


# -- the library's log records, as the command shows them -------------------------------

_CALL = re.compile(r"[A-Za-z_][\w.]*\([^)]*\)")  # foo(), client.wait('x'), prices={...}
# Records the command line cannot cause: the blocking client (not used by the CLI) and
# closing a client from another event loop (the CLI runs one loop per command).
_UNREACHABLE = (
    "_sync.py",
    "_portal.py",
    "interrupted as it returned",
    "called from another event loop",
)


def _library_warnings() -> list[tuple[str, str, list[str]]]:
    """``(module, template, placeholders)`` of every WARNING-or-worse log call."""
    import ast

    import apimart_async

    found: list[tuple[str, str, list[str]]] = []
    for path in sorted(Path(apimart_async.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("warning", "error", "exception", "critical")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "logger"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                continue
            template = node.args[0].value
            found.append((path.name, template, re.findall(r"%([sdr])", template)))
    return found


def test_every_library_warning_reaches_stderr_in_cli_words() -> None:
    """Each WARNING-or-worse template of the library, through the command's log
    handler: dropped (the command reports it itself) or free of Python calls."""
    import logging

    from apimart_async.cli._logs import captured
    from apimart_async.cli._ui import Ui

    templates = _library_warnings()
    assert any("report no cost" in t for _, t, _ in templates)  # the scan finds them
    err = io.StringIO()
    ui = Ui(stdout=io.StringIO(), stderr=err, progress="off")
    shown: list[str] = []
    with captured(ui):
        for module, template, kinds in templates:
            if module in _UNREACHABLE or any(u in template for u in _UNREACHABLE):
                continue
            name = "apimart_async." + module.removeprefix("_").removesuffix(".py")
            args = tuple(i if kind == "d" else f"arg{i}" for i, kind in enumerate(kinds))
            before = len(err.getvalue())
            logging.getLogger(name).warning(template, *args)
            text = err.getvalue()[before:]
            assert not _CALL.search(text) and speaks_cli(text), (template, text)
            shown.append(text)
    assert any("add --price arg0=USD" in text for text in shown)
    assert "" in shown  # the ones the command reports itself are not repeated
