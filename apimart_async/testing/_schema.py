"""``GET /v1/model-schema``: what the fake says each known model accepts.

The endpoint exists on the real service (apimart-api.md §1) and the official skill
client (``apimart-ai/apimart-skills``, ``scripts/apimart-media.mjs``) calls it before
every submit: it needs a JSON object with string ``model`` and ``operation`` and an
object ``input_schema``, and compares ``operation`` with the one it wants; its tool
contract also names ``endpoint``, ``schema_version``, ``idempotency`` and
``response_contract``. The input schema is JSON Schema (draft 2020-12) for the body
minus ``model`` (that client passes ``model`` separately).

The field lists, allowed values and limits are our own reading of §4 (the newer copy of
each model page, with the wider value set where copies disagree); they are written out
here, independently of the client's request models, so that a disagreement between the
two shows up in tests instead of being copied from one into the other.

What can go wrong: an unknown model or operation, or a missing ``model`` parameter, is
answered with the service's error envelope by the app (400 or 404); this module only
returns ``None`` for a model it does not describe.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OPERATION", "RESPONSE_VERSION", "describes", "model_schema"]

OPERATION = "image_generation"
RESPONSE_VERSION = "2026-07-27"
_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_GEMINI_SIZES = ("auto", "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")


def _string(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _enum(values: tuple[str, ...], description: str, default: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string", "enum": list(values), "description": description}
    if default is not None:
        out["default"] = default
    return out


def _n(maximum: int) -> dict[str, Any]:
    return {
        "type": "integer",
        "minimum": 1,
        "maximum": maximum,
        "default": 1,
        "description": "number of images; a JSON number, never a string",
    }


def _images(max_items: int, *, data_uris: bool) -> dict[str, Any]:
    what = "public http(s) URLs" + (
        " or data URIs (data:image/<fmt>;base64,...)" if data_uris else " (no base64)"
    )
    return {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "maxItems": max_items,
        "description": f"reference images: {what}; upload local files first",
    }


def _fallback() -> dict[str, Any]:
    return {
        "type": "boolean",
        "default": False,
        "description": "fall back to the official channel when the default one fails",
    }


_PROMPT = _string("what to generate or change", minLength=1)
_WEBHOOK = _string(
    "public http(s) base URL on port 80/443; the task is POSTed to <webhook>/callback "
    "when it completes or fails",
    format="uri",
)
_LANGUAGE = _enum(
    ("en", "zh", "ja", "ko", "ru", "fr", "de", "id", "pt", "es"),
    "language of error messages",
    "en",
)

# Model-specific properties, by model id without the -official suffix (§4.1-§4.5).
_PROPERTIES: dict[str, dict[str, dict[str, Any]]] = {
    "flux-kontext": {
        "image_urls": _images(1, data_uris=False),
        "size": _enum(
            (
                "match_input_image",
                "auto",
                "1:1",
                "4:3",
                "3:4",
                "16:9",
                "9:16",
                "3:2",
                "2:3",
                "21:9",
                "9:21",
            ),
            "aspect ratio; defaults to match_input_image with an image, 16:9 without",
            None,
        ),
    },
    "imagen-4.0-apimart": {
        "n": _n(1),
        "size": _enum(
            ("1:1", "4:3", "3:4", "16:9", "9:16"),
            "aspect ratio; other values silently fall back to 16:9",
            "16:9",
        ),
    },
    "gemini-3-pro-image-preview": {
        "n": _n(4),
        "size": _enum(_GEMINI_SIZES, "aspect ratio; auto picks 1:1 or 16:9", "auto"),
        "resolution": _enum(("1K", "2K", "4K"), "output resolution", "1K"),
        "image_urls": _images(14, data_uris=True),
        "official_fallback": _fallback(),
    },
    "gemini-2.5-flash-image-preview": {
        "n": _n(4),
        "size": _enum(_GEMINI_SIZES, "aspect ratio; auto picks 1:1 or 16:9", "auto"),
        "resolution": _enum(("1K",), "output resolution", "1K"),
        "image_urls": _images(14, data_uris=True),
        "official_fallback": _fallback(),
    },
    "gemini-3.1-flash-image-preview": {
        "n": _n(4),
        "size": _enum((*_GEMINI_SIZES, "1:4", "4:1", "1:8", "8:1"), "aspect ratio", "1:1"),
        "resolution": _enum(
            ("0.5K", "1K", "2K", "4K"), "output resolution (the price differs by tier)", "1K"
        ),
        "image_urls": _images(14, data_uris=True),
        "official_fallback": _fallback(),
        "google_search": {"type": "boolean", "default": False, "description": "web grounding"},
        "google_image_search": {
            "type": "boolean",
            "default": False,
            "description": "image search grounding; needs google_search: true",
        },
    },
}
_PROMPT_LIMITS = {"gemini-2.5-flash-image-preview": 1000}


def _family_key(model: str) -> str | None:
    base = model.removesuffix("-official")
    if base in ("flux-kontext-pro", "flux-kontext-max") and base == model:
        return "flux-kontext"
    if base == "imagen-4.0-apimart" and base == model:
        return base
    if base.startswith("gemini-") and base in _PROPERTIES:
        return base
    return None


def model_schema(model: str, *, generic_n: int, generic_images: int) -> dict[str, Any]:
    """The schema document for *model*; an undescribed (but accepted) model gets a
    permissive one whose ``n`` and ``image_urls`` limits are the given ones."""
    key = _family_key(model)
    prompt = dict(_PROMPT)
    if key is None:
        specific: dict[str, dict[str, Any]] = {
            "n": _n(generic_n),
            "image_urls": _images(generic_images, data_uris=True),
        }
        closed = False
    else:
        specific = dict(_PROPERTIES[key])
        if model.endswith("-official"):
            # §4.3/§4.5: official_fallback is not allowed with the -official model.
            specific.pop("official_fallback", None)
        closed = True
        limit = _PROMPT_LIMITS.get(key)
        if limit is not None:
            prompt["maxLength"] = limit
    properties = {"prompt": prompt, **specific, "webhook": _WEBHOOK, "language": _LANGUAGE}
    return {
        "object": "model.schema",
        "model": model,
        "operation": OPERATION,
        "endpoint": "/v1/images/generations",
        "method": "POST",
        "schema_version": RESPONSE_VERSION,
        "response_contract": RESPONSE_VERSION,
        "idempotency": {
            "header": "Idempotency-Key",
            "supported": True,
            "key_pattern": "^[!-~]{1,191}$",
        },
        "input_schema": {
            "$schema": _SCHEMA_DIALECT,
            "type": "object",
            "required": ["prompt"],
            "properties": properties,
            "additionalProperties": not closed,
        },
    }


def describes(model: str) -> bool:
    """Whether *model* has its own schema here (not the permissive fallback)."""
    return _family_key(model) is not None
