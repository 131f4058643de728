"""Developer and CI sessions. ``nox -s tests`` is the command README.md and .ci/run give."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typecheck"]

PYPROJECT = nox.project.load_toml("pyproject.toml")


def install_group(session: nox.Session, *groups: str) -> None:
    """Install dependency groups from pyproject.toml (works with any pip version)."""
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite on asyncio and trio (each async test runs on both)."""
    session.install("-e", ".[fast,server,cli,otel]")
    install_group(session, "tests")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    install_group(session, "lint")
    session.run("ruff", "check", "apimart_async", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "apimart_async", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict and pyright (strict) on the package."""
    session.install("-e", ".[fast,server,cli,otel]")
    install_group(session, "typing")
    session.run("mypy", "--strict", "apimart_async", "tests/typecheck")
    session.run("pyright", "apimart_async", "tests/typecheck")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against raw httpx and raw aiohttp (pass --quick for a short run)."""
    session.install("-e", ".[fast,server,cli,otel]")
    install_group(session, "bench")
    session.run("python", "-m", "benchmarks", *session.posargs)
