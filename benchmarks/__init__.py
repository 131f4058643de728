"""Benchmarks: apimart_async against hand-written raw httpx and raw aiohttp loops.

Run ``python -m benchmarks --quick`` (or ``nox -s bench -- --quick``). The runner
starts ``python -m apimart_async.testing`` (FakeApimart over real HTTP on loopback) in
its own process, then runs every measured client in a fresh ``python -m
benchmarks.worker`` process, so each client's CPU time, wall time and RSS are its own.
See ``benchmarks/README.md`` for what each scenario measures and how to read it.
"""
