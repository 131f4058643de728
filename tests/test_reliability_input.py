"""Bad input is refused before any request, with a message that names the problem.

Through the client's public calls (``submit``, ``generate``, ``generate_many``,
``upload_image``, ``wait``, ``download``), not only through the models: the point is
that nothing reaches the network (the fake counts every request) and that the error is
the documented ``ValueError`` subclass. A hypothesis test fuzzes whole request dicts
through ``submit`` and checks the wire body; the command line's batch reader is checked
for lines that are JSON but not objects.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apimart_async as am
from apimart_async import AsyncApimart
from apimart_async.models import known_models, parse_request
from apimart_async.testing import FakeApimart

from .conftest import FAST_POLL
from .images import PDF, gif, jpeg, png
from .mock import SUBMIT_A, Script, reply

pytestmark = pytest.mark.anyio

GEM = "gemini-3-pro-image-preview"
FLASH_25 = "gemini-2.5-flash-image-preview"
MB = 1024 * 1024


# -- request parameters ---------------------------------------------------------------


@pytest.mark.parametrize("model", known_models())
@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
async def test_empty_prompts_are_refused_for_every_model(
    client: AsyncApimart, fake: FakeApimart, model: str, prompt: str
) -> None:
    """An empty or blank prompt names the prompt field; nothing is sent."""
    with pytest.raises(am.InvalidRequestError, match="prompt: must not be empty"):
        await client.submit(model=model, prompt=prompt)
    assert fake.stats.requests_total == 0


@pytest.mark.parametrize("model", known_models())
async def test_ten_thousand_character_prompts(
    client: AsyncApimart, fake: FakeApimart, model: str
) -> None:
    """10,000 characters: refused (naming the limit) where a limit exists, sent otherwise."""
    limit = parse_request(model=model, prompt="x").rules().max_prompt_chars
    prompt = "a watercolour fox " * 556  # 10,008 characters
    if limit is None:
        task = await client.submit(model=model, prompt=prompt)
        assert task.id and fake.stats.submits == 1
        return
    with pytest.raises(am.InvalidRequestError) as info:
        await client.submit(model=model, prompt=prompt)
    assert f"prompt: must be at most {limit} characters (got {len(prompt)})" in str(info.value)
    assert prompt not in str(info.value)  # the huge value is not echoed back
    assert fake.stats.requests_total == 0


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"n": "2"}, "n: must be a JSON integer"),
        ({"n": 2.0}, "n: must be a JSON integer"),
        ({"n": True}, "n: must be a JSON integer"),
        ({"n": 0}, "n: must be between 1 and 4"),
        ({"size": 16}, "size: must be one of"),
        ({"size": "16x9"}, "size: must be one of"),
        ({"resolution": 2}, "resolution: must be one of"),
        ({"resolution": "2k"}, "did you mean '2K'"),
        ({"prompt": 123}, "prompt: must be a string"),
        ({"prompt": ["a", "b"]}, "prompt: must be a string"),
        ({"prompt": None}, "prompt: must be a string"),
        ({"image_urls": "https://example.test/a.png"}, "image_urls: must be a list"),
        ({"image_urls": [123]}, "image_urls[0]"),
        ({"image_urls": {"a": 1}}, "image_urls: must be a list or tuple"),
        ({"webhook": 5}, "webhook: must be a string"),
        ({"webhook": "https://hooks.example:8443/x"}, "webhook: must use port 80 or 443"),
        ({"language": "xx"}, "language: must be one of"),
        ({"colour": "red"}, "colour: unknown field"),
        ({"promt": "typo"}, "did you mean 'prompt'"),
    ],
)
async def test_wrong_types_and_unknown_fields_name_the_field(
    client: AsyncApimart, fake: FakeApimart, params: dict[str, Any], fragment: str
) -> None:
    """Wrong types, out-of-range values and unknown fields: InvalidRequestError, no request."""
    request = {"model": GEM, "prompt": "a fox", **params}
    for call in (client.submit, client.generate):
        with pytest.raises(am.InvalidRequestError) as info:
            await call(request)
        assert fragment in str(info.value)
        assert GEM in str(info.value)
    assert fake.stats.requests_total == 0


@pytest.mark.parametrize(
    ("model", "error", "fragment"),
    [
        ("gpt-image-1", am.UnknownModelError, "allow_unknown=True"),
        ("gemini-3-pro-image", am.UnknownModelError, "did you mean 'gemini-3-pro-image-preview'"),
        (None, am.InvalidRequestError, "model: is required"),
        (5, am.InvalidRequestError, "model: must be a string"),
        ("", am.UnknownModelError, "known models"),
    ],
)
async def test_unknown_or_missing_models(
    client: AsyncApimart, fake: FakeApimart, model: Any, error: type[Exception], fragment: str
) -> None:
    """Unknown, misspelt, missing and non-string model ids are refused before any request."""
    with pytest.raises(error) as info:
        await client.generate(model=model, prompt="x")
    assert fragment in str(info.value)
    assert fake.stats.requests_total == 0


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda c: c.wait(None), "task_id"),
        (lambda c: c.wait("   "), "task_id"),
        (lambda c: c.get_task(None), "task_id"),
        (lambda c: c.get_task(""), "task_id"),
        (lambda c: c.upload_image(None), "image source"),
        (lambda c: c.submit(None), "model: is required"),
        (lambda c: c.submit(model=GEM), "prompt: is required"),
        (lambda c: c.generate("not a request"), "request: must be a request model"),
        (lambda c: c.submit(model=GEM, prompt="x", idempotency_key="has space"), "idempotency"),
        (
            lambda c: c.download(am.Task(id="t", status=am.TaskStatus.PROCESSING), "unused-folder"),
            "not completed",
        ),
        (lambda c: c.download("https://example.test/a.png", "unused-folder"), "not a single"),
    ],
)
async def test_none_and_wrong_kinds_where_a_value_is_required(
    client: AsyncApimart, fake: FakeApimart, call: Any, fragment: str
) -> None:
    """None or the wrong kind of argument: a ValueError/TypeError naming it, no request."""
    with pytest.raises((ValueError, TypeError)) as info:
        await call(client)
    assert fragment in str(info.value)
    assert fake.stats.requests_total == 0
    assert not Path("unused-folder").exists()


async def test_download_of_none_says_what_was_expected(
    client: AsyncApimart, tmp_path: Path
) -> None:
    """download(None, dest) names what it wanted (a Task or a list of URLs)."""
    with pytest.raises(TypeError, match="Task"):
        await client.download(None, tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("file:///home/me/cat.png", "file:// URL"),
        ("ftp://files.example/cat.png", "scheme 'ftp'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("C:\\\\photos\\\\cat.png", "not an http(s) URL"),
        ("~/cat.png", "not an http(s) URL"),
        ("cat.png", "Path('cat.png')"),
        ("https://", "not a valid http(s) URL"),
        ("https://exa mple.com/x.png", "not a valid http(s) URL"),
        ("", "not an http(s) URL"),
    ],
)
async def test_image_urls_that_are_not_http(
    client: AsyncApimart, fake: FakeApimart, url: str, fragment: str
) -> None:
    """Other schemes, local-looking strings and broken URLs are refused, with a hint."""
    for call in (client.submit, client.generate):
        with pytest.raises(am.InvalidRequestError) as info:
            await call(model=GEM, prompt="x", image_urls=[url])
        assert "image_urls[0]" in str(info.value) and fragment in str(info.value)
    assert fake.stats.requests_total == 0


@pytest.mark.parametrize("model", ["flux-kontext-pro", "flux-kontext-max"])
async def test_data_uris_to_models_that_refuse_them(
    client: AsyncApimart, fake: FakeApimart, model: str
) -> None:
    """Flux takes no data URIs: refused locally with the way out; Gemini takes them."""
    uri = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAHnOcQAAAAABJRU5ErkJggg=="
    with pytest.raises(am.InvalidRequestError) as info:
        await client.generate(model=model, prompt="x", image_urls=[uri])
    assert "data URIs are not accepted" in str(info.value) and "Path(" in str(info.value)
    assert fake.stats.requests_total == 0
    task = await client.submit(model=GEM, prompt="x", image_urls=[uri])
    assert task.id


async def test_imagen_refuses_reference_images(client: AsyncApimart, fake: FakeApimart) -> None:
    """A text-to-image model given an image says so, whatever form the image takes."""
    for image in ("https://example.test/a.png", png(), Path("a.png")):
        with pytest.raises(am.InvalidRequestError, match="text-to-image only"):
            await client.generate(model="imagen-4.0-apimart", prompt="x", image_urls=[image])
    assert fake.stats.requests_total == 0


# -- local images -----------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _sparse(path: Path, size: int) -> Path:
    """A *size*-byte file starting like a PNG, without writing the bytes."""
    with path.open("wb") as fh:
        fh.write(png())
        fh.truncate(size)
    return path


BAD_IMAGES = [
    # (how to make the source in a folder, what the message must say)
    pytest.param(lambda d: d / "missing.png", "not found", id="missing"),
    pytest.param(lambda d: d, "directory", id="directory"),
    pytest.param(lambda d: _write(d / "empty.png", b""), "empty (0 bytes)", id="empty"),
    pytest.param(lambda d: _sparse(d / "huge.png", 21 * MB), "upload limit", id="21MB"),
    pytest.param(lambda d: _write(d / "doc.png", PDF), "a PDF", id="pdf-as-png"),
    pytest.param(lambda d: _write(d / "page.jpg", b"<html></html>"), "HTML", id="html-as-jpg"),
    pytest.param(lambda d: _write(d / "cut.png", png()[:40]), "truncated", id="cut-png"),
    pytest.param(lambda d: _write(d / "cut.jpg", jpeg()[:-2]), "truncated", id="cut-jpeg"),
    pytest.param(lambda d: _write(d / "cut.gif", gif()[:-1]), "truncated", id="cut-gif"),
]


@pytest.mark.parametrize(("make_source", "problem"), BAD_IMAGES)
async def test_bad_local_images_in_generate(
    client: AsyncApimart, fake: FakeApimart, tmp_path: Path, make_source: Any, problem: str
) -> None:
    """generate() with a bad local image raises InvalidImageError naming it; nothing is sent."""
    source = Path(make_source(tmp_path))
    with pytest.raises(am.InvalidImageError) as info:
        await client.generate(model=GEM, prompt="x", image_urls=[source])
    assert source.name in str(info.value) and problem in str(info.value)
    assert fake.stats.requests_total == 0


async def test_bad_local_images_in_generate_many(
    client: AsyncApimart, fake: FakeApimart, tmp_path: Path
) -> None:
    """Each job with a bad local image ends as InvalidImageError; nothing is sent for them."""
    sources = []
    for i, param in enumerate(BAD_IMAGES):
        folder = tmp_path / str(i)
        folder.mkdir()
        sources.append(Path(param.values[0](folder)))
    items = [{"model": GEM, "prompt": "x", "image_urls": [s]} for s in sources]
    async with client.generate_many(items) as outcomes:
        errors = [o.error async for o in outcomes]
    assert all(isinstance(e, am.InvalidImageError) for e in errors), errors
    assert fake.stats.requests_total == 0


async def test_errors_of_several_local_images_are_not_grouped(
    client: AsyncApimart, fake: FakeApimart, tmp_path: Path
) -> None:
    """Two bad local images: InvalidImageError itself, from generate() and as an outcome."""
    images = [tmp_path / "missing-1.png", _write(tmp_path / "empty.png", b"")]
    with pytest.raises(am.InvalidImageError):
        await client.generate(model=GEM, prompt="x", image_urls=images)
    async with client.generate_many([{"model": GEM, "prompt": "x", "image_urls": images}]) as out:
        [outcome] = [o async for o in out]
    assert isinstance(outcome.error, am.InvalidImageError), repr(outcome.error)
    assert fake.stats.requests_total == 0


async def test_one_bad_image_among_good_ones_sends_nothing(
    client: AsyncApimart, fake: FakeApimart, tmp_path: Path
) -> None:
    """Ten good images and one missing: refused as a whole before any upload."""
    good = [_write(tmp_path / f"ok{i}.png", png(seed=i)) for i in range(10)]
    error: Exception | None = None
    try:
        await client.generate(model=GEM, prompt="x", image_urls=[*good, tmp_path / "missing.png"])
    except Exception as exc:  # noqa: BLE001 - the class is asserted below, after the count
        error = exc
    assert fake.stats.requests_total == 0
    assert isinstance(error, am.InvalidImageError) and "missing.png" in str(error)


async def test_bad_local_images_to_upload_image_send_nothing(
    client: AsyncApimart, fake: FakeApimart, tmp_path: Path
) -> None:
    """The same bad sources passed to upload_image as path, str, bytes or file: no request."""
    for param in BAD_IMAGES:
        folder = tmp_path / param.id
        folder.mkdir()
        source = Path(param.values[0](folder))
        kinds: list[Any] = [source, str(source)]
        if source.is_file() and source.stat().st_size < MB:
            kinds += [source.read_bytes(), io.BytesIO(source.read_bytes())]
        for kind in kinds:
            with pytest.raises(am.InvalidImageError):
                await client.upload_image(kind)
    assert fake.stats.requests_total == 0


# -- lone surrogates ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"prompt": "fox \ud800"}, "prompt"),
        (
            {"webhook": "https://hooks.example/\ud800"},
            "webhook",
        ),
        (
            {"image_urls": ["https://files.example/\udc80.png"]},
            "image_urls[0]",
        ),
    ],
    ids=["prompt", "webhook", "image_url"],
)
async def test_lone_surrogates_are_refused_before_any_request(
    params: dict[str, Any], field: str
) -> None:
    """A string that cannot be sent as UTF-8 is an InvalidRequestError naming its field."""
    script = Script(reply(200, SUBMIT_A))
    async with AsyncApimart(api_key="k" * 20, transport=script.transport(), poll=FAST_POLL) as c:
        with pytest.raises(am.InvalidRequestError) as info:
            await c.submit({"model": GEM, "prompt": "fox", **params})
    assert f"{field}:" in str(info.value)
    assert script.requests == []


# -- fuzzing whole requests through submit ------------------------------------------------

_text = st.text(max_size=30)  # hypothesis' default alphabet has no lone surrogates
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
    st.sampled_from(["1K", "2K", "4K", "0.5K", "16:9", "auto", "1:8", "en", "zh", "png"]),
    st.sampled_from(
        [
            "https://files.example/a.png",
            "http://files.example/b.jpg",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "data:image/png;base64,iVBORw0KGgo=",
            "data:text/html;base64,PGI+",
            "https://hooks.example:8443/x",
        ]
    ),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=10,
)
_fields = st.sampled_from(
    [
        "prompt",
        "image_urls",
        "size",
        "resolution",
        "n",
        "webhook",
        "language",
        "official_fallback",
        "google_search",
        "google_image_search",
        "response_format",
        "safety_tolerance",
        "prompt_upsampling",
    ]
)
_models = st.one_of(st.sampled_from(known_models()), _text, st.none(), st.integers())


@st.composite
def request_dicts(draw: st.DrawFn) -> dict[Any, Any]:
    """A request dict: usually a real model and prompt, fields of any JSON-ish value."""
    data: dict[Any, Any] = draw(
        st.dictionaries(st.one_of(_fields, _fields, _text), _values, max_size=5)
    )
    if draw(st.integers(0, 9)) < 8:
        data["model"] = draw(_models)
    if draw(st.integers(0, 9)) < 7:
        data["prompt"] = draw(st.one_of(_text, _values))
    return data


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=request_dicts(), allow_unknown=st.booleans())
async def test_fuzzed_requests_either_go_out_verbatim_or_raise_invalid_request(
    data: dict[Any, Any], allow_unknown: bool
) -> None:
    """Any dict: either one submit whose JSON is the validated body, or InvalidRequestError."""
    script = Script(reply(200, SUBMIT_A))
    async with AsyncApimart(api_key="k" * 20, transport=script.transport(), poll=FAST_POLL) as c:
        try:
            task = await c.submit(data, allow_unknown=allow_unknown)
        except am.InvalidRequestError as exc:
            assert str(exc) and script.requests == []
            return
    assert task.id == "task_A"
    [sent] = script.requests
    expected = parse_request(data, allow_unknown=allow_unknown).to_body()
    assert json.loads(sent.content) == json.loads(json.dumps(expected))
    assert sent.headers["content-type"] == "application/json"


# -- the command line's batch file ----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (b"null", "expected a JSON object, got NoneType"),
        (b"42", "expected a JSON object, got int"),
        (b'"a prompt"', "expected a JSON object, got str"),
        (b"true", "expected a JSON object, got bool"),
        (b'[{"model": "x"}]', "expected a JSON object, got list"),
        (b'{"model": "gemini-3-pro-image-preview", "prompt": "x"', "not valid JSON"),
        (b"{'model': 'single quotes'}", "not valid JSON"),
        (
            b'{"model": "gemini-3-pro-image-preview", "prompt": NaN}',
            f"{GEM}: prompt: must be a string",
        ),
    ],
)
def test_batch_lines_that_are_not_request_objects(
    tmp_path: Path, line: bytes, fragment: str
) -> None:
    """apimart batch --strict: a line that is not a request object stops it before any request."""
    app = pytest.importorskip("apimart_async.cli._app")
    setup = pytest.importorskip("apimart_async.cli._setup")
    good = json.dumps({"model": GEM, "prompt": "fine"}).encode()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(good + b"\n" + line + b"\n")
    fake = FakeApimart()
    out, err = io.StringIO(), io.StringIO()
    argv = ["batch", str(jobs), "--out", str(tmp_path / "out"), "--strict"]
    code = app.run(argv, runtime=setup.Runtime(fake=fake), stdout=out, stderr=err)
    assert code == 2
    assert f"line 2: {fragment}" in err.getvalue()
    assert fake.stats.requests_total == 0


def test_batch_file_that_is_not_utf8(tmp_path: Path) -> None:
    """A batch file with invalid UTF-8 is a clear error, not a traceback; nothing is sent."""
    app = pytest.importorskip("apimart_async.cli._app")
    setup = pytest.importorskip("apimart_async.cli._setup")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(b'{"model": "gemini-3-pro-image-preview", "prompt": "\xff\xfe"}\n')
    fake = FakeApimart()
    out, err = io.StringIO(), io.StringIO()
    argv = ["batch", str(jobs), "--out", str(tmp_path / "out")]
    code = app.run(argv, runtime=setup.Runtime(fake=fake), stdout=out, stderr=err)
    assert code == 2
    assert "jobs.jsonl" in err.getvalue() and "Traceback" not in err.getvalue()
    assert fake.stats.requests_total == 0
