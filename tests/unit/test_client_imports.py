"""The Python client imports, and a Client can be built, without the server's packages:
no SQLModel, SQLAlchemy, Alembic, psycopg, Ray, nor the control plane's storage."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

BLOCKED = ("sqlmodel", "sqlalchemy", "alembic", "psycopg", "ray", "controlplane.storage")

# Run in a fresh interpreter: a meta-path finder, installed before anything else is
# imported, refuses the blocked packages (and everything under them).
SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{{name}} is blocked: the client must not need it")
            return None

    sys.meta_path.insert(0, Block())
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{{name}} imported although blocked")

    import asyncio

    import controlplane.api.client as client
    from controlplane.domain.access import AuditRecord, InvocationKey, Token

    async def build() -> None:
        async with client.Client("127.0.0.1:1", timeout_s=1.0, token="mlc_x_y") as c:
            assert c.target == "127.0.0.1:1"

    client.Client("127.0.0.1:1")
    asyncio.run(build())
    leaked = sorted(
        m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)
    )
    assert not leaked, leaked
    print("ok", Token.__name__, InvocationKey.__name__, AuditRecord.__name__)
    """
).format(blocked=BLOCKED)


def test_client_imports_without_server_packages() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=SRC,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok Token InvocationKey AuditRecord"


async def test_a_client_error_goes_up_through_context_managers_as_itself() -> None:
    import contextlib

    import pytest

    from controlplane.api.client import ClientError

    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[None]:
        yield

    with pytest.raises(ClientError, match="EXPORT_FAILED"):
        async with session():
            raise ClientError("FAILED_PRECONDITION", "exporting failed", "EXPORT_FAILED")
