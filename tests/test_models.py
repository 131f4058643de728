"""Per-model request validation: accepted values, boundary violations, messages, bodies.

Pure validation, no I/O. The value sets below are written out from the issue and
apimart-api.md §4 on purpose, rather than read back from ``rules()``, so that a wrong
Literal in ``models.py`` fails here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import TypeAdapter, ValidationError

from apimart_async import InvalidRequestError, UnknownModelError, models
from apimart_async.models import (
    MODELS,
    BaseImageRequest,
    FluxKontextRequest,
    Gemini3ProImageRequest,
    Gemini25FlashImageRequest,
    Gemini31FlashImageRequest,
    Imagen4Request,
    ImageRequest,
    ModelRules,
    RawRequest,
    known_models,
    parse_request,
)

URL = "https://cdn.example.com/ref.png"
DATA_URI = "data:image/png;base64,iVBORw0KGgo="

FLUX = ("flux-kontext-pro", "flux-kontext-max")
IMAGEN = ("imagen-4.0-apimart",)
G3PRO = ("gemini-3-pro-image-preview", "gemini-3-pro-image-preview-official")
G25 = ("gemini-2.5-flash-image-preview", "gemini-2.5-flash-image-preview-official")
G31 = ("gemini-3.1-flash-image-preview", "gemini-3.1-flash-image-preview-official")
GEMINI = G3PRO + G25 + G31
ALL = FLUX + IMAGEN + GEMINI
NON_OFFICIAL_GEMINI = tuple(m for m in GEMINI if not m.endswith("-official"))
OFFICIAL_GEMINI = tuple(m for m in GEMINI if m.endswith("-official"))

CLASSES: dict[str, type[BaseImageRequest]] = {
    **dict.fromkeys(FLUX, FluxKontextRequest),
    **dict.fromkeys(IMAGEN, Imagen4Request),
    **dict.fromkeys(G3PRO, Gemini3ProImageRequest),
    **dict.fromkeys(G25, Gemini25FlashImageRequest),
    **dict.fromkeys(G31, Gemini31FlashImageRequest),
}

GEMINI_SIZES = ("auto", "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
SIZES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        FLUX,
        ("match_input_image", "auto", "1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3")
        + ("21:9", "9:21"),
    ),
    **dict.fromkeys(IMAGEN, ("1:1", "4:3", "3:4", "16:9", "9:16")),
    **dict.fromkeys(G3PRO + G25, GEMINI_SIZES),
    **dict.fromkeys(G31, (*GEMINI_SIZES, "1:4", "4:1", "1:8", "8:1")),
}
RESOLUTIONS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(FLUX + IMAGEN, ()),
    **dict.fromkeys(G3PRO, ("1K", "2K", "4K")),
    **dict.fromkeys(G25, ("1K",)),
    **dict.fromkeys(G31, ("0.5K", "1K", "2K", "4K")),
}
N_VALUES: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(FLUX, ()),
    **dict.fromkeys(IMAGEN, (1,)),
    **dict.fromkeys(GEMINI, (1, 2, 3, 4)),
}
MAX_IMAGES = {**dict.fromkeys(FLUX, 1), **dict.fromkeys(IMAGEN, 0), **dict.fromkeys(GEMINI, 14)}
LANGUAGES = ("en", "zh", "ja", "ko", "ru", "fr", "de", "id", "pt", "es")


def _accepted() -> list[Any]:
    """Every accepted (model, extra params, field, value) combination, one case each."""
    cases: list[Any] = []

    def add(model: str, field: str, value: Any, **base: Any) -> None:
        cases.append(pytest.param(model, base, field, value, id=f"{model}-{field}={value!r}"))

    for model in ALL:
        for size in SIZES[model]:
            add(model, "size", size)
        for resolution in RESOLUTIONS[model]:
            add(model, "resolution", resolution)
        for n in N_VALUES[model]:
            add(model, "n", n)
        for language in LANGUAGES:
            add(model, "language", language)
        add(model, "webhook", "https://hooks.example.com/apimart")
        add(model, "webhook", "http://hooks.example.com:443/cb")
    for model in FLUX:
        for fmt in ("png", "jpg"):
            add(model, "response_format", fmt)
        for tolerance in range(7):
            add(model, "safety_tolerance", tolerance)
        for flag in (True, False):
            add(model, "prompt_upsampling", flag)
    for model in NON_OFFICIAL_GEMINI:
        for flag in (True, False):
            add(model, "official_fallback", flag)
    for model in G31:
        for flag in (True, False):
            add(model, "google_search", flag)
            add(model, "google_image_search", flag, google_search=True)
        add(model, "google_image_search", False)
    return cases


@pytest.mark.parametrize(("model", "base", "field", "value"), _accepted())
def test_every_accepted_value_is_sent_as_given(
    model: str, base: dict[str, Any], field: str, value: Any
) -> None:
    """Each documented value of each field validates and lands in the body unchanged."""
    req = parse_request(model=model, prompt="a red fox", **base, **{field: value})
    assert type(req) is CLASSES[model]
    body = req.to_body()
    assert body[field] == value
    assert type(body[field]) is type(value)
    assert body == {"model": model, "prompt": "a red fox", **base, field: value}


@pytest.mark.parametrize("model", ALL)
def test_registry_and_rules_match_the_spec(model: str) -> None:
    """MODELS maps every id to its family; rules() reports the documented value sets."""
    cls = MODELS[model]
    assert cls is CLASSES[model]
    rules = cls.rules()
    assert isinstance(rules, ModelRules)
    assert model in rules.models
    assert rules.sizes == SIZES[model]
    assert rules.resolutions == RESOLUTIONS[model]
    values = N_VALUES[model]
    assert rules.n_range == ((min(values), max(values)) if values else None)
    assert rules.max_images == MAX_IMAGES[model]
    assert rules.data_uris == (model in GEMINI)
    assert rules.max_prompt_chars == (1000 if model in G25 else None)
    assert rules.validated


def test_known_models_lists_exactly_the_nine_ids() -> None:
    """known_models() and MODELS cover the six ids and the three -official siblings."""
    assert set(known_models()) == set(ALL)
    assert len(known_models()) == 9
    assert tuple(MODELS) == known_models()


def test_registry_is_read_only() -> None:
    """MODELS cannot be mutated by a caller."""
    with pytest.raises(TypeError):
        MODELS["x"] = RawRequest  # type: ignore[index]


def test_extra_fields_in_rules() -> None:
    """rules().extra_fields names each family's own optional fields."""
    assert FluxKontextRequest.rules().extra_fields == (
        "response_format",
        "safety_tolerance",
        "prompt_upsampling",
    )
    assert Imagen4Request.rules().extra_fields == ()
    assert Gemini3ProImageRequest.rules().extra_fields == ("official_fallback",)
    assert Gemini31FlashImageRequest.rules().extra_fields == (
        "official_fallback",
        "google_search",
        "google_image_search",
    )
    raw = RawRequest.rules()
    assert not raw.validated
    assert raw.max_images is None


# -- images that are accepted -------------------------------------------------------------


@pytest.mark.parametrize("model", ALL)
def test_maximum_number_of_images_is_accepted(model: str) -> None:
    """Exactly the model's limit of reference images validates; mixed kinds count."""
    limit = MAX_IMAGES[model]
    pool: list[Any] = [URL, Path("ref.png"), b"\x89PNG"]
    images = [pool[i % 3] if model in GEMINI else URL for i in range(limit)]
    req = parse_request(model=model, prompt="p", image_urls=images)
    assert req.image_urls == (tuple(images) or None)


@pytest.mark.parametrize("model", GEMINI)
@pytest.mark.parametrize("fmt", ["png", "jpeg", "jpg", "webp", "gif"])
def test_gemini_accepts_data_uris(model: str, fmt: str) -> None:
    """Gemini models take data:image/<fmt>;base64, URIs and send them as strings."""
    uri = f"data:image/{fmt};base64,AAAA"
    body = parse_request(model=model, prompt="p", image_urls=[uri]).to_body()
    assert body["image_urls"] == [uri]


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/a.png",
        "https://example.com/a.png?sig=abc&x=1",
        "HTTPS://EXAMPLE.COM/A.PNG",
        "https://[2001:db8::1]:8443/a.png",
        "https://user@example.com/a",
    ],
)
@pytest.mark.parametrize("model", [*FLUX, GEMINI[0]])
def test_http_urls_are_accepted(model: str, url: str) -> None:
    """Any http(s) URL with a host is a valid reference for models that take images."""
    assert parse_request(model=model, prompt="p", image_urls=[url]).to_body()["image_urls"] == [url]


@pytest.mark.parametrize("model", ALL)
@pytest.mark.parametrize("empty", [None, [], ()])
def test_no_images_in_any_form_means_none(model: str, empty: Any) -> None:
    """None and an empty list both mean "no images": nothing is sent, even for imagen."""
    req = parse_request(model=model, prompt="p", image_urls=empty)
    assert req.image_urls is None
    assert "image_urls" not in req.to_body()


def test_list_input_is_stored_as_tuple() -> None:
    """image_urls given as a list is stored as a tuple (the model is frozen and hashable)."""
    req = parse_request(model="gemini-3-pro-image-preview", prompt="p", image_urls=[URL, URL])
    assert req.image_urls == (URL, URL)
    assert hash(req) == hash(req)


# -- rejections ---------------------------------------------------------------------------


def _rejected() -> list[Any]:
    """Every boundary violation: (model, params, field named, fragments of the message)."""
    cases: list[Any] = []

    def add(case_id: str, model: str, params: dict[str, Any], field: str, *frag: str) -> None:
        cases.append(pytest.param(model, params, field, frag, id=f"{model}-{case_id}"))

    for model in GEMINI:
        add("n=0", model, {"n": 0}, "n", "between 1 and 4", "got 0")
        add("n=5", model, {"n": 5}, "n", "between 1 and 4", "got 5")
        add("n-str", model, {"n": "2"}, "n", "JSON integer", "'2'")
        add("n-bool", model, {"n": True}, "n", "JSON integer", "True")
        add("n-float", model, {"n": 2.0}, "n", "JSON integer")
        add("15-images", model, {"image_urls": [URL] * 15}, "image_urls", "at most 14", "got 15")
        add(
            "15-local-images",
            model,
            {"image_urls": [URL] * 13 + [Path("a.png"), b"img"]},
            "image_urls",
            "at most 14",
        )
        add("bad-size", model, {"size": "7:3"}, "size", "must be one of", "'21:9'", "'7:3'")
        add("bad-res", model, {"resolution": "8K"}, "resolution", "must be one of", "'1K'")
        add("bad-data-uri", model, {"image_urls": ["data:image/png;base64,"]}, "image_urls[0]")
        add(
            "svg-data-uri",
            model,
            {"image_urls": ["data:image/svg+xml;base64,AAAA"]},
            "image_urls[0]",
        )
        add(
            "fallback-str",
            model,
            {"official_fallback": "yes"},
            "official_fallback",
            "true or false",
        )
        add("response_format", model, {"response_format": "png"}, "response_format", "unknown")
    for model in OFFICIAL_GEMINI:
        base = model.removesuffix("-official")
        for flag in (True, False):
            add(
                f"fallback={flag}",
                model,
                {"official_fallback": flag},
                "official_fallback",
                "not allowed",
                repr(base),
            )
    for model in G25:
        add("2K", model, {"resolution": "2K"}, "resolution", "must be one of '1K' (got '2K')")
        add("1k-case", model, {"resolution": "1k"}, "resolution", "did you mean '1K'?")
        add("prompt-1001", model, {"prompt": "x" * 1001}, "prompt", "at most 1000", "1001")
        add("1:4", model, {"size": "1:4"}, "size", "must be one of")
    for model in G3PRO:
        add("0.5K", model, {"resolution": "0.5K"}, "resolution", "'1K', '2K', '4K'")
        add("8:1", model, {"size": "8:1"}, "size", "must be one of")
        add("google_search", model, {"google_search": True}, "google_search", "unknown field")
    for model in G31:
        add(
            "image-search-alone",
            model,
            {"google_image_search": True},
            "google_image_search",
            "requires google_search=True",
        )
        add(
            "image-search-search-off",
            model,
            {"google_image_search": True, "google_search": False},
            "google_image_search",
            "requires google_search=True",
        )
        add("search-str", model, {"google_search": "yes"}, "google_search", "true or false")
        add("9:21", model, {"size": "9:21"}, "size", "must be one of")
    for model in FLUX:
        add("2-images", model, {"image_urls": [URL, URL]}, "image_urls", "at most 1", "got 2")
        add(
            "url+path",
            model,
            {"image_urls": [URL, Path("b.png")]},
            "image_urls",
            "at most 1",
            "Path and bytes",
        )
        add("data-uri", model, {"image_urls": [DATA_URI]}, "image_urls[0]", "data URIs")
        add("n", model, {"n": 1}, "n", "unknown field", "allowed fields")
        add("resolution", model, {"resolution": "1K"}, "resolution", "unknown field")
        add("size", model, {"size": "5:4"}, "size", "must be one of", "'match_input_image'")
        add("tolerance-7", model, {"safety_tolerance": 7}, "safety_tolerance", "between 0 and 6")
        add("tolerance-neg", model, {"safety_tolerance": -1}, "safety_tolerance", "between 0 and 6")
        add("tolerance-str", model, {"safety_tolerance": "3"}, "safety_tolerance", "JSON integer")
        add("upsampling-str", model, {"prompt_upsampling": "yes"}, "prompt_upsampling", "true or")
        add("format-webp", model, {"response_format": "webp"}, "response_format", "'png', 'jpg'")
        add("fallback", model, {"official_fallback": True}, "official_fallback", "unknown field")
    for model in IMAGEN:
        for image in (URL, Path("a.png"), b"img", DATA_URI):
            kind = type(image).__name__
            add(f"image-{kind}", model, {"image_urls": [image]}, "image_urls", "text-to-image only")
        add("n=2", model, {"n": 2}, "n", "must be 1 (got 2)")
        add("n=0", model, {"n": 0}, "n", "must be 1 (got 0)")
        add("21:9", model, {"size": "21:9"}, "size", "'1:1', '4:3', '3:4', '16:9', '9:16'")
        add("resolution", model, {"resolution": "1K"}, "resolution", "unknown field")
    for model in ALL:
        add("typo", model, {"sise": "1:1"}, "sise", "unknown field", "did you mean 'size'?")
        add("empty-prompt", model, {"prompt": ""}, "prompt", "must not be empty")
        add("blank-prompt", model, {"prompt": " \n\t"}, "prompt", "must not be empty")
        add("int-prompt", model, {"prompt": 5}, "prompt", "must be a string")
        add("lone-surrogate", model, {"prompt": "a\ud800"}, "prompt", "surrogate")
        add("language", model, {"language": "zh-CN"}, "language", "'en'")
        add("webhook", model, {"webhook": "ftp://hooks.example.com"}, "webhook", "http(s)")
        add("webhook-port", model, {"webhook": "https://h.example.com:8443"}, "webhook", "port")
        add("str-images", model, {"image_urls": URL}, "image_urls", "wrap it")
        add("dict-images", model, {"image_urls": {"url": URL}}, "image_urls", "list or tuple")
    return cases


@pytest.mark.parametrize(("model", "params", "field", "fragments"), _rejected())
def test_boundary_violations_are_rejected_before_io(
    model: str, params: dict[str, Any], field: str, fragments: tuple[str, ...]
) -> None:
    """Each violation raises InvalidRequestError naming the model, the field and the rule."""
    data = {"model": model, "prompt": "p", **params}
    with pytest.raises(InvalidRequestError) as info:
        parse_request(data)
    exc = info.value
    assert isinstance(exc, ValueError)
    assert isinstance(exc.__cause__, ValidationError)
    assert exc.model == model
    assert field in [f for f, _ in exc.errors]
    line = next(line for line in str(exc).splitlines() if line.startswith(f"{model}: {field}: "))
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize(
    ("entry", "fragments"),
    [
        ("cat.png", ("not an http(s) URL", "Path('cat.png')")),
        ("./refs/cat.png", ("Path('./refs/cat.png')",)),
        ("/home/me/cat.png", ("Path('/home/me/cat.png')",)),
        ("C:\\pics\\cat.png", ("Path(",)),
        ("file:///tmp/cat.png", ("file:// URL", "Path('/tmp/cat.png')")),
        ("ftp://example.com/cat.png", ("scheme 'ftp'",)),
        ("javascript:alert(1)", ("scheme 'javascript'",)),
        ("http://", ("needs a host",)),
        ("https://exa mple.com/a.png", ("not a valid http(s) URL",)),
        ("https://example.com/a\n.png", ("not a valid http(s) URL",)),
        ("", ("not an http(s) URL",)),
        ("data:text/plain;base64,AAAA", ("not a valid image data URI",)),
        ("data:image/png,AAAA", ("not a valid image data URI",)),
        ("data:image/png;base64,!!!!", ("not a valid image data URI",)),
        (b"", ("empty bytes",)),
        (42, ("must be an http(s) URL string, a pathlib.Path or bytes", "int")),
        (None, ("must be an http(s) URL string",)),
        ({"url": URL}, ("must be an http(s) URL string", "dict")),
    ],
)
def test_bad_image_entries_explain_what_to_pass(entry: Any, fragments: tuple[str, ...]) -> None:
    """A string that is no URL suggests Path(...); other bad entries say what is allowed."""
    model = "gemini-3-pro-image-preview"
    with pytest.raises(InvalidRequestError) as info:
        parse_request(model=model, prompt="p", image_urls=[URL, entry])
    (line,) = str(info.value).splitlines()
    assert line.startswith(f"{model}: image_urls[1]: ")
    for fragment in fragments:
        assert fragment in line


def test_every_problem_gets_its_own_line() -> None:
    """Several problems produce one line each, and .errors lists them as (field, message)."""
    with pytest.raises(InvalidRequestError) as info:
        parse_request(
            model="gemini-3-pro-image-preview", prompt="p", n=9, size="7:3", resolution="8K"
        )
    exc = info.value
    assert [f for f, _ in exc.errors] == ["n", "size", "resolution"]
    assert str(exc).splitlines() == [
        f"gemini-3-pro-image-preview: {field}: {message}" for field, message in exc.errors
    ]


def test_resolution_message_matches_the_documented_example() -> None:
    """The flagship message is exactly model: field: allowed values (got value)."""
    with pytest.raises(InvalidRequestError) as info:
        parse_request(model="gemini-2.5-flash-image-preview", prompt="p", resolution="2K")
    assert str(info.value) == (
        "gemini-2.5-flash-image-preview: resolution: must be one of '1K' (got '2K')"
    )
    assert info.value.errors == [("resolution", "must be one of '1K' (got '2K')")]


def test_prompt_of_exactly_1000_characters_is_fine_for_2_5_flash() -> None:
    """The 1000-character limit is inclusive, and other models have no limit."""
    parse_request(model="gemini-2.5-flash-image-preview", prompt="x" * 1000)
    parse_request(model="gemini-3-pro-image-preview", prompt="x" * 5000)


def test_huge_inputs_are_not_echoed_in_messages() -> None:
    """A multi-megabyte data URI or bytes value is shortened in the message."""
    uri = "data:image/png;base64," + "A" * 1_000_000
    with pytest.raises(InvalidRequestError) as info:
        parse_request(model="flux-kontext-pro", prompt="p", image_urls=[uri])
    assert len(str(info.value)) < 500
    with pytest.raises(InvalidRequestError) as info:
        parse_request(model="flux-kontext-pro", prompt="p", n=b"x" * 1_000_000)
    assert len(str(info.value)) < 1000


# -- model ids ------------------------------------------------------------------------------


def test_unknown_model_lists_the_known_ids_and_the_escape_hatch() -> None:
    """An unknown id raises UnknownModelError naming every known id and allow_unknown."""
    with pytest.raises(UnknownModelError) as info:
        parse_request(model="seedream-9", prompt="p")
    exc = info.value
    assert isinstance(exc, InvalidRequestError)
    assert isinstance(exc, ValueError)
    assert exc.model == "seedream-9"
    assert exc.errors[0][0] == "model"
    message = str(exc)
    assert "'seedream-9'" in message
    assert "allow_unknown=True" in message
    assert "RawRequest" in message
    for model in ALL:
        assert model in message


def test_unknown_model_suggests_a_close_id() -> None:
    """A near miss such as a missing -preview suffix gets a "did you mean"."""
    with pytest.raises(UnknownModelError, match="did you mean 'gemini-3-pro-image-preview'"):
        parse_request(model="gemini-3-pro-image", prompt="p")


def test_allow_unknown_sends_the_body_unvalidated() -> None:
    """allow_unknown=True turns an unknown id into a RawRequest with every field passed on."""
    req = parse_request(
        model="seedream-9", prompt="p", allow_unknown=True, size="3:5", quality="hd", n=3
    )
    assert type(req) is RawRequest
    assert req.to_body() == {
        "model": "seedream-9",
        "prompt": "p",
        "n": 3,
        "size": "3:5",
        "quality": "hd",
    }


def test_allow_unknown_still_validates_known_models() -> None:
    """allow_unknown only affects unknown ids: a known id keeps its rules."""
    with pytest.raises(InvalidRequestError):
        parse_request(model="flux-kontext-pro", prompt="p", n=2, allow_unknown=True)


def test_raw_request_passes_extra_fields_through() -> None:
    """RawRequest works for a known id too (e.g. an undocumented mask_url), nested JSON kept."""
    req = RawRequest(
        model="gemini-3-pro-image-preview",
        prompt="p",
        image_urls=(URL,),
        mask_url="https://cdn.example.com/mask.png",
        options={"a": [1, 2.5, None, True], "b": "x"},
        dropped=None,
    )
    assert parse_request(req) is req
    body = req.to_body()
    assert body == {
        "model": "gemini-3-pro-image-preview",
        "prompt": "p",
        "image_urls": [URL],
        "mask_url": "https://cdn.example.com/mask.png",
        "options": {"a": [1, 2.5, None, True], "b": "x"},
    }
    body["options"]["a"].append(3)
    assert req.to_body()["options"] == {"a": [1, 2.5, None, True], "b": "x"}
    assert RawRequest.rules().models == ()


@pytest.mark.parametrize(
    ("params", "field", "fragment"),
    [
        ({"prompt": " "}, "prompt", "must not be empty"),
        ({"n": "2"}, "n", "JSON integer"),
        ({"n": 0}, "n", ">= 1"),
        ({"image_urls": ["cat.png"]}, "image_urls[0]", "Path('cat.png')"),
        ({"blob": object()}, "blob", "not JSON"),
        ({"ratio": float("nan")}, "ratio", "not valid JSON"),
        ({"nested": {"k": [1, {2: 3}]}}, "nested.k[1]", "keys must be strings"),
        ({"text": "a\udc00"}, "text", "surrogate"),
    ],
)
def test_raw_request_keeps_the_basic_checks(
    params: dict[str, Any], field: str, fragment: str
) -> None:
    """The escape hatch still rejects an empty prompt, string n, bad images and non-JSON."""
    with pytest.raises(InvalidRequestError) as info:
        parse_request({"model": "new-model", "prompt": "p", **params}, allow_unknown=True)
    assert info.value.errors[0][0] == field
    assert fragment in str(info.value)


@pytest.mark.parametrize("model", [None, "", "  ", 3])
def test_raw_request_needs_a_model_id(model: Any) -> None:
    """RawRequest refuses a missing, blank or non-string model id."""
    with pytest.raises(ValueError, match="model"):
        RawRequest(model=model, prompt="p")


def test_missing_model_names_the_field() -> None:
    """No model at all is an InvalidRequestError about the field 'model'."""
    with pytest.raises(InvalidRequestError) as info:
        parse_request(prompt="p")
    assert info.value.errors[0][0] == "model"
    assert str(info.value).startswith("model: is required")
    assert not isinstance(info.value, UnknownModelError)


def test_non_string_model_is_rejected() -> None:
    """A model id that is not a string is rejected, not looked up."""
    with pytest.raises(InvalidRequestError, match="model: must be a string"):
        parse_request({"model": ["flux-kontext-pro"], "prompt": "p"})


def test_wrong_request_type_is_rejected() -> None:
    """A request that is neither a model, a mapping nor None is a ValueError, not a crash."""
    with pytest.raises(InvalidRequestError, match="request: must be a request model"):
        parse_request(["flux-kontext-pro", "p"])  # type: ignore[arg-type]


# -- the three input forms --------------------------------------------------------------------


def test_kwargs_dict_and_instance_validate_the_same_way() -> None:
    """kwargs, a dict and a model instance give the same class and body."""
    params: dict[str, Any] = {
        "model": "gemini-3.1-flash-image-preview",
        "prompt": "p",
        "n": 2,
        "size": "1:8",
    }
    from_kwargs = parse_request(**params)
    from_dict = parse_request(params)
    instance = Gemini31FlashImageRequest(
        model="gemini-3.1-flash-image-preview", prompt="p", n=2, size="1:8"
    )
    assert parse_request(instance) is instance
    assert from_kwargs.to_body() == from_dict.to_body() == instance.to_body()
    assert type(from_kwargs) is type(from_dict) is type(instance)


def test_params_are_merged_over_a_mapping() -> None:
    """Keyword params win over the mapping's values."""
    req = parse_request({"model": "gemini-3-pro-image-preview", "prompt": "old", "n": 1}, n=3)
    assert req.to_body() == {"model": "gemini-3-pro-image-preview", "prompt": "old", "n": 3}


def test_params_are_merged_over_an_instance_and_revalidated() -> None:
    """An instance plus params is a validated merge, keeping unset fields unset."""
    base = Gemini3ProImageRequest(model="gemini-3-pro-image-preview", prompt="p", size="1:1")
    merged = parse_request(base, resolution="4K")
    assert merged.to_body() == {
        "model": "gemini-3-pro-image-preview",
        "prompt": "p",
        "size": "1:1",
        "resolution": "4K",
    }
    with pytest.raises(InvalidRequestError, match="resolution"):
        parse_request(base, resolution="0.5K")


def test_an_instance_can_be_moved_to_another_model() -> None:
    """Changing model through params looks the new id up in the registry."""
    base = Gemini3ProImageRequest(model="gemini-3-pro-image-preview", prompt="p", n=2)
    moved = parse_request(base, model="gemini-3.1-flash-image-preview", resolution="0.5K")
    assert type(moved) is Gemini31FlashImageRequest
    with pytest.raises(UnknownModelError):
        parse_request(base, model="new-model")
    raw = parse_request(base, model="new-model", allow_unknown=True)
    assert type(raw) is RawRequest


def test_raw_instance_stays_raw_when_merged() -> None:
    """A RawRequest plus params is still a RawRequest, even for a known id."""
    raw = RawRequest(model="flux-kontext-pro", prompt="p", seed=1)
    merged = parse_request(raw, n=2)
    assert type(merged) is RawRequest
    assert merged.to_body() == {"model": "flux-kontext-pro", "prompt": "p", "n": 2, "seed": 1}


def test_direct_construction_raises_a_value_error() -> None:
    """Building a class directly raises InvalidRequestError (a ValueError), as
    parse_request does; pydantic's error is its cause."""
    with pytest.raises(InvalidRequestError, match="resolution") as info:
        Gemini25FlashImageRequest(
            model="gemini-2.5-flash-image-preview",
            prompt="p",
            resolution="2K",  # type: ignore[arg-type]
        )
    assert isinstance(info.value.__cause__, ValidationError)
    with pytest.raises(InvalidRequestError, match="model"):
        Imagen4Request(model="flux-kontext-pro", prompt="p")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="n: must be between 1 and 4"):
        Gemini3ProImageRequest.model_validate(
            {"model": "gemini-3-pro-image-preview", "prompt": "p", "n": 9}
        )


def test_models_are_frozen() -> None:
    """Assigning to a field of a validated request fails."""
    req = parse_request(model="flux-kontext-pro", prompt="p")
    with pytest.raises(ValidationError):
        req.prompt = "other"


def test_discriminated_union_picks_the_family() -> None:
    """ImageRequest validates a dict into the class of its model id."""
    adapter: TypeAdapter[BaseImageRequest] = TypeAdapter(ImageRequest)
    for model in ALL:
        assert type(adapter.validate_python({"model": model, "prompt": "p"})) is CLASSES[model]
    with pytest.raises(ValidationError):
        adapter.validate_python({"model": "unknown", "prompt": "p"})


# -- serialization ---------------------------------------------------------------------------


def test_body_drops_unset_and_none_fields() -> None:
    """Only what the caller set is sent; None means "let the service decide"."""
    req = parse_request(
        model="gemini-3.1-flash-image-preview",
        prompt="p",
        size=None,
        resolution=None,
        n=None,
        image_urls=None,
        google_search=False,
    )
    assert req.to_body() == {
        "model": "gemini-3.1-flash-image-preview",
        "prompt": "p",
        "google_search": False,
    }


def test_body_is_plain_json_with_int_n_and_string_urls() -> None:
    """n is a JSON integer and image_urls a list of plain strings (never objects)."""
    req = parse_request(
        model="gemini-3-pro-image-preview",
        prompt="a fox",
        n=2,
        image_urls=(URL, DATA_URI),
        resolution="2K",
    )
    body = req.to_body()
    assert body == {
        "model": "gemini-3-pro-image-preview",
        "prompt": "a fox",
        "image_urls": [URL, DATA_URI],
        "n": 2,
        "resolution": "2K",
    }
    assert type(body["n"]) is int
    assert type(body["image_urls"]) is list
    assert json.loads(json.dumps(body)) == body
    urls = cast("list[str]", body["image_urls"])
    urls.append("x")
    assert req.image_urls == (URL, DATA_URI)


def test_flux_body_omits_size_and_effective_size_explains_the_default() -> None:
    """Flux's size is left to the service: match_input_image with an image, 16:9 without."""
    bare = parse_request(model="flux-kontext-pro", prompt="p")
    edit = parse_request(model="flux-kontext-max", prompt="p", image_urls=[URL])
    assert "size" not in bare.to_body()
    assert "size" not in edit.to_body()
    assert isinstance(bare, FluxKontextRequest)
    assert isinstance(edit, FluxKontextRequest)
    assert bare.effective_size == "16:9"
    assert edit.effective_size == "match_input_image"
    sized = FluxKontextRequest(model="flux-kontext-pro", prompt="p", size="21:9")
    assert sized.effective_size == "21:9"
    assert Imagen4Request(model="imagen-4.0-apimart", prompt="p").effective_size == "16:9"


@pytest.mark.parametrize(
    "entry", [Path("ref.png"), b"\x89PNG\r\n", bytearray(b"\x89PNG"), memoryview(b"\x89PNG")]
)
def test_to_body_refuses_local_images(entry: Any) -> None:
    """submit() needs URLs: a Path or bytes entry raises, suggesting generate()/upload."""
    req = parse_request(model="gemini-3-pro-image-preview", prompt="p", image_urls=[URL, entry])
    with pytest.raises(InvalidRequestError) as info:
        req.to_body()
    message = str(info.value)
    assert message.startswith("gemini-3-pro-image-preview: image_urls[1]: ")
    assert "generate()" in message
    assert "upload_image()" in message
    assert info.value.errors[0][0] == "image_urls[1]"


def test_local_images_and_with_image_urls_round_trip() -> None:
    """local_images() lists what to upload; with_image_urls() swaps in the URLs."""
    path = Path("refs/a.png")
    req = parse_request(
        model="gemini-3.1-flash-image-preview",
        prompt="p",
        n=2,
        image_urls=[path, URL, bytearray(b"raw")],
    )
    assert req.local_images() == [(0, path), (2, b"raw")]
    uploaded = req.with_image_urls(["https://u/1.png", URL, "https://u/2.png"])
    assert type(uploaded) is Gemini31FlashImageRequest
    assert uploaded.local_images() == []
    assert uploaded.to_body() == {
        "model": "gemini-3.1-flash-image-preview",
        "prompt": "p",
        "image_urls": ["https://u/1.png", URL, "https://u/2.png"],
        "n": 2,
    }
    assert req.local_images() == [(0, path), (2, b"raw")]  # the original is untouched


def test_with_image_urls_checks_count_and_urls() -> None:
    """with_image_urls needs one URL per entry, and the URLs are re-validated."""
    req = parse_request(model="flux-kontext-pro", prompt="p", image_urls=[Path("a.png")])
    with pytest.raises(InvalidRequestError, match="needs 1 URL"):
        req.with_image_urls([])
    with pytest.raises(InvalidRequestError, match="needs 1 URL"):
        req.with_image_urls("https://u/1.png")
    with pytest.raises(InvalidRequestError, match="data URIs"):
        req.with_image_urls([DATA_URI])
    assert req.with_image_urls(["https://u/1.png"]).to_body()["image_urls"] == ["https://u/1.png"]


def test_os_pathlike_entries_become_paths() -> None:
    """Any os.PathLike (not only pathlib.Path) is accepted and stored as a Path."""

    class Where:
        def __fspath__(self) -> str:
            return "refs/x.png"

    req = parse_request(model="gemini-3-pro-image-preview", prompt="p", image_urls=[Where()])
    assert req.local_images() == [(0, Path("refs/x.png"))]


@pytest.mark.parametrize(
    ("params", "body"),
    [
        (
            {"model": "flux-kontext-pro", "prompt": "make the hair blue", "image_urls": [URL]},
            {"model": "flux-kontext-pro", "prompt": "make the hair blue", "image_urls": [URL]},
        ),
        (
            {
                "model": "flux-kontext-max",
                "prompt": "p",
                "size": "9:21",
                "response_format": "jpg",
                "safety_tolerance": 0,
                "prompt_upsampling": False,
            },
            {
                "model": "flux-kontext-max",
                "prompt": "p",
                "size": "9:21",
                "response_format": "jpg",
                "safety_tolerance": 0,
                "prompt_upsampling": False,
            },
        ),
        (
            {"model": "imagen-4.0-apimart", "prompt": "p", "n": 1, "size": "1:1"},
            {"model": "imagen-4.0-apimart", "prompt": "p", "n": 1, "size": "1:1"},
        ),
        (
            {
                "model": "gemini-3.1-flash-image-preview-official",
                "prompt": "p",
                "google_search": True,
                "google_image_search": True,
                "resolution": "0.5K",
                "webhook": "https://hooks.example.com",
                "language": "ja",
            },
            {
                "model": "gemini-3.1-flash-image-preview-official",
                "prompt": "p",
                "webhook": "https://hooks.example.com",
                "language": "ja",
                "resolution": "0.5K",
                "google_search": True,
                "google_image_search": True,
            },
        ),
    ],
)
def test_representative_bodies(params: dict[str, Any], body: dict[str, Any]) -> None:
    """A few full requests serialize to exactly the documented JSON body."""
    assert parse_request(params).to_body() == body
    assert json.dumps(parse_request(params).to_body(), sort_keys=True) == json.dumps(
        body, sort_keys=True
    )


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (
            lambda: models.Gemini3ProImageRequest(
                model="gemini-3-pro-image-preview", prompt="x", n=5
            ),
            "n",
        ),
        (
            lambda: models.Imagen4Request(model="imagen-4.0-apimart", prompt="x", size="21:9"),
            "size",
        ),
        (
            lambda: models.FluxKontextRequest(
                model="flux-kontext-pro", prompt="x", image_urls=["https://a.example/1.png"] * 2
            ),
            "image_urls",
        ),
    ],
)
def test_models_built_directly_raise_invalid_request_error(build: Any, field: str) -> None:
    """Built directly, a model fails like parse_request: InvalidRequestError naming
    the model, the field and what is allowed, never pydantic's raw error."""
    with pytest.raises(InvalidRequestError) as info:
        build()
    assert not isinstance(info.value, ValidationError)
    assert [f for f, _ in info.value.errors] == [field]
    assert str(info.value).startswith(f"{info.value.model}: {field}: ")


def test_sequence_fields_take_lists_and_store_tuples() -> None:
    request = models.Gemini3ProImageRequest(
        model="gemini-3-pro-image-preview", prompt="x", image_urls=["https://a.example/1.png"]
    )
    assert request.image_urls == ("https://a.example/1.png",)
