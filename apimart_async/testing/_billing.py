"""The fake's money: a key balance that each task's cost draws down, and its refunds.

The service reserves a task's price when it accepts the submit and refunds it when the
task fails (apimart-api.md §6.2, §7.3: "failed tasks are refunded / ``credits_cost``
0"). The ledger does the same: ``charge`` at submit time, so "the balance runs out
after K tasks" is exact (the K+1th submit is refused with a 402), and a refund that
becomes due when a failed task reaches its end. Refunds are kept in a heap ordered by
due time and settled lazily, whenever someone looks at the balance, so that nothing
runs in the background (see ``_state``).

Amounts are integers of micro-USD: prices such as 0.0125 USD are exact there, so a
balance of exactly K prices allows exactly K tasks, with no float drift.

What can go wrong: a negative or non-finite price or balance is a ``ValueError``
naming the offending value; nothing else here can fail.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

__all__ = ["CREDITS_PER_USD", "MICRO", "Balance", "Ledger", "to_micro", "to_usd"]

MICRO = 1_000_000
"""Micro-USD per USD: the ledger's integer unit."""
CREDITS_PER_USD = 10
"""10 credits = 1 USD (apimart-api.md §4.1): ``credits_cost`` is ``cost`` x 10."""


def to_micro(usd: float, what: str) -> int:
    """*usd* in micro-USD; *what* names the value in the error for a bad one."""
    if isinstance(usd, bool) or not isinstance(usd, int | float):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(f"{what} must be a number of USD, got {type(usd).__name__}")
    if not (math.isfinite(usd) and usd >= 0):
        raise ValueError(f"{what} must be a finite amount of USD >= 0, got {usd!r}")
    return round(usd * MICRO)


def to_usd(micro: int) -> float:
    """Micro-USD back to USD, rounded to the micro-USD (what bodies report)."""
    return round(micro / MICRO, 6)


@dataclass(frozen=True, slots=True)
class Balance:
    """The fake key's balance at one moment (``FakeApimart.balance``).

    *remaining* is ``None`` for an unlimited key; *used* counts what is spent or
    reserved by tasks that have not failed. Both are USD.
    """

    remaining: float | None
    used: float

    @property
    def unlimited(self) -> bool:
        """Whether the key has no limit (``remain_balance: -1`` on the wire)."""
        return self.remaining is None

    @property
    def exhausted(self) -> bool:
        """Whether a limited key has nothing left at all (what triggers 402 on reads)."""
        return self.remaining is not None and self.remaining <= 0


class Ledger:
    """Remaining and used micro-USD of one key, with refunds that fall due later."""

    __slots__ = ("_refunds", "_seq", "remaining", "used")

    def __init__(self, remaining: int | None) -> None:
        self.remaining = remaining  # None: unlimited
        self.used = 0
        self._refunds: list[tuple[float, int, int]] = []  # (due, seq, micro-USD)
        self._seq = 0

    def settle(self, now: float) -> None:
        """Apply every refund that is due at clock time *now*."""
        refunds = self._refunds
        while refunds and refunds[0][0] <= now:
            _, _, amount = heapq.heappop(refunds)
            self._credit(amount)

    def can_afford(self, amount: int) -> bool:
        """Whether a charge of *amount* fits what is left (call ``settle`` first)."""
        return self.remaining is None or self.remaining >= amount

    def charge(self, amount: int) -> None:
        """Reserve *amount* (checked with ``can_afford``, or forced when restoring)."""
        if self.remaining is not None:
            self.remaining -= amount
        self.used += amount

    def refund_at(self, due: float, amount: int) -> None:
        """Give *amount* back at clock time *due* (a failed task's end)."""
        if amount:
            self._seq += 1
            heapq.heappush(self._refunds, (due, self._seq, amount))

    def set(self, remaining: int | None, used: int | None = None) -> None:
        """Replace what is left (and optionally what was used); pending refunds stay."""
        self.remaining = remaining
        if used is not None:
            self.used = used

    def balance(self) -> Balance:
        """The current values in USD (call ``settle`` first)."""
        remaining = None if self.remaining is None else to_usd(self.remaining)
        return Balance(remaining=remaining, used=to_usd(self.used))

    def _credit(self, amount: int) -> None:
        if self.remaining is not None:
            self.remaining += amount
        self.used = max(0, self.used - amount)
