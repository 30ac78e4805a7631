"""The console as people start it: inside `modelctl serve` (on by default, its address on
the ready line, HTTPS and Secure cookies under TLS) and apart as `modelctl console
--server`; each stops cleanly on SIGTERM, live pages open included."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from controlplane.api.client import Client
from controlplane.server import Server
from tests.helpers.certs import Authority
from tests.helpers.console import Web
from tests.helpers.servers import MODELCTL

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def launched(*argv: str) -> AsyncIterator[dict[str, str]]:
    """`modelctl ARGV` until its ready line (its fields: grpc=, console=, ...); at the end
    SIGTERM, after which it must exit 0 within 30 s."""
    proc = await asyncio.create_subprocess_exec(
        MODELCTL,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
        if not line.startswith("ready "):
            err = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
            raise AssertionError(f"no ready line: {line!r}\n{err[-3000:]}")
        yield dict(part.split("=", 1) for part in line.split()[1:])
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        assert code == 0, f"exited {code} on SIGTERM"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def follow_live(http: httpx.AsyncClient, path: str) -> asyncio.Task[None]:
    """A live page kept open (the server must still stop promptly)."""
    opened = asyncio.Event()

    async def read() -> None:
        with contextlib.suppress(httpx.HTTPError):
            async with http.stream("GET", path, timeout=None) as r:
                assert r.status_code == 200
                async for _ in r.aiter_lines():
                    opened.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(opened.wait(), 10)
    return task


async def test_serve_runs_the_console_and_names_it_on_the_ready_line(tmp_path: Path) -> None:
    async with launched(
        "serve", "--insecure-no-auth", "--grpc-port=0", "--http-port=0", "--console-port=0",
        f"--data-dir={tmp_path / 'data'}", "--backend=fake",
    ) as ready:  # fmt: skip
        host, _, port = ready["console"].rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0, "on this machine only, by default"
        async with Client(ready["grpc"]) as c:
            await c.create_model("projects/default", "iris", display_name="Iris classifier")
        async with httpx.AsyncClient(base_url=f"http://{ready['console']}", timeout=30) as http:
            web = Web(http)
            assert (await web.sign_in()).status_code == 303
            page = await web.get("/projects/default/models")
            assert page.status_code == 200 and "Iris classifier" in page.text
            live = await follow_live(http, "/projects/default/models/-live")
    live.cancel()


async def test_console_apart_is_a_client_of_the_server_it_names(server: Server) -> None:
    async with Client(server.grpc_address) as c:
        await c.create_model("projects/default", "apart", display_name="Served elsewhere")
    async with launched("console", "--server", server.grpc_address, "--port", "0") as ready:
        assert ready["server"] == server.grpc_address
        async with httpx.AsyncClient(base_url=f"http://{ready['console']}", timeout=30) as http:
            web = Web(http)
            assert (await web.sign_in()).status_code == 303
            page = await web.get("/projects/default/models")
            assert "Served elsewhere" in page.text
            live = await follow_live(http, "/projects/default/models/-live")
    live.cancel()


async def test_a_console_port_in_use_is_refused_in_words(tmp_path: Path) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            MODELCTL, "serve", "--insecure-no-auth", "--grpc-port=0", "--http-port=0",
            f"--console-port={port}", f"--data-dir={tmp_path / 'data'}", "--backend=fake",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        taken.close()
    assert proc.returncode == 1
    assert not out.decode().startswith("ready")
    assert f"cannot listen on 127.0.0.1:{port}" in err.decode()
    assert "--console-port 0" in err.decode()


async def test_under_tls_the_console_is_https_with_secure_cookies(tmp_path: Path) -> None:
    ca = Authority(tmp_path / "pki", "ca")
    cert = ca.issue("server", server=True)
    async with launched(
        "serve", "--insecure-no-auth", "--grpc-port=0", "--http-port=0", "--console-port=0",
        f"--data-dir={tmp_path / 'data'}", "--backend=fake",
        f"--tls-cert={cert.cert}", f"--tls-key={cert.key}", f"--console-ca-file={ca.pem}",
    ) as ready:  # fmt: skip
        base = f"https://{ready['console']}"
        trust = ssl.create_default_context(cafile=str(ca.pem))
        async with httpx.AsyncClient(base_url=base, verify=trust, timeout=30) as http:
            web = Web(http)
            r = await web.sign_in()
            assert r.status_code == 303, r.text
            cookie = next(
                v for k, v in r.headers.multi_items() if k == "set-cookie" and "session" in v
            )
            assert "Secure" in cookie and "HttpOnly" in cookie
            assert (await web.get("/projects/default/models")).status_code == 200
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient(timeout=5) as plain:
                await plain.get(f"http://{ready['console']}/sign-in")
