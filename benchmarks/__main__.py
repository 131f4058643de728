"""``python -m benchmarks``: run the scenarios and print the tables (see runner.py)."""

from __future__ import annotations

from .runner import main

if __name__ == "__main__":
    raise SystemExit(main())
