"""The ``apimart`` commands in process: generate, upload, task, models, demo, errors."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from apimart_async import AsyncApimart
from apimart_async.cli import main
from apimart_async.cli._app import run
from apimart_async.cli._setup import Runtime
from apimart_async.models import MODELS
from apimart_async.testing import FakeApimart, Latency, ManualClock

from .images import png

GEM = "gemini-3-pro-image-preview"


@dataclass
class Ran:
    """What one command run printed and returned."""

    code: int
    out: str
    err: str


def cli(*argv: str, fake: FakeApimart | None = None) -> Ran:
    """Run the command line in process, with *fake* in place of the network."""
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), runtime=Runtime(fake=fake), stdout=out, stderr=err)
    return Ran(code, out.getvalue(), err.getvalue())


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists every command; --version prints the version; both return 0."""
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("generate", "batch", "merge", "upload", "task", "balance", "models", "demo"):
        assert command in text
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("apimart ")


def test_unknown_command_and_bad_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse errors are status 2, returned rather than raised."""
    assert main(["frobnicate"]) == 2
    assert main(["batch", "x.jsonl", "--out", "o", "--concurrency", "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_models_lists_every_model_with_its_rules() -> None:
    """Piped, one tab-separated line per model id; --json one object per model id."""
    ran = cli("models")
    assert ran.code == 0
    lines = ran.out.splitlines()
    assert [line.split("\t")[0] for line in lines[1:]] == list(MODELS)
    rules = json.loads(cli("models", "--json").out)
    gemini = next(r for r in rules if r["model"] == GEM)
    assert gemini["resolutions"] == ["1K", "2K", "4K"] and gemini["n_range"] == [1, 4]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_generate_uploads_submits_and_prints_saved_paths(tmp_path: Path, backend: str) -> None:
    """A local --image is uploaded; the saved paths are printed, one per line."""
    ref = tmp_path / "ref.png"
    ref.write_bytes(png())
    fake = FakeApimart()
    ran = cli(
        "--backend", backend, "generate", "-m", GEM, "-p", "a fox", "--image", str(ref),
        "--image", "https://example.test/b.png", "-n", "2", "--size", "16:9",
        "--param", "official_fallback=true", "--out", str(tmp_path / "out"),
        fake=fake,
    )  # fmt: skip
    assert ran.code == 0, ran.err
    paths = [Path(line) for line in ran.out.splitlines()]
    assert len(paths) == 2 and all(p.is_file() and p.parent == tmp_path / "out" for p in paths)
    assert fake.stats.uploads == 1
    body = next(r.json_body for r in fake.requests if r.endpoint == "submit")
    assert body is not None and body["official_fallback"] is True and body["n"] == 2
    assert "submitted" in ran.err  # the status line, in plain mode


def test_generate_reports_bad_input_before_any_request(tmp_path: Path) -> None:
    """A missing image path, a bad field or a bad --param exits 2 and names the problem."""
    fake = FakeApimart()
    ran = cli("generate", "-m", GEM, "-p", "x", "--image", "nope.png", fake=fake)
    assert ran.code == 2 and "image path 'nope.png' not found" in ran.err
    ran = cli("generate", "-m", GEM, "-p", "x", "--resolution", "8K", fake=fake)
    assert ran.code == 2 and "resolution: must be one of '1K', '2K', '4K'" in ran.err
    ran = cli("generate", "-m", GEM, "-p", "x", "--param", "oops", fake=fake)
    assert ran.code == 2 and "--param takes KEY=VALUE" in ran.err
    assert fake.stats.requests_total == 0


def test_generate_without_a_key_says_how_to_set_it() -> None:
    """No key anywhere: exit 2 with the environment variable to set."""
    ran = cli("generate", "-m", GEM, "-p", "x")
    assert ran.code == 2
    assert "export APIMART_API_KEY=" in ran.err and "--api-key" in ran.err


def test_generate_failed_task_exits_1(tmp_path: Path) -> None:
    """A task the service fails is exit status 1 with its reason."""
    fake = FakeApimart()
    fake.script("task", ["task_failed"])
    ran = cli("generate", "-m", GEM, "-p", "x", "--out", str(tmp_path), fake=fake)
    assert ran.code == 1
    assert "TaskFailedError" in ran.err and "content policy" in ran.err
    assert ran.out == ""


def test_generate_with_the_embedded_fake_needs_no_key(tmp_path: Path) -> None:
    """--fake runs against a fresh in-process fake, with scaled time."""
    ran = cli(
        "generate", "--fake", "--fake-latency", "fast", "-m", GEM, "-p", "x",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert ran.code == 0, ran.err
    assert Path(ran.out.strip()).is_file()


def test_upload_prints_the_url(tmp_path: Path) -> None:
    """upload prints the public URL on stdout; --json prints the whole record."""
    image = tmp_path / "a.png"
    image.write_bytes(png())
    fake = FakeApimart()
    ran = cli("upload", str(image), fake=fake)
    assert ran.code == 0 and ran.out.strip().startswith("https://")
    assert "valid until" in ran.err
    data = json.loads(cli("upload", str(image), "--json", fake=fake).out)
    assert data["content_type"] == "image/png"
    ran = cli("upload", str(tmp_path / "missing.png"), fake=fake)
    assert ran.code == 2 and "image path" in ran.err and "not found" in ran.err
    (tmp_path / "text.png").write_text("not an image")
    assert cli("upload", str(tmp_path / "text.png"), fake=fake).code == 2


def _submit(fake: FakeApimart) -> str:
    async def go() -> str:
        async with AsyncApimart(api_key="test", transport=fake.transport()) as client:
            return (await client.submit(model=GEM, prompt="x")).id

    return anyio.run(go)


def test_task_shows_waits_and_downloads(tmp_path: Path) -> None:
    """task shows the status; --wait waits for the end; --download saves the images."""
    clock = ManualClock()  # the task runs until the test moves the clock: no race
    fake = FakeApimart(latency=Latency.fixed(2.0, time_scale=0.01), clock=clock)
    task_id = _submit(fake)
    ran = cli("task", task_id, fake=fake)
    assert ran.code == 0 and f"id:      {task_id}" in ran.out
    ran = cli("task", task_id, "--download", str(tmp_path), fake=fake)
    assert ran.code == 1 and "add --wait" in ran.err
    clock.advance(1.0)
    ran = cli("task", task_id, "--wait", "--download", str(tmp_path), fake=fake)
    assert ran.code == 0, ran.err
    assert "status:  completed" in ran.out
    assert (tmp_path / f"{task_id}_0.png").is_file()
    data = json.loads(cli("task", task_id, "--json", fake=fake).out)
    assert data["status"] == "completed"


def test_task_failed_exits_1_and_unknown_id_is_reported() -> None:
    """A failed task exits 1 with its error; an unknown id names the service's answer."""
    fake = FakeApimart(latency=Latency.zero())
    fake.script("task", ["task_failed"])
    task_id = _submit(fake)
    ran = cli("task", task_id, "--wait", fake=fake)
    assert ran.code == 1 and "status:  failed" in ran.out and "error:" in ran.out
    ran = cli("task", "task_does_not_exist", fake=fake)
    assert ran.code == 1 and "apimart: error:" in ran.err


def test_demo_runs_as_designed_and_starts_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """demo (default folder, relative): every job done but the two injected failures,
    exit 0; running it again starts over instead of resuming."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "apimart-demo-output"
    argv = ("demo", "--jobs", "8", "--time-scale", "0.002")
    ran = cli(*argv)
    assert ran.code == 0, ran.err
    assert "ran as designed" in ran.err and "task_failed x2" in ran.out
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows].count("done") == 6
    assert all((out / f).is_file() for r in rows for f in r["files"])
    assert (out / "demo_jobs.jsonl").is_file() and (out / "reference.png").is_file()
    again = cli(*argv)
    assert again.code == 0, again.err
    assert "resuming" not in again.err


def test_demo_repeats_the_bundled_jobs_beyond_24(tmp_path: Path) -> None:
    """--jobs above the bundled 24 repeats them under new ids."""
    out = tmp_path / "demo"
    ran = cli("demo", "--jobs", "30", "--out", str(out), "--time-scale", "0.001")
    assert ran.code == 0, ran.err
    ids = [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(set(ids)) == 30 and "lighthouse-dawn-2" in ids


def test_demo_refuses_a_real_batch_folder(tmp_path: Path) -> None:
    """demo never deletes the journal of a real batch."""
    src = tmp_path / "jobs.jsonl"
    src.write_text(json.dumps({"model": GEM, "prompt": "x"}) + "\n")
    out = tmp_path / "out"
    assert cli("batch", str(src), "--out", str(out), fake=FakeApimart()).code == 0
    ran = cli("demo", "--out", str(out))
    assert ran.code == 2 and "journal of a real batch" in ran.err
    assert (out / "journal.sqlite3").is_file()


def test_missing_rich_prints_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without rich, the command says which extra to install (exit 2)."""
    monkeypatch.setitem(sys.modules, "rich.console", None)
    ran = cli("models")
    assert ran.code == 2 and "pip install 'apimart-async[cli]'" in ran.err


def test_fake_options_are_validated(tmp_path: Path) -> None:
    """Bad --fake-latency / --fake-faults are usage errors naming the option's problem."""
    ran = cli("generate", "--fake", "--fake-latency", "slow", "-m", GEM, "-p", "x")
    assert ran.code == 2 and "--fake-latency: unknown latency" in ran.err
    ran = cli("generate", "--fake", "--fake-faults", "{", "-m", GEM, "-p", "x")
    assert ran.code == 2 and "--fake-faults: not valid JSON" in ran.err
    ran = cli("generate", "--fake", "--fake-faults", '{"nope": 1}', "-m", GEM, "-p", "x")
    assert ran.code == 2 and "nope" in ran.err
    ran = cli("generate", "--fake", "--fake-faults", '{"rate_limit": 2}', "-m", GEM, "-p", "x")
    assert ran.code == 2 and "--fake-faults: rate_limit must be in [0, 1]" in ran.err


def test_a_bad_base_url_names_the_flag_and_the_variable() -> None:
    """The client's "base_url" is the command line's --base-url or APIMART_BASE_URL."""
    ran = cli("balance", "--api-key", "k", "--base-url", "ftp://example.test")
    assert ran.code == 2
    assert ran.err.startswith("apimart: error: --base-url (or APIMART_BASE_URL) must be")
