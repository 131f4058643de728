"""What a batch may still spend: ``generate_many(max_cost=, max_images=, prices=)``.

Every submit spends the account's balance, and a batch of thousands can spend a lot
before anyone looks. A ``Budget`` is asked right before each submit would be sent
(``admit``) and answers from two sums:

* what is certainly spent: the ``cost`` the service reported for finished tasks (0 for
  failed ones, which it refunds);
* what submits under way may still spend, counted conservatively: a job whose cost is
  not known yet counts at the higher of the user's price for its model (``prices``, USD
  per image, times ``n``) and the highest cost per image seen for that model in this
  batch. A price set too low is thus corrected by the first task that reports its
  cost; jobs already under way by then were counted at the lower price, so a cap can
  be passed by at most their difference.

A model with neither is run one job at a time until the first of its tasks reports a
cost (so a batch cannot race past ``max_cost`` on its first, unpriced, jobs). If the
service never reports one for that model, ``max_cost`` cannot be enforced for it: only
images are counted (``max_images``), and a WARNING says so once.

When the next submit could exceed a cap, ``admit`` returns the error, and the batch
starts no more submits; jobs in flight finish as usual. Failed tasks and submits that
never happened give their reservation back; uncertain submits keep theirs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from ._exceptions import BudgetExceededError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["Budget"]

logger = logging.getLogger("apimart_async.budget")


class Budget:
    """The caps of one batch; see the module docstring. Not thread-safe (one loop)."""

    __slots__ = (
        "_max_cost",
        "_max_images",
        "_prices",
        "_probing",
        "_seen",
        "_uncountable",
        "images",
        "reserved",
        "spent",
        "unknown",
    )

    def __init__(
        self,
        *,
        max_cost: float | None,
        max_images: int | None,
        prices: Mapping[str, float] | None,
    ) -> None:
        for name, value in (("max_cost", max_cost), ("max_images", max_images)):
            if value is not None and (isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a number >= 0 or None, got {value!r}")
        for model, price in (prices or {}).items():
            # Checked at run time too: prices often come from a command line or config.
            if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:  # pyright: ignore[reportUnnecessaryIsInstance]
                raise ValueError(f"prices[{model!r}] must be USD per image >= 0, got {price!r}")
        self._max_cost = max_cost
        self._max_images = max_images
        self._prices = dict(prices or {})
        self._seen: dict[str, float] = {}  # model -> highest cost per image seen
        self._probing: dict[str, anyio.Event] = {}  # unpriced models with a job in flight
        self._uncountable: set[str] = set()  # models whose tasks report no cost
        self.spent = 0.0  # USD, certain
        self.reserved = 0.0  # USD, submits under way
        self.images = 0  # submitted or done, this batch

    def estimate(self, model: str, n: int) -> float | None:
        """What a job of *n* images of *model* may cost (USD), or None if unknown."""
        given, seen = self._prices.get(model), self._seen.get(model)
        # A price the user gave may be too low; what tasks really cost then wins.
        per_image = given if seen is None else seen if given is None else max(given, seen)
        return None if per_image is None else per_image * n

    def try_admit(self, model: str, n: int) -> tuple[bool, float | None]:
        """Reserve a submit of *n* images of *model* if nothing needs waiting.

        Returns (True, its estimate, None when unknown), or (False, None) when an
        unpriced model's probe is still running: ``admit`` waits for it. Raises
        ``BudgetExceededError`` when the submit could exceed a cap.
        """
        if self._max_images is not None and self.images + n > self._max_images:
            raise BudgetExceededError(
                f"max_images={self._max_images} reached: {self.images} images submitted, "
                f"this job asks for {n} more; nothing was submitted for it (rerun with "
                "a higher budget to continue)",
                budget="max_images",
                spent=float(self.images),
                reserved=0.0,
                limit=float(self._max_images),
            )
        estimate = self.estimate(model, n)
        if self._max_cost is not None and model not in self._uncountable:
            if estimate is None:
                if model in self._probing:
                    return False, None
                self._probing[model] = anyio.Event()  # this job is its model's probe
            elif self.spent + self.reserved + estimate > self._max_cost + 1e-9:
                raise BudgetExceededError(
                    f"max_cost={self._max_cost:.2f} USD reached: {self.spent:.2f} spent "
                    f"and {self.reserved:.2f} reserved by submits under way; this job may "
                    f"cost {estimate:.2f}, so it was not submitted (rerun with a higher "
                    "budget to continue)",
                    budget="max_cost",
                    spent=self.spent,
                    reserved=self.reserved,
                    limit=self._max_cost,
                )
        self.images += n
        if estimate is not None:
            self.reserved += estimate
        return True, estimate

    async def admit(self, model: str, n: int) -> float | None:
        """``try_admit``, waiting while another job of an unpriced model is its probe."""
        while True:
            admitted, estimate = self.try_admit(model, n)
            if admitted:
                return estimate
            await self._probing[model].wait()

    def settle(self, model: str, n: int, estimate: float | None, cost: float | None) -> None:
        """An admitted job's task finished: *cost* as reported (None: not said)."""
        self._end_probe(model, estimate)
        if estimate is not None:
            self.reserved -= estimate
        if cost is None:
            if estimate is not None:
                self.spent += estimate  # not said: count what it was expected to cost
            elif self._max_cost is not None and model not in self._uncountable:
                self._uncountable.add(model)
                logger.warning(
                    "tasks of %s report no cost and no price was given: max_cost cannot "
                    "be enforced for it (only images are counted); pass prices={%r: usd}",
                    model,
                    model,
                )
            return
        self.spent += cost
        if cost > 0 and n > 0:
            self._seen[model] = max(self._seen.get(model, 0.0), cost / n)

    def unresolved(self, model: str, estimate: float | None) -> None:
        """An admitted job whose cost will not be known here (an uncertain submit, a
        task still running at the deadline): its reservation stays, but it no longer
        holds up the next job of an unpriced model, which becomes the probe."""
        self._end_probe(model, estimate)

    def release(self, model: str, n: int, estimate: float | None) -> None:
        """An admitted job that never created a task (refused, failed, or refunded)."""
        self._end_probe(model, estimate)
        self.images -= n
        if estimate is not None:
            self.reserved -= estimate

    def _end_probe(self, model: str, estimate: float | None) -> None:
        if estimate is None and model in self._probing:
            self._probing.pop(model).set()  # the next job of the model may ask again
