"""FakeApimart's value objects (Latency, Variants, ManualClock) and upload parsing details."""

from __future__ import annotations

import random

import httpx
import pytest

from apimart_async.testing import FakeApimart, Fault, Latency, ManualClock, Variants, Webhooks
from apimart_async.testing._images import sniff_image_type
from apimart_async.testing._multipart import MultipartError, boundary_of, parse_multipart

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each async test once per backend."""
    return str(request.param)


def test_latency_profiles() -> None:
    """fast is ms-scale, zero is instant, fixed is constant, realistic is clipped lognormal."""
    rng = random.Random(0)
    assert Latency() == Latency.fast()
    fast = [Latency.fast().sample(rng) * Latency.fast().time_scale for _ in range(200)]
    assert all(0.002 <= d <= 0.005 for d in fast)
    assert Latency.zero().sample(rng) == 0.0
    assert Latency.fixed(7.5).sample(rng) == 7.5 and Latency.fixed(7.5).time_scale == 1.0
    realistic = Latency.realistic()
    draws = sorted(realistic.sample(rng) for _ in range(2000))
    assert draws[0] >= 2.0 and draws[-1] <= 120.0
    assert 12.0 <= draws[1000] <= 18.0  # the median is about 15 s
    assert draws[-20] > 40.0  # a long tail
    assert realistic.time_scale == 0.001 and realistic.scaled(1.0).time_scale == 1.0


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("fast", Latency.fast()),
        ("zero", Latency.zero()),
        ("fixed:20", Latency.fixed(20.0)),
        ("realistic", Latency.realistic()),
        ("realistic:30", Latency.realistic(median=30.0)),
    ],
)
def test_latency_parse(spec: str, expected: Latency) -> None:
    """The CLI spellings map onto the constructors."""
    assert Latency.parse(spec) == expected
    assert Latency.parse(spec, time_scale=0.5).time_scale == 0.5


@pytest.mark.parametrize(
    "build",
    [
        lambda: Latency.parse("slow"),
        lambda: Latency.parse("fixed"),
        lambda: Latency.fixed(-1.0),
        lambda: Latency.fast(request_latency=(0.2, 0.1)),
        lambda: Latency.realistic(median=0.0),
        lambda: Latency.zero().scaled(-1.0),
    ],
)
def test_latency_rejects_nonsense(build: object) -> None:
    """Negative, inverted or unknown latency settings are errors."""
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


def test_variants_all_covers_every_combination() -> None:
    """Variants.all() lists 36 distinct variants covering every documented shape."""
    variants = Variants.all()
    assert len(set(variants)) == 36
    assert {v.submit_shape for v in variants} == {"list", "object", "top_level", "versioned"}
    assert {v.url_shape for v in variants} == {"list", "string", "entries"}
    assert {v.error_code for v in variants} == {"int", "string", "plain"}
    with pytest.raises(ValueError):
        Variants(url_shape="nested")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Variants.from_dict({"shape": "list"})


def test_manual_clock_and_fault_kinds() -> None:
    """ManualClock only moves forward; task fates are told apart from request faults."""
    clock = ManualClock(5.0)
    clock.advance(1.5)
    assert clock() == 6.5
    with pytest.raises(ValueError):
        clock.advance(-1.0)
    assert Fault.TASK_STUCK.is_task_fate and not Fault.RESET.is_task_fate
    assert Fault("rate_limit") is Fault.RATE_LIMIT


def test_sniffing_uses_magic_bytes_only() -> None:
    """JPEG, PNG, GIF and WebP are recognised by their signatures; anything else is not."""
    assert sniff_image_type(b"\xff\xd8\xff\xdb") == "image/jpeg"
    assert sniff_image_type(b"\x89PNG\r\n\x1a\n") == "image/png"
    assert sniff_image_type(b"GIF87a") == "image/gif"
    assert sniff_image_type(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert sniff_image_type(b"RIFF\0\0\0\0AVI ") is None
    assert sniff_image_type(b"") is None
    assert sniff_image_type(b"<svg") is None


def test_multipart_parser_edge_cases() -> None:
    """Quoted boundaries, escaped quotes in filenames, several parts, broken framing."""
    ctype = 'multipart/form-data; charset=utf-8; boundary="b;1"'
    assert boundary_of(ctype) == "b;1"
    assert boundary_of("application/json") is None
    assert boundary_of("multipart/form-data") is None
    body = (
        b"preamble\r\n--b;1\r\n"
        b'Content-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        b"--b;1\r\n"
        b'Content-Disposition: form-data; name="file"; filename="a \\"b\\"; c.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n--b;1--\r\n"
    )
    note, file = parse_multipart(body, "b;1")
    assert (note.name, note.filename, note.data) == ("note", None, b"hello")
    assert file.filename == 'a "b"; c.png' and file.content_type == "image/png"
    assert file.data == b"\x89PNG"
    for broken in (
        b"no delimiter",
        b"--b;1\r\nno blank line",
        b"--b;1\r\nX: y\r\n\r\nunterminated",
    ):
        with pytest.raises(MultipartError):
            parse_multipart(broken, "b;1")


async def test_unicode_and_path_filenames_round_trip() -> None:
    """A non-ASCII name is kept, a path is cut to its base name, and the URL still resolves."""
    fake = FakeApimart()
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 8
    async with httpx.AsyncClient(
        transport=fake.transport(), headers={"Authorization": "Bearer test"}
    ) as c:
        for name, expected in [("猫 photo#1.png", "猫 photo#1.png"), ("../../etc/x.png", "x.png")]:
            response = await c.post(
                "https://api.apimart.ai/v1/uploads/images", files={"file": (name, png)}
            )
            body = response.json()
            assert body["filename"] == expected
            assert "#" not in body["url"].split("/f/", 1)[1]  # escaped, so still one URL path
            got = await c.get(body["url"])
            assert got.content == png and fake.stored_upload(body["url"]) == png


def test_variants_defaults_and_new_fields() -> None:
    """The submit shape follows the version header by default; the synchronous result
    and the unlimited-balance shapes are selectable; bad values name the field."""
    assert Variants().submit_shape == "auto"
    assert Variants(submit_shape="result").submit_shape == "result"
    assert Variants.from_dict({"unlimited_balance": "flag"}).unlimited_balance == "flag"
    assert all(v.submit_shape != "result" for v in Variants.all())
    with pytest.raises(ValueError, match="unlimited_balance"):
        Variants(unlimited_balance="sometimes")  # type: ignore[arg-type]


def test_webhooks_options() -> None:
    """``Webhooks``: the documented retry schedule by default, JSON-buildable, and every
    bad value rejected with its name."""
    default = Webhooks()
    assert default.retry_delays == (10.0, 30.0, 60.0) and default.max_attempts == 4
    assert (default.drop, default.duplicate, default.failures, default.delay) == (0, 0, 0, 0)
    built = Webhooks.from_dict({"drop": 0.1, "retry_delays": [1, 2], "callback_first": True})
    assert built == Webhooks(drop=0.1, retry_delays=(1, 2), callback_first=True)
    assert built.max_attempts == 3
    for bad, name in (
        ({"drop": 1.5}, "drop"),
        ({"duplicate": -0.1}, "duplicate"),
        ({"failures": -1}, "failures"),
        ({"failures": True}, "failures"),
        ({"delay": -1.0}, "delay"),
        ({"retry_delays": (1.0, float("inf"))}, "retry_delays"),
        ({"timeout": 0.0}, "timeout"),
    ):
        with pytest.raises(ValueError, match=name):
            Webhooks(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown Webhooks fields"):
        Webhooks.from_dict({"retries": 3})
