"""Per-model request models: bad parameters fail here, before any request is sent.

APIMart treats bad parameters unevenly: some are silently coerced (imagen falls back
to 16:9 on an unknown ratio), some fail late as HTTP 500, all may cost money. So every
request is validated locally against the rules of its model (apimart-api.md §3-§5),
whether it comes as keyword arguments, a dict or a model instance::

    from pathlib import Path
    from apimart_async.models import Gemini3ProImageRequest, parse_request

    req = parse_request(model="gemini-3-pro-image-preview", prompt="a fox", n=2)
    req.to_body()  # {'model': 'gemini-3-pro-image-preview', 'prompt': 'a fox', 'n': 2}

    req = Gemini3ProImageRequest(
        model="gemini-3-pro-image-preview", prompt="make it snow",
        image_urls=[Path("ref.png")], resolution="2K",
    )  # client.generate(req) uploads ref.png first, then submits its URL

    parse_request(model="gemini-2.5-flash-image-preview", prompt="x", resolution="2K")
    # InvalidRequestError: gemini-2.5-flash-image-preview: resolution: must be one of '1K'
    # (got '2K')

    parse_request(model="brand-new-model", prompt="x", allow_unknown=True)  # -> RawRequest

What can go wrong: an invalid request raises ``InvalidRequestError`` (a ``ValueError``)
with one line per problem naming the model, the field and the allowed values; an
unknown model id raises ``UnknownModelError`` listing the known ids. Constructing a
model class directly raises the same ``InvalidRequestError``. ``None`` for an optional
field means "not set": the serialized body only carries what the caller set, and the
service applies its defaults.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike, fspath
from pathlib import Path
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Literal,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
)
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ._exceptions import InvalidRequestError, UnknownModelError
from ._text import encodable as _encodable

if TYPE_CHECKING:
    import sys

    from pydantic_core import ErrorDetails

    if sys.version_info >= (3, 11):
        from typing import Self
    else:
        from typing_extensions import Self

__all__ = [
    "MODELS",
    "BaseImageRequest",
    "FluxKontextRequest",
    "Gemini3ProImageRequest",
    "Gemini25FlashImageRequest",
    "Gemini31FlashImageRequest",
    "ImageRef",
    "ImageRequest",
    "Imagen4Request",
    "ModelRules",
    "RawRequest",
    "known_models",
    "parse_request",
]

ImageRef = str | Path | bytes
"""An ``image_urls`` entry: an http(s) URL or data URI string, or a local image
(``pathlib.Path`` or ``bytes``) that ``generate``/``generate_many`` upload first."""

# -- value sets (apimart-api.md §4) ---------------------------------------------------

# Model ids per family (§4); the -official siblings exist for the Gemini ids only.
_FluxId = Literal["flux-kontext-pro", "flux-kontext-max"]
_ImagenId = Literal["imagen-4.0-apimart"]
_Gemini3ProId = Literal["gemini-3-pro-image-preview", "gemini-3-pro-image-preview-official"]
_Gemini25FlashId = Literal[
    "gemini-2.5-flash-image-preview", "gemini-2.5-flash-image-preview-official"
]
_Gemini31FlashId = Literal[
    "gemini-3.1-flash-image-preview", "gemini-3.1-flash-image-preview-official"
]

# §4.1 lists match_input_image, auto, 1:1, 4:3, 3:4 and "…"; the rest (16:9, 9:16, 3:2,
# 2:3, 21:9, 9:21) comes from clones of the page (open question #2): accepted, as the
# wider rule, because 16:9 is the documented default anyway.
_FluxSize = Literal[
    "match_input_image", "auto", "1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3", "21:9", "9:21"
]
# §4.2 / §11.7: DOC and LLMS list only 16:9 and 9:16; CLONE and the model matrix add 1:1,
# 4:3 and 3:4. We accept the wider set, and reject anything else locally because the
# service would silently fall back to 16:9 (§5) instead of failing.
_ImagenSize = Literal["1:1", "4:3", "3:4", "16:9", "9:16"]
# §4.3 newer copy (the older one has no ``auto``); §4.4 uses the same list.
_GeminiSize = Literal[
    "auto", "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"
]
# §4.5: the DOC list lacks ``auto``; CLONE and the newer copy add it, so we accept it.
_Gemini31Size = Literal[_GeminiSize, "1:4", "4:1", "1:8", "8:1"]
# §6.1 / §11.8: the task page lists 4 languages, LLMS (later) 10; we take the 10.
_Language = Literal["en", "zh", "ja", "ko", "ru", "fr", "de", "id", "pt", "es"]

_DATA_URI = re.compile(
    r"data:image/(?:png|jpeg|jpg|webp|gif);base64,[A-Za-z0-9+/_-]+=*", re.IGNORECASE
)
_BAD_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")
_SHOW_LIMIT = 60

# -- small helpers ----------------------------------------------------------------------


def _rule(field: str, message: str) -> PydanticCustomError:
    """A validation error that names its own *field* (model-level checks have no loc)."""
    return PydanticCustomError("apimart_rule", "{message}", {"field": field, "message": message})


def _show(value: object) -> str:
    """A short repr for messages: huge data URIs and image bytes are not echoed."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(cast('bytes', value))} bytes>"
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 1] + "…"


def _show_typed(value: object) -> str:
    return f"{_show(value)} of type {type(value).__name__}"


def _is_http_url(text: str) -> bool:
    if _BAD_URL_CHARS.search(text) or not _encodable(text):
        return False
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _is_data_uri(text: str) -> bool:
    return text[:5].lower() == "data:"


def _image_entry(value: object) -> object:
    """Normalise and check one ``image_urls`` entry (syntax only; the model checks policy)."""
    original: object = value
    if isinstance(value, str):
        if _is_data_uri(value):
            if _DATA_URI.fullmatch(value) is None:
                raise PydanticCustomError(
                    "apimart_image",
                    "{message}",
                    {
                        "message": f"{_show(value)} is not a valid image data URI; expected "
                        "'data:image/<png|jpeg|jpg|webp|gif>;base64,<payload>'"
                    },
                )
            return value
        if _is_http_url(value):
            return value
        raise PydanticCustomError("apimart_image", "{message}", {"message": _not_a_url(value)})
    if isinstance(value, PathLike):
        path = fspath(cast("PathLike[str] | PathLike[bytes]", value))
        if isinstance(path, str):
            return Path(path)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(cast("bytes", value))
        if not data:
            raise PydanticCustomError(
                "apimart_image", "{message}", {"message": "is empty bytes, not an image"}
            )
        return data
    raise PydanticCustomError(
        "apimart_image",
        "{message}",
        {
            "message": "must be an http(s) URL string, a pathlib.Path or bytes "
            f"(got {_show_typed(original)})"
        },
    )


def _not_a_url(text: str) -> str:
    """Why *text* cannot be sent, and what to pass instead."""
    shown = _show(text)
    try:
        parts = urlsplit(text)
    except ValueError:
        parts = None
    if parts is not None and parts.scheme.lower() == "file":
        local = unquote(parts.path) or text
        return (
            f"{shown} is a file:// URL; the service cannot read your disk: pass "
            f"Path({local!r}) to generate() to upload it first"
        )
    if parts is not None and parts.scheme.lower() in ("http", "https"):
        return f"{shown} is not a valid http(s) URL (it needs a host and no spaces)"
    if parts is not None and len(parts.scheme) > 1 and "/" not in text.split(":", 1)[0]:
        return (
            f"{shown} is not an http(s) URL (scheme {parts.scheme!r}); upload the image "
            "first, or pass Path(...) or bytes to generate()"
        )
    return (
        f"{shown} is not an http(s) URL or a data URI; to send a local file pass "
        f"Path({text!r}) to generate(), which uploads it first"
        if len(text) <= _SHOW_LIMIT
        else f"{shown} is not an http(s) URL or a data URI; to send a local file pass "
        "Path(...) to generate(), which uploads it first"
    )


def _json_problem(value: object, where: str, depth: int = 0) -> tuple[str, str] | None:
    """``(where, why)`` if *value* is not plain JSON, else ``None``; guards RawRequest."""
    if depth > 32:
        return where, "is nested too deeply"
    if value is None or isinstance(value, (bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, f"{value!r} is not valid JSON")
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return where, "contains a lone surrogate, which cannot be sent as UTF-8"
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(cast("Sequence[object]", value)):
            problem = _json_problem(item, f"{where}[{i}]", depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, Mapping):
        for key, item in cast("Mapping[object, object]", value).items():
            if not isinstance(key, str):
                return where, f"keys must be strings (got {_show_typed(key)})"
            problem = _json_problem(item, f"{where}.{key}", depth + 1)
            if problem:
                return problem
        return None
    return (
        where,
        f"a value of type {type(value).__name__} is not JSON (use str, int, float, bool, list, dict)",
    )


def _json_copy(value: object) -> object:
    """A fresh JSON-shaped copy (tuples become lists), so the body never aliases the model."""
    if isinstance(value, (list, tuple)):
        return [_json_copy(v) for v in cast("Sequence[object]", value)]
    if isinstance(value, Mapping):
        return {k: _json_copy(v) for k, v in cast("Mapping[str, object]", value).items()}
    return value


_ImageEntry = Annotated[ImageRef, BeforeValidator(_image_entry)]
_R = TypeVar("_R", bound="BaseImageRequest")


# -- rules summary ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelRules:
    """What a request class accepts, for tables (``apimart models``) and tooling.

    Empty *sizes*/*resolutions* mean the field does not exist (or, for ``RawRequest``,
    is not checked); *n_range* ``None`` means no ``n`` field; *max_images* ``None``
    means no local limit. *extra_fields* are the model-specific optional fields beyond
    ``size``, ``resolution``, ``n`` and the common ones.
    """

    models: tuple[str, ...]
    sizes: tuple[str, ...]
    resolutions: tuple[str, ...]
    n_range: tuple[int, int] | None
    max_images: int | None
    data_uris: bool
    max_prompt_chars: int | None
    extra_fields: tuple[str, ...]
    validated: bool = True
    notes: str = ""


@dataclass(frozen=True, slots=True)
class _Facts:
    """Introspected once per class: Literal value sets and integer bounds per field."""

    allowed: Mapping[str, tuple[Any, ...]]
    bounds: Mapping[str, tuple[int | None, int | None]]
    fields: tuple[str, ...]


_COMMON_FIELDS = frozenset(
    {"model", "prompt", "image_urls", "webhook", "language", "size", "resolution", "n"}
)
_FACTS: dict[type[BaseModel], _Facts] = {}
_RULES: dict[type[BaseModel], ModelRules] = {}


def _literal_values(annotation: object) -> tuple[Any, ...]:
    origin = get_origin(annotation)
    if origin is Literal:
        return get_args(annotation)
    if origin is Annotated:
        return _literal_values(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        found: list[Any] = []
        for arg in get_args(annotation):
            found.extend(_literal_values(arg))
        return tuple(found)
    return ()


def _facts(cls: type[BaseModel]) -> _Facts:
    facts = _FACTS.get(cls)
    if facts is None:
        allowed: dict[str, tuple[Any, ...]] = {}
        bounds: dict[str, tuple[int | None, int | None]] = {}
        for name, info in cls.model_fields.items():
            values = _literal_values(info.annotation)
            if values:
                allowed[name] = values
            lo = hi = None
            for meta in info.metadata:
                lo = getattr(meta, "ge", lo)
                hi = getattr(meta, "le", hi)
            if lo is not None or hi is not None:
                bounds[name] = (lo, hi)
        facts = _FACTS[cls] = _Facts(allowed, bounds, tuple(sorted(cls.model_fields)))
    return facts


# -- the models ---------------------------------------------------------------------------


if TYPE_CHECKING:
    from pydantic._internal._model_construction import ModelMetaclass as _PydanticMeta
else:
    _PydanticMeta = type(BaseModel)  # the same class, reached without a private import


class _RequestMeta(_PydanticMeta):
    """Built directly (``Gemini3ProImageRequest(n=5)``), a model fails with the same
    ``InvalidRequestError`` as ``parse_request``, not pydantic's raw error.

    On the metaclass, so that type checkers keep pydantic's typed, per-field
    constructor. (``model_validate*`` are converted by ``BaseImageRequest``.)
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise _convert(cast("type[BaseModel]", cls), kwargs.get("model"), exc) from exc


class BaseImageRequest(BaseModel, metaclass=_RequestMeta):
    """Fields and checks every image model shares; use a subclass or ``parse_request``.

    Instances are frozen and validated on creation. ``image_urls`` accepts a list or
    tuple (stored as a tuple; empty means none) of http(s) URLs, data URIs (models that
    allow them), ``pathlib.Path`` or ``bytes``; local entries count toward the model's
    image limit and are uploaded by ``generate``, while ``to_body`` (``submit``)
    refuses them. ``webhook`` and ``language`` are the optional top-level fields every
    model takes (§3.1, §6.4).
    """

    # Schemas are built on first use, not at import (a fraction of a millisecond each
    # then, instead of tens of milliseconds for every program that imports us).
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    _max_images: ClassVar[int | None] = None
    _data_uris: ClassVar[bool] = True
    _max_prompt_chars: ClassVar[int | None] = None
    _notes: ClassVar[str] = ""

    model: str
    prompt: str = Field(strict=True)
    # Typed as a Sequence so a list type-checks; stored as a tuple (the model is frozen).
    image_urls: Sequence[_ImageEntry] | None = None
    webhook: str | None = Field(default=None, strict=True)
    language: _Language | None = None

    if not TYPE_CHECKING:  # type checkers keep pydantic's signatures

        @classmethod
        def model_validate(cls, obj, *args, **kwargs):
            try:
                return super().model_validate(obj, *args, **kwargs)
            except ValidationError as exc:
                model = obj.get("model") if isinstance(obj, Mapping) else None
                raise _convert(cls, model, exc) from exc

        @classmethod
        def model_validate_json(cls, json_data, *args, **kwargs):
            try:
                return super().model_validate_json(json_data, *args, **kwargs)
            except ValidationError as exc:
                raise _convert(cls, None, exc) from exc

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str) -> str:
        if not value.strip():
            raise _rule("prompt", "must not be empty")
        limit = cls._max_prompt_chars
        if limit is not None and len(value) > limit:
            raise _rule("prompt", f"must be at most {limit} characters (got {len(value)})")
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise _rule(
                    "prompt", "contains a lone surrogate, which cannot be sent as UTF-8"
                ) from None
        return value

    @field_validator("image_urls", mode="before")
    @classmethod
    def _check_image_list(cls, value: object) -> object:
        if value is None:
            return None
        kind = type(value).__name__
        if isinstance(value, (str, bytes, bytearray, memoryview, PathLike)):
            raise _rule(
                "image_urls", f"must be a list of images, not a single {kind}; wrap it: [...]"
            )
        if not isinstance(value, (list, tuple)):
            raise _rule(
                "image_urls",
                f"must be a list or tuple of URLs, Paths or bytes (got {_show_typed(value)})",
            )
        return tuple(cast("Sequence[object]", value)) or None

    @field_validator("webhook")
    @classmethod
    def _check_webhook(cls, value: str | None) -> str | None:
        # The service silently drops a webhook it will not call (§6.4), so refuse one
        # it cannot reach here, with the reason (the rules live in _webhook_url).
        if value is None:
            return None
        # Imported here: most requests carry no webhook, and the rules cost an import.
        from ._webhook_url import webhook_url_problem

        problem = webhook_url_problem(value)
        if problem is not None:
            raise _rule("webhook", problem)
        return value

    @model_validator(mode="after")
    def _check_model_rules(self) -> Self:
        cls = type(self)
        images = self.image_urls or ()
        limit = cls._max_images
        if limit is not None and len(images) > limit:
            count = f"{len(images)} image{'s' if len(images) != 1 else ''}"
            if limit == 0:
                message = f"not accepted: this model is text-to-image only (got {count})"
            else:
                message = (
                    f"at most {limit} reference image{'s' if limit != 1 else ''} "
                    f"(got {count}; Path and bytes entries count too)"
                )
            raise _rule("image_urls", message)
        if not cls._data_uris:
            for i, entry in enumerate(images):
                if isinstance(entry, str) and _is_data_uri(entry):
                    raise _rule(
                        f"image_urls[{i}]",
                        "data URIs are not accepted by this model; pass the image as "
                        "Path(...) or bytes to generate() (it is uploaded first), or upload "
                        "it with client.upload_image() and pass its URL",
                    )
        self._check_fields()
        return self

    def _check_fields(self) -> None:
        """Cross-field rules of a model family; raise ``_rule(field, message)``."""

    # -- public API -------------------------------------------------------------------

    def to_body(self) -> dict[str, Any]:
        """The JSON body for ``POST /v1/images/generations``.

        Only the fields the caller set (and not ``None``) are included, so the service
        applies its own defaults; ``image_urls`` is a list of plain strings and ``n``
        a JSON integer. Raises ``InvalidRequestError`` if an image entry is still a
        ``Path`` or ``bytes``: ``submit`` sends URLs only; ``generate`` uploads first.
        """
        body: dict[str, Any] = {}
        given = self.__pydantic_fields_set__
        for name in type(self).model_fields:
            if name in given:
                value = getattr(self, name)
                if value is None:
                    continue
                if name == "image_urls":
                    value = self._url_list(value)
                body[name] = value
        extra = self.__pydantic_extra__
        if extra:
            for key, value in extra.items():
                if value is not None:
                    body[key] = _json_copy(value)
        return body

    def image_count(self) -> int:
        """How many images the request asks for (``n``, else 1): what a budget counts."""
        n = getattr(self, "n", None)
        if n is None and self.__pydantic_extra__:
            n = self.__pydantic_extra__.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1

    def local_images(self) -> list[tuple[int, Path | bytes]]:
        """``(position, source)`` of every entry that must be uploaded before submit."""
        return [
            (i, entry)
            for i, entry in enumerate(self.image_urls or ())
            if not isinstance(entry, str)
        ]

    def with_image_urls(self, urls: Sequence[str]) -> Self:
        """A re-validated copy whose ``image_urls`` are *urls* (same count as before).

        Used after uploading the local entries; raises ``InvalidRequestError`` if the
        count differs or a URL is not acceptable for the model.
        """
        before = len(self.image_urls or ())
        if isinstance(urls, (str, bytes)) or len(urls) != before:
            got = "a single string" if isinstance(urls, (str, bytes)) else f"{len(urls)}"
            message = f"with_image_urls needs {before} URL(s), one per entry (got {got})"
            raise InvalidRequestError(
                f"{self.model}: image_urls: {message}",
                model=self.model,
                errors=[("image_urls", message)],
            )
        data = self._given()
        data["image_urls"] = list(urls)
        return _validate(type(self), data, self.model)

    def _with_uploaded(self, urls: Sequence[str]) -> Self:
        """A copy whose local entries became *urls* (our own uploads' URLs), unchecked.

        The engine's fast path: the count and the model's rules cannot change by
        replacing a local image with the URL the upload returned (``parse_upload``
        has already refused anything but a clean http(s) URL).
        """
        return self.model_copy(update={"image_urls": tuple(urls)})

    @classmethod
    def rules(cls) -> ModelRules:
        """A frozen summary of what this class accepts (model ids, value sets, limits)."""
        rules = _RULES.get(cls)
        if rules is None:
            facts = _facts(cls)
            bounds = facts.bounds.get("n")
            n_range = None
            if bounds is not None or "n" in cls.model_fields:
                lo, hi = bounds or (None, None)
                n_range = (lo or 1, hi) if hi is not None else None
            rules = _RULES[cls] = ModelRules(
                models=tuple(str(v) for v in facts.allowed.get("model", ())),
                sizes=tuple(str(v) for v in facts.allowed.get("size", ())),
                resolutions=tuple(str(v) for v in facts.allowed.get("resolution", ())),
                n_range=n_range,
                max_images=cls._max_images,
                data_uris=cls._data_uris,
                max_prompt_chars=cls._max_prompt_chars,
                extra_fields=tuple(n for n in cls.model_fields if n not in _COMMON_FIELDS),
                notes=cls._notes,
            )
        return rules

    # -- internals --------------------------------------------------------------------

    def _given(self) -> dict[str, Any]:
        """The fields the caller set, plus extras: what a re-validation must see."""
        data = {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name in self.__pydantic_fields_set__
        }
        if self.__pydantic_extra__:
            data.update(self.__pydantic_extra__)
        return data

    def _url_list(self, entries: Sequence[ImageRef]) -> list[str]:
        urls: list[str] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, str):
                what = (
                    f"a local file (Path({str(entry)!r}))"
                    if isinstance(entry, Path)
                    else f"local image bytes ({len(entry)} bytes)"
                )
                message = (
                    f"is {what}; submit() sends URLs only: call generate(), which uploads "
                    "local images first, or upload it with client.upload_image() and pass "
                    "its .url"
                )
                raise InvalidRequestError(
                    f"{self.model}: image_urls[{i}]: {message}",
                    model=self.model,
                    errors=[(f"image_urls[{i}]", message)],
                )
            urls.append(entry)
        return urls


class FluxKontextRequest(BaseImageRequest):
    """``flux-kontext-pro`` / ``flux-kontext-max`` (§4.1): text-to-image or one-image edit.

    At most one reference image, http(s) URL only (no data URIs). ``size`` defaults on
    the service to ``match_input_image`` with an image and ``16:9`` without (see
    ``effective_size``). The page excerpt shows no ``n`` (one image per request);
    ``response_format``, ``safety_tolerance`` and ``prompt_upsampling`` are accepted as
    in the issue spec, though §4.1 could not confirm them (open question #2).
    """

    _max_images = 1
    _data_uris = False
    _notes = "size defaults to match_input_image with an image, 16:9 without"

    model: _FluxId  # pyright: ignore[reportIncompatibleVariableOverride]
    size: _FluxSize | None = None
    response_format: Literal["png", "jpg"] | None = None
    safety_tolerance: int | None = Field(default=None, strict=True, ge=0, le=6)
    prompt_upsampling: bool | None = Field(default=None, strict=True)

    @property
    def effective_size(self) -> str:
        """The size the service will use: ours if set, else its default for the mode."""
        if self.size is not None:
            return self.size
        return "match_input_image" if self.image_urls else "16:9"


class Imagen4Request(BaseImageRequest):
    """``imagen-4.0-apimart`` (§4.2): text-to-image only, one image, no ``resolution``.

    Any reference image is an error here (the service errors too, §5). An unsupported
    ratio is an error here, where the service would silently fall back to 16:9. Note
    that §4.2 reports the model as possibly delisted (open question #3).
    """

    _max_images = 0
    _data_uris = False
    _notes = "text-to-image only; size defaults to 16:9; availability doubtful (§4.2)"

    model: _ImagenId  # pyright: ignore[reportIncompatibleVariableOverride]
    n: int | None = Field(default=None, strict=True, ge=1, le=1)
    size: _ImagenSize | None = None

    @property
    def effective_size(self) -> str:
        """The size the service will use: ours if set, else its default ``16:9``."""
        return self.size if self.size is not None else "16:9"


class _GeminiRequest(BaseImageRequest):
    """What the three Gemini families share: n 1-4, 14 references, data URIs, fallback."""

    # §4.3 newer copy / §11.6: n 1-4 and 14 references (the older copy says n=1 and 5
    # references); §4.4 / open question #6 says the same for 2.5-flash. Data URIs are
    # accepted per the Gemini pages (§4.6), though the upload page says base64 is no
    # longer supported (§11.5): uploading stays the safer path.
    _max_images = 14
    _data_uris = True

    n: int | None = Field(default=None, strict=True, ge=1, le=4)
    official_fallback: bool | None = Field(default=None, strict=True)

    def _check_fields(self) -> None:
        # §4.3/§4.5: "not allowed with the -official model"; §4.4 does not say, but a
        # fallback to the official channel means nothing when already on it.
        if self.official_fallback is not None and self.model.endswith("-official"):
            raise _rule(
                "official_fallback",
                f"not allowed with {self.model} (it already is the official channel); "
                f"drop it, or use {self.model.removesuffix('-official')!r}",
            )


class Gemini3ProImageRequest(_GeminiRequest):
    """``gemini-3-pro-image-preview`` (Nano Banana Pro) and its ``-official`` sibling (§4.3)."""

    model: _Gemini3ProId  # pyright: ignore[reportIncompatibleVariableOverride]
    size: _GeminiSize | None = None
    resolution: Literal["1K", "2K", "4K"] | None = None


class Gemini25FlashImageRequest(_GeminiRequest):
    """``gemini-2.5-flash-image-preview`` (Nano Banana) and its ``-official`` sibling (§4.4).

    Resolution is 1K only and the prompt is at most 1000 characters.
    """

    _max_prompt_chars = 1000

    model: _Gemini25FlashId  # pyright: ignore[reportIncompatibleVariableOverride]
    size: _GeminiSize | None = None
    resolution: Literal["1K"] | None = None


class Gemini31FlashImageRequest(_GeminiRequest):
    """``gemini-3.1-flash-image-preview`` (Nano Banana 2) and its ``-official`` sibling (§4.5).

    Adds extreme ratios (1:4 … 8:1), a 0.5K tier, and search grounding:
    ``google_image_search`` needs ``google_search=True``.
    """

    model: _Gemini31FlashId  # pyright: ignore[reportIncompatibleVariableOverride]
    size: _Gemini31Size | None = None
    resolution: Literal["0.5K", "1K", "2K", "4K"] | None = None
    google_search: bool | None = Field(default=None, strict=True)
    google_image_search: bool | None = Field(default=None, strict=True)

    def _check_fields(self) -> None:
        super()._check_fields()
        if self.google_image_search and self.google_search is not True:
            raise _rule("google_image_search", "requires google_search=True")


class RawRequest(BaseImageRequest):
    """The escape hatch: any model id, any extra fields, sent without per-model rules.

    APIMart adds models often; ``RawRequest(model="new-model", prompt="...", foo=1)``
    (or ``allow_unknown=True``) sends them. It is also the way to send a field our
    rules do not know for a known model (e.g. ``mask_url``). Still checked: the prompt
    is not empty, image entries are http(s) URLs, data URIs, ``Path`` or ``bytes``,
    ``n`` is a positive JSON integer, and extra values are plain JSON.
    """

    model_config = ConfigDict(extra="allow", defer_build=True)
    _notes = "no local rules: fields are sent as given"

    n: int | None = Field(default=None, strict=True, ge=1)

    if TYPE_CHECKING:
        # For type checkers only, so they accept the extra keyword fields this class
        # exists for; at runtime pydantic's own __init__ validates (a real override
        # would make pydantic route every validation through it).
        def __init__(self, **fields: Any) -> None: ...

    @field_validator("model", mode="before")
    @classmethod
    def _check_model_id(cls, value: object) -> object:
        if not isinstance(value, str) or not value.strip():
            raise _rule("model", f"must be a non-empty string (got {_show_typed(value)})")
        return value

    def _check_fields(self) -> None:
        for key, value in (self.__pydantic_extra__ or {}).items():
            problem = _json_problem(value, key)
            if problem:
                raise _rule(*problem)

    @classmethod
    def rules(cls) -> ModelRules:
        """No local rules: any model id, sizes and fields; no image limit."""
        rules = _RULES.get(cls)
        if rules is None:
            rules = _RULES[cls] = ModelRules(
                models=(),
                sizes=(),
                resolutions=(),
                n_range=None,
                max_images=None,
                data_uris=True,
                max_prompt_chars=None,
                extra_fields=(),
                validated=False,
                notes=cls._notes,
            )
        return rules


ImageRequest = Annotated[
    FluxKontextRequest
    | Imagen4Request
    | Gemini3ProImageRequest
    | Gemini25FlashImageRequest
    | Gemini31FlashImageRequest,
    Field(discriminator="model"),
]
"""Any known-model request, discriminated on ``model`` (e.g. for ``TypeAdapter``)."""

_FAMILIES: tuple[type[BaseImageRequest], ...] = (
    FluxKontextRequest,
    Imagen4Request,
    Gemini3ProImageRequest,
    Gemini25FlashImageRequest,
    Gemini31FlashImageRequest,
)

MODELS: Mapping[str, type[BaseImageRequest]] = MappingProxyType(
    {model: cls for cls in _FAMILIES for model in cls.rules().models}
)
"""Model id -> request class, read-only. Ids not listed need ``allow_unknown=True``."""


def known_models() -> tuple[str, ...]:
    """Every model id with local rules, in registry order."""
    return tuple(MODELS)


# -- parsing ------------------------------------------------------------------------------


def parse_request(
    request: BaseImageRequest | Mapping[str, Any] | None = None,
    /,
    *,
    allow_unknown: bool = False,
    **params: Any,
) -> BaseImageRequest:
    """Validate a request given as a model instance, a mapping and/or keyword arguments.

    - an instance alone is returned unchanged (it was validated when built);
    - an instance plus *params* re-validates the merge (*params* win);
    - a mapping (with *params* merged over it) or *params* alone is validated by the
      class ``MODELS[model]``; with ``allow_unknown=True`` an unknown id becomes a
      ``RawRequest`` (sent unvalidated). A ``RawRequest`` instance stays raw.

    Raises ``InvalidRequestError`` (one line per problem, naming model, field and the
    allowed values; ``.errors`` lists ``(field, message)``), or ``UnknownModelError``
    for an id with no rules. Nothing here does I/O.
    """
    given: object = request  # callers without type checking may pass anything
    if isinstance(request, BaseImageRequest):
        if not params:
            return request
        data = request._given()
        data.update(params)
        if isinstance(request, RawRequest):
            return _validate(RawRequest, data, data.get("model"))
    elif request is None:
        data = dict(params)
    elif isinstance(given, Mapping):
        data = dict(given)
        data.update(params)
    else:
        message = (
            "must be a request model from apimart_async.models, a mapping, or keyword "
            f"arguments (got {type(given).__name__})"
        )
        raise InvalidRequestError(f"request: {message}", errors=[("request", message)])

    model = data.get("model")
    if model is None:
        message = f"is required; known models: {', '.join(MODELS)}"
        raise InvalidRequestError(f"model: {message}", errors=[("model", message)])
    if not isinstance(model, str):
        message = f"must be a string (got {_show_typed(model)})"
        raise InvalidRequestError(f"model: {message}", errors=[("model", message)])
    cls = MODELS.get(model)
    if cls is None:
        if not allow_unknown:
            raise _unknown_model(model)
        cls = RawRequest
    return _validate(cls, data, model)


def _close_matches(word: str, options: Sequence[str], n: int, cutoff: float = 0.6) -> list[str]:
    from difflib import get_close_matches  # only ever needed for an error message

    return get_close_matches(word, options, n=n, cutoff=cutoff)


def _unknown_model(model: str) -> UnknownModelError:
    close = _close_matches(model.strip().lower(), list(MODELS), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    message = (
        f"unknown model {_show(model)}{hint}; known models: {', '.join(MODELS)}. APIMart "
        "adds models often: pass allow_unknown=True, or use RawRequest(model=..., ...), "
        "to send it without local validation"
    )
    return UnknownModelError(message, model=model, errors=[("model", message)])


def _validate(cls: type[_R], data: Mapping[str, Any], model: object) -> _R:
    """``cls.model_validate(data)``, with pydantic's errors turned into ours."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise _convert(cls, model, exc) from exc


def _convert(cls: type[BaseModel], model: object, exc: ValidationError) -> InvalidRequestError:
    model_id = model if isinstance(model, str) else cls.__name__
    problems: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        problem = _describe(cls, model_id, err)
        if problem not in problems:
            problems.append(problem)
    lines = [f"{model_id}: {field}: {message}" for field, message in problems]
    return InvalidRequestError("\n".join(lines), model=model_id, errors=problems)


def _loc_text(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _describe(cls: type[BaseModel], model_id: str, err: ErrorDetails) -> tuple[str, str]:
    """``(field, message)`` for one pydantic error, in our words."""
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    loc = err["loc"]
    field = str(ctx.get("field") or _loc_text(loc) or "request")
    name = loc[0] if loc and isinstance(loc[0], str) else None
    kind = err["type"]
    value = err.get("input")
    facts = _facts(cls)

    if kind in ("apimart_rule", "apimart_image"):
        return field, str(ctx["message"])
    if kind == "literal_error":
        allowed = facts.allowed.get(name or "", ())
        listed = ", ".join(repr(v) for v in allowed) or str(ctx.get("expected", "?"))
        message = f"must be one of {listed} (got {_show(value)})"
        if isinstance(value, str):
            folded = {str(v).lower(): v for v in allowed}
            match = folded.get(value.strip().lower())
            if match is not None:
                message += f"; did you mean {match!r}?"
        return field, message
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return field, f"must be a JSON integer, not a string or bool (got {_show_typed(value)})"
    if kind in ("bool_type", "bool_parsing"):
        return field, f"must be true or false (got {_show_typed(value)})"
    if kind in ("string_type", "string_sub_type"):
        return field, f"must be a string (got {_show_typed(value)})"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        lo, hi = facts.bounds.get(name or "", (ctx.get("ge"), ctx.get("le")))
        if lo is not None and lo == hi:
            return field, f"must be {lo} (got {_show(value)})"
        if lo is not None and hi is not None:
            return field, f"must be between {lo} and {hi} (got {_show(value)})"
        bound = f">= {lo}" if lo is not None else f"<= {hi}"
        return field, f"must be {bound} (got {_show(value)})"
    if kind == "string_too_long":
        size = len(value) if isinstance(value, str) else "?"
        return field, f"must be at most {ctx.get('max_length')} characters (got {size})"
    if kind == "extra_forbidden":
        close = _close_matches(str(name), facts.fields, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return field, (
            f"unknown field for {model_id}; {hint}allowed fields: {', '.join(facts.fields)} "
            "(RawRequest sends other fields unvalidated)"
        )
    if kind == "missing":
        return field, "is required"
    if kind == "invalid_key":
        return "request", f"field names must be strings (got {_show_typed(value)})"
    message = err["msg"]
    return field, message.removeprefix("Value error, ")
