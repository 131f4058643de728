"""Property tests: valid requests round-trip through their body; nothing but
InvalidRequestError escapes validation, whatever the input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apimart_async import InvalidRequestError
from apimart_async.models import (
    MODELS,
    BaseImageRequest,
    FluxKontextRequest,
    Gemini31FlashImageRequest,
    RawRequest,
    known_models,
    parse_request,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_prompts = st.text(min_size=1, max_size=200).filter(lambda s: s.strip() != "")
_hosts = st.from_regex(r"[a-z][a-z0-9-]{0,15}(\.[a-z]{2,6}){1,2}", fullmatch=True)
_paths = st.from_regex(r"(/[A-Za-z0-9._~%-]{1,12}){0,3}", fullmatch=True)
_http_urls = st.builds(
    lambda scheme, host, path: f"{scheme}://{host}{path}",
    st.sampled_from(["http", "https"]),
    _hosts,
    _paths,
)
_data_uris = st.builds(
    lambda fmt, payload: f"data:image/{fmt};base64,{payload}",
    st.sampled_from(["png", "jpeg", "jpg", "webp", "gif"]),
    st.from_regex(r"[A-Za-z0-9+/]{4,40}={0,2}", fullmatch=True),
)


@st.composite
def valid_requests(draw: st.DrawFn, model: str | None = None) -> dict[str, Any]:
    """A valid request dict for *model* (or any known model), built from its rules."""
    model = model or draw(st.sampled_from(known_models()))
    cls = MODELS[model]
    rules = cls.rules()
    prompt = draw(_prompts if rules.max_prompt_chars is None else _prompts.map(lambda p: p[:1000]))
    data: dict[str, Any] = {"model": model, "prompt": prompt}

    def maybe() -> bool:
        return draw(st.booleans())

    if rules.sizes and maybe():
        data["size"] = draw(st.sampled_from(rules.sizes))
    if rules.resolutions and maybe():
        data["resolution"] = draw(st.sampled_from(rules.resolutions))
    if rules.n_range and maybe():
        data["n"] = draw(st.integers(*rules.n_range))
    if rules.max_images and maybe():
        entry = st.one_of(_http_urls, _data_uris) if rules.data_uris else _http_urls
        data["image_urls"] = draw(st.lists(entry, min_size=1, max_size=rules.max_images))
    if maybe():
        data["language"] = draw(st.sampled_from(["en", "zh", "ja", "ko", "de"]))
    if maybe():
        data["webhook"] = draw(_http_urls)
    if cls is FluxKontextRequest:
        if maybe():
            data["response_format"] = draw(st.sampled_from(["png", "jpg"]))
        if maybe():
            data["safety_tolerance"] = draw(st.integers(0, 6))
        if maybe():
            data["prompt_upsampling"] = draw(st.booleans())
    fallback_ok = "official_fallback" in rules.extra_fields and not model.endswith("-official")
    if fallback_ok and maybe():
        data["official_fallback"] = draw(st.booleans())
    if cls is Gemini31FlashImageRequest and maybe():
        data["google_search"] = True
        if maybe():
            data["google_image_search"] = draw(st.booleans())
    return data


@SETTINGS
@given(valid_requests())
def test_valid_request_body_revalidates_to_the_same_body(data: dict[str, Any]) -> None:
    """request -> to_body() -> parse_request(body) gives an equal body and the same class."""
    req = parse_request(data)
    body = req.to_body()
    assert body == {k: (list(v) if k == "image_urls" else v) for k, v in data.items()}
    assert json.loads(json.dumps(body, ensure_ascii=False)) == body
    again = parse_request(body)
    assert type(again) is type(req)
    assert again.to_body() == body


@SETTINGS
@given(valid_requests())
def test_valid_request_validates_the_same_in_every_form(data: dict[str, Any]) -> None:
    """A dict, kwargs and an instance plus no params all give the same body."""
    from_dict = parse_request(data)
    assert parse_request(**data).to_body() == from_dict.to_body()
    assert parse_request(from_dict) is from_dict
    assert type(from_dict).model_validate(data).to_body() == from_dict.to_body()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
_anything = st.one_of(
    _json,
    st.binary(max_size=8),
    st.builds(Path, st.text(max_size=10)),
    st.lists(
        st.one_of(
            _http_urls, _data_uris, st.text(max_size=20), st.binary(max_size=4), st.integers()
        ),
        max_size=16,
    ),
    st.tuples(st.text(max_size=5)),
    st.sampled_from(["1K", "2K", "0.5K", "auto", "16:9", "1:8", "2", "yes", " ", ""]),
)
_field_names = st.sampled_from(
    [
        "model",
        "prompt",
        "image_urls",
        "size",
        "resolution",
        "n",
        "official_fallback",
        "google_search",
        "google_image_search",
        "response_format",
        "safety_tolerance",
        "prompt_upsampling",
        "webhook",
        "language",
    ]
)


@st.composite
def arbitrary_dicts(draw: st.DrawFn) -> dict[Any, Any]:
    """Random keys and values, usually with a real model id so the rules are reached."""
    keys = st.one_of(_field_names, _field_names, _field_names, st.text(max_size=8), st.integers())
    data: dict[Any, Any] = draw(st.dictionaries(keys, _anything, max_size=6))
    if draw(st.integers(0, 9)) < 8:
        data["model"] = draw(st.sampled_from([*known_models(), "new-model", "", " "]))
    if draw(st.booleans()):
        data["prompt"] = draw(st.one_of(_prompts, _anything))
    return data


@SETTINGS
@given(arbitrary_dicts(), st.booleans())
def test_arbitrary_input_validates_or_raises_invalid_request(
    data: dict[Any, Any], allow_unknown: bool
) -> None:
    """Fuzz: any dict either validates (and serializes) or raises InvalidRequestError."""
    try:
        req = parse_request(data, allow_unknown=allow_unknown)
    except InvalidRequestError as exc:
        assert str(exc)
        assert exc.errors
        return
    assert isinstance(req, BaseImageRequest)
    if not allow_unknown:
        assert not isinstance(req, RawRequest)
    if req.local_images():
        return
    body = req.to_body()
    json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
    again = parse_request(body, allow_unknown=True)
    assert again.to_body() == body


@SETTINGS
@given(valid_requests(), _field_names, _anything, st.booleans())
def test_one_bad_field_on_a_valid_request_raises_invalid_request_or_validates(
    data: dict[str, Any], field: str, value: Any, allow_unknown: bool
) -> None:
    """Fuzz near the boundary: one field of a valid request set to anything."""
    data = {**data, field: value}
    try:
        req = parse_request(data, allow_unknown=allow_unknown)
    except InvalidRequestError as exc:
        assert exc.errors
        assert all(line.count(": ") >= 1 for line in str(exc).splitlines())
        return
    if not req.local_images():
        assert parse_request(req.to_body(), allow_unknown=True).to_body() == req.to_body()
