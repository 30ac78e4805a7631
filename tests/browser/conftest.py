"""The web console in a real browser against a server in this process (fake backend,
SQLite); the browser's fixtures and helpers are in tests/helpers/browser.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.console.web import ConsoleServer
from controlplane.server import Server
from tests.helpers.api import fake_settings, running
from tests.helpers.browser import browser, errors, page
from tests.helpers.console import console_of

__all__ = ["browser", "errors", "page"]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """A server of the test's own (fake backend, SQLite: what a browser sees does not depend
    on the database; tests/integration/test_console.py runs on both)."""
    async with running(fake_settings(f"sqlite:///{tmp_path / 'cp.db'}", tmp_path)) as srv:
        yield srv


@pytest.fixture
async def console(server: Server) -> AsyncIterator[ConsoleServer]:
    async with console_of(server.grpc_address) as c:
        yield c
