"""Tables (rich when installed, plain text otherwise) and the JSON results file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Scenario", "Target", "print_scenario", "write_json"]


@dataclass
class Target:
    """One target from an issue: *value* compared against *limit* (``<=``, ``<``, ``>=``
    or ``==``); a missing value (the run failed) never passes."""

    name: str
    value: float | None
    limit: float
    op: str = "<="
    unit: str = ""
    note: str = ""

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        compare = {
            "<=": self.value <= self.limit,
            "<": self.value < self.limit,
            ">=": self.value >= self.limit,
            "==": self.value == self.limit,
        }
        return compare[self.op]

    def describe(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.3g}{self.unit}"
        return f"{value} {self.op} {self.limit:.3g}{self.unit}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "limit": self.limit,
            "unit": self.unit,
            "passed": self.passed,
            "note": self.note,
        }


@dataclass
class Scenario:
    """A scenario's printed table, its targets and everything measured (for JSON)."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    # 1-minute load average when the scenario started and ended (the machine is shared).
    loadavg: tuple[float, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "settings": self.settings,
            "columns": self.columns,
            "rows": self.rows,
            "targets": [t.as_dict() for t in self.targets],
            "notes": self.notes,
            "runs": self.runs,
            "elapsed_s": self.elapsed_s,
            "loadavg": self.loadavg,
        }


def _plain(scenario: Scenario) -> None:
    widths = [len(c) for c in scenario.columns]
    for row in scenario.rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]
    line = "  ".join(c.rjust(w) for c, w in zip(scenario.columns, widths, strict=False))
    print(line)
    print("-" * len(line))
    for row in scenario.rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=False)))


def print_scenario(scenario: Scenario) -> None:
    """Print the table, then PASS/FAIL per target, then notes."""
    load = scenario.loadavg
    during = "" if load is None else f", load average {load[0]:.2f} -> {load[1]:.2f}"
    header = f"{scenario.title}  ({scenario.elapsed_s:.0f} s{during})"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"\n== {header}")
        _plain(scenario)
    else:
        table = Table(title=header, title_justify="left")
        for i, column in enumerate(scenario.columns):
            table.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in scenario.rows:
            table.add_row(*row)
        Console(width=200).print(table)
    for target in scenario.targets:
        verdict = "PASS" if target.passed else "FAIL"
        note = f"  ({target.note})" if target.note else ""
        print(f"  [{verdict}] {target.name}: {target.describe()}{note}")
    for note in scenario.notes:
        print(f"  note: {note}")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the results file (creating its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
