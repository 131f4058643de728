"""``apimart batch --dry-run``: what a batch would submit and cost, before it does.

Every line (of this shard, with ``--shard``) is read and checked exactly as a real run
checks it (``_jobfile``), and stdout gets one line per model, in the order models first
appear::

    gemini-3-pro-image-preview: 12 jobs, 20 images, 2.40 USD at 0.12 USD/image
    flux-kontext-pro: 3 jobs, 3 images
    estimated cost: 2.52 USD

``estimated cost`` (price x images, summed) is printed only when every model has a
``--price``; otherwise stderr says which prices are missing. The whole file is counted:
jobs a real run would skip (done earlier in the folder) are not subtracted, so the
estimate is an upper bound. Invalid lines are listed on stderr, as a real run lists
them.

Nothing is sent but one optional balance read: when a key is configured (or with
``--fake``), the balance is shown next to the estimate; without a key, or when the
read fails, the dry run says so and goes on. The output folder is not touched (no
journal is opened or created).

Exit status 0 (the file was read; invalid lines are skipped by a real run too), or 2
with ``--strict`` when a line is invalid, as the real run would refuse to start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from apimart_async import ApimartError

from ._commands import balance_fields, balance_text
from ._errors import describe
from ._jobfile import JobLine, LineError
from ._setup import ClientOptions, UsageError, make_client

if TYPE_CHECKING:
    from apimart_async import AccountBalance

    from ._batch import BatchSettings
    from ._setup import Runtime
    from ._ui import Ui

__all__ = ["dry_run"]

MAX_LISTED = 50


@dataclass(slots=True)
class _Model:
    jobs: int = 0
    images: int = 0


def dry_run(
    settings: BatchSettings,
    options: ClientOptions,
    runtime: Runtime,
    ui: Ui,
    *,
    backend: str = "asyncio",
) -> int:
    """Check the batch file and report it; return the exit status."""
    models, invalid = _count(settings, ui)
    prices = dict(settings.prices)
    unpriced = [m for m in models if m not in prices]
    estimate = None if unpriced else sum(prices[m] * entry.images for m, entry in models.items())
    balance = _balance(options, runtime, ui, backend=backend)
    if settings.as_json:
        ui.result(json.dumps(_report(settings, models, invalid, prices, estimate, balance)))
    else:
        for model, entry in models.items():
            text = f"{model}: {entry.jobs} job(s), {entry.images} image(s)"
            if model in prices:
                cost = prices[model] * entry.images
                text += f", {cost:.2f} USD at {prices[model]:g} USD/image"
            ui.result(text)
        if invalid:
            ui.result(f"invalid lines: {invalid} (a run skips them)")
        if estimate is not None:
            ui.result(f"estimated cost: {estimate:.2f} USD")
        if balance is not None:
            ui.result(f"balance: {balance_text(balance)}")
    if unpriced:
        shown = ", ".join(unpriced)
        ui.info(f"no estimated cost: no --price for {shown} (add --price MODEL=USD per image)")
    _limits(settings, models, estimate, ui)
    if (
        balance is not None
        and balance.remaining is not None
        and estimate is not None
        and estimate > balance.remaining
    ):
        ui.info(
            f"the balance ({balance.remaining:.2f}) is below the estimate ({estimate:.2f} "
            "USD): a run stops submitting at the first 402 (insufficient balance)"
        )
    if invalid and settings.strict:
        raise UsageError(
            f"{invalid} invalid line{'s' if invalid != 1 else ''} in "
            f"{str(settings.jobs_path)!r}; a run with --strict would submit nothing"
        )
    return 0


def _count(settings: BatchSettings, ui: Ui) -> tuple[dict[str, _Model], int]:
    models: dict[str, _Model] = {}
    invalid = 0
    for item in settings.check_every_line():
        if isinstance(item, LineError):
            invalid += 1
            if invalid <= MAX_LISTED:
                ui.info(str(item))
            continue
        if not isinstance(item, JobLine):  # pragma: no cover - only after a stop
            continue
        request = item.request
        entry = models.setdefault(request.model, _Model())
        entry.jobs += 1
        entry.images += request.image_count()
    if invalid > MAX_LISTED:
        ui.info(f"... and {invalid - MAX_LISTED} more invalid lines")
    return models, invalid


def _balance(
    options: ClientOptions, runtime: Runtime, ui: Ui, *, backend: str
) -> AccountBalance | None:
    """The key's balance, if a key is configured and the read works (else a note)."""
    fake = runtime.fake is not None or options.fake
    if not fake and not (options.api_key or os.environ.get("APIMART_API_KEY", "").strip()):
        ui.info("balance not checked: no API key (set APIMART_API_KEY or pass --api-key)")
        return None
    try:
        # A fresh fake, not the folder's: a dry run leaves the folder alone.
        client, _ = make_client(options, runtime)
    except UsageError as exc:
        ui.info(f"balance not checked: {exc}")
        return None

    async def read() -> AccountBalance:
        async with client:
            return await client.balance()

    try:
        return anyio.run(read, backend=backend)
    except ApimartError as exc:
        ui.warn(f"balance not checked: {describe(exc)}")
        return None


def _limits(
    settings: BatchSettings, models: dict[str, _Model], estimate: float | None, ui: Ui
) -> None:
    images = sum(entry.images for entry in models.values())
    if settings.max_images is not None and images > settings.max_images:
        ui.info(
            f"--max-images {settings.max_images}: the file asks for {images} images; a run "
            "stops submitting at the limit"
        )
    if settings.max_cost is not None and estimate is not None and estimate > settings.max_cost:
        ui.info(
            f"--max-cost {settings.max_cost:.2f} USD: the estimate is {estimate:.2f} USD; a "
            "run stops submitting at the limit"
        )


def _report(
    settings: BatchSettings,
    models: dict[str, _Model],
    invalid: int,
    prices: dict[str, float],
    estimate: float | None,
    balance: AccountBalance | None,
) -> dict[str, Any]:
    return {
        "jobs_file": str(settings.jobs_path),
        "jobs": sum(entry.jobs for entry in models.values()),
        "images": sum(entry.images for entry in models.values()),
        "invalid": invalid,
        "models": [
            {
                "model": model,
                "jobs": entry.jobs,
                "images": entry.images,
                "price": prices.get(model),
                "cost": round(prices[model] * entry.images, 6) if model in prices else None,
            }
            for model, entry in models.items()
        ],
        "estimated_cost": round(estimate, 6) if estimate is not None else None,
        "balance": None if balance is None else balance_fields(balance),
    }
