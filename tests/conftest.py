"""Shared fixtures: databases (SQLite and PostgreSQL, both unless CP_TEST_DATABASES says
otherwise). The helpers the tests call are in tests/helpers/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.databases import new_postgres_database

# `make test` sets it: a test skipped for a missing tool (Go, Node, buildah) fails the
# run, so CI never passes without building and running every client.
NO_SKIPS = os.environ.get("CP_NO_SKIPS") == "1"

# The databases the tests run on, comma-separated: both by default (`make test`);
# `make test-fast` sets CP_TEST_DATABASES=sqlite: database_url and fresh_db are SQLite
# only, and the tests that need PostgreSQL itself (postgres_url, fresh_postgres, or a
# parameter whose id names postgresql) are deselected.
KNOWN_DATABASES = ("sqlite", "postgresql")
DATABASES = [d.strip() for d in os.environ.get("CP_TEST_DATABASES", "sqlite,postgresql").split(",")]
NEEDS_POSTGRESQL = {"postgres_url", "fresh_postgres"}


def pytest_configure(config: pytest.Config) -> None:
    unknown = [d for d in DATABASES if d not in KNOWN_DATABASES]
    if unknown:
        raise pytest.UsageError(
            f"CP_TEST_DATABASES={os.environ.get('CP_TEST_DATABASES')!r}: a comma-separated "
            f"list of {', '.join(KNOWN_DATABASES)}"
        )


def needs_postgresql(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    named = callspec is not None and "postgresql" in callspec.id.replace("_", "-").split("-")
    return named or bool(NEEDS_POSTGRESQL & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "postgresql" in DATABASES:
        return
    deselected = [item for item in items if needs_postgresql(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not needs_postgresql(item)]


def _skipped(config: pytest.Config) -> int:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    return len(reporter.stats.get("skipped", [])) if reporter is not None else 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if NO_SKIPS and exitstatus == pytest.ExitCode.OK and _skipped(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if NO_SKIPS and _skipped(config):
        terminalreporter.write_line(
            f"{_skipped(config)} test(s) skipped, and CP_NO_SKIPS=1 fails the run: install "
            "what they need (make setup, as root) or run `make test CP_NO_SKIPS=0`",
            red=True,
        )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    with new_postgres_database("cp_test") as url:
        yield url


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cp.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(params=DATABASES)
def fresh_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own: other tests' leftover jobs never run here."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cp.db'}"
        return
    with new_postgres_database() as url:
        yield url


@pytest.fixture
def fresh_postgres() -> Iterator[str]:
    with new_postgres_database() as url:
        yield url
