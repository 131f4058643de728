"""``apimart models``: what each model accepts, readable wherever it is printed.

Three forms of the same facts (the library's local validation rules, one entry per
model id, in the library's order):

* on a terminal, one block per model, its values wrapped to the terminal's width
  (``COLUMNS``, else the terminal's own, never below 40);
* when stdout is not a terminal (a pipe, a file), one tab-separated line per model
  under a header line, lists joined with commas: ``cut``, ``awk`` and ``sort`` work;
* ``--json``: a list of objects with a fixed set of keys (``JSON_KEYS``), whatever the
  library adds later.

Notes are the library's, without its references into the API research notes (``§4.2``),
which mean nothing to a reader of the command's output.
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from typing import TYPE_CHECKING, Any

from apimart_async.models import MODELS

if TYPE_CHECKING:
    import argparse

    from apimart_async.models import ModelRules

    from ._setup import Runtime
    from ._ui import Ui

__all__ = ["JSON_KEYS", "TSV_HEADER", "cmd_models", "model_entries"]

JSON_KEYS = (
    "model",
    "sizes",
    "resolutions",
    "n_range",
    "max_images",
    "data_uris",
    "max_prompt_chars",
    "extra_fields",
    "notes",
)
"""The keys of every ``--json`` object, in order."""
TSV_HEADER = (
    "model",
    "sizes",
    "resolutions",
    "n",
    "max_images",
    "data_uris",
    "max_prompt_chars",
    "other_fields",
    "notes",
)
_REFERENCE = re.compile(r"\s*\(?§\s*[\d.]*\d\)?")
_LABEL = 13
_MIN_WIDTH = 40
_MAX_WIDTH = 100
FOOTER = (
    "Other model ids: --allow-unknown-models (generate, batch) sends them without local validation."
)


def _clean(note: str) -> str:
    return " ".join(_REFERENCE.sub("", note).split()).strip(" ;,")


def model_entries() -> list[dict[str, Any]]:
    """One ``JSON_KEYS`` object per model id."""
    entries: list[dict[str, Any]] = []
    for model, cls in MODELS.items():
        rules: ModelRules = cls.rules()
        entries.append(
            {
                "model": model,
                "sizes": list(rules.sizes),
                "resolutions": list(rules.resolutions),
                "n_range": list(rules.n_range) if rules.n_range is not None else None,
                "max_images": rules.max_images,
                "data_uris": rules.data_uris,
                "max_prompt_chars": rules.max_prompt_chars,
                "extra_fields": list(rules.extra_fields),
                "notes": _clean(rules.notes),
            }
        )
    return entries


def _n(entry: dict[str, Any], *, none: str = "-") -> str:
    n_range = entry["n_range"]
    if n_range is None:
        return none
    low, high = n_range
    return str(low) if low == high else f"{low}-{high}"


def _images(entry: dict[str, Any]) -> str:
    limit = entry["max_images"]
    if limit == 0:
        return "none (text to image only)"
    count = "any number" if limit is None else f"up to {limit}"
    kinds = "URLs, local files (uploaded first)"
    kinds += ", data URIs" if entry["data_uris"] else "; no data URIs"
    return f"{count}: {kinds}"


def _block(entry: dict[str, Any], width: int) -> list[str]:
    rows = [
        ("size", ", ".join(entry["sizes"]) or "-"),
        ("resolution", ", ".join(entry["resolutions"]) or "-"),
        ("n", _n(entry, none="1 (no n field)")),
        ("images", _images(entry)),
    ]
    if entry["max_prompt_chars"] is not None:
        rows.append(("prompt", f"at most {entry['max_prompt_chars']} characters"))
    if entry["extra_fields"]:
        rows.append(("other fields", ", ".join(entry["extra_fields"])))
    if entry["notes"]:
        rows.append(("notes", entry["notes"]))
    lines = [entry["model"]]
    indent = " " * (2 + _LABEL)
    for label, value in rows:
        lines.extend(
            textwrap.wrap(
                value,
                width=width,
                initial_indent=f"  {label:<{_LABEL}}",
                subsequent_indent=indent,
                break_long_words=True,
                break_on_hyphens=False,
            )
        )
    return lines


def _tsv(entry: dict[str, Any]) -> str:
    def field(values: list[str]) -> str:
        return ",".join(values) or "-"

    limit = entry["max_images"]
    prompt = entry["max_prompt_chars"]
    cells = [
        entry["model"],
        field(entry["sizes"]),
        field(entry["resolutions"]),
        _n(entry),
        "any" if limit is None else str(limit),
        "yes" if entry["data_uris"] else "no",
        "-" if prompt is None else str(prompt),
        field(entry["extra_fields"]),
        entry["notes"] or "-",
    ]
    return "\t".join(cell.replace("\t", " ") for cell in cells)


def cmd_models(args: argparse.Namespace, runtime: Runtime, ui: Ui) -> int:
    """``apimart models [--json]``; see the module docstring."""
    del runtime
    entries = model_entries()
    if args.json:
        ui.result(json.dumps(entries, indent=2))
        return 0
    if not ui.stdout.isatty():
        ui.result("\t".join(TSV_HEADER))
        for entry in entries:
            ui.result(_tsv(entry))
        return 0
    width = min(max(shutil.get_terminal_size().columns, _MIN_WIDTH), _MAX_WIDTH)
    for entry in entries:
        ui.result("\n".join(_block(entry, width)) + "\n")
    ui.result("\n".join(textwrap.wrap(FOOTER, width=width)))
    return 0
