"""A real server on a real socket, with the in-process fake backend, on SQLite and PostgreSQL
(the helpers these tests call are in tests/helpers/api.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from controlplane.cli import main as modelctl
from controlplane.console.web import ConsoleServer
from controlplane.server import Server
from controlplane.storage.db import Database
from tests.helpers.api import Stub, fake_settings, running
from tests.helpers.console import Web, console_of, web_of


@pytest.fixture
def db(fresh_db: str) -> Iterator[Database]:
    """A migrated database of this test's own (no server)."""
    database = Database(fresh_db)
    database.migrate()
    yield database
    database.close()


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[Server]:
    async with running(fake_settings(database_url, tmp_path)) as srv:
        yield srv


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        yield Stub(channel)


@pytest.fixture
def project() -> str:
    return f"projects/p{uuid.uuid4().hex[:8]}"


Captured = tuple[int, str, str]  # exit code, stdout, stderr
Cli = Callable[..., Awaitable[Captured]]


@pytest.fixture
def cli(server: Server, project: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    """`modelctl --server ... --project ...` run in this process: what it printed."""

    async def run(*argv: str) -> Captured:
        capsys.readouterr()
        base = ["--server", server.grpc_address, "--project", project.removeprefix("projects/")]
        code = await modelctl.run([*base, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
async def console(server: Server) -> AsyncIterator[ConsoleServer]:
    """The web console of ``server`` (which has no tokens: every user is an admin)."""
    async with console_of(server.grpc_address) as c:
        yield c


@pytest.fixture
async def web(console: ConsoleServer, project: str) -> AsyncIterator[Web]:
    """A user signed in to ``console`` on ``project``, over plain HTTP."""
    async with web_of(console, project=project.removeprefix("projects/")) as w:
        yield w
