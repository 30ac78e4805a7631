"""The console on its own port, in the running event loop (uvicorn, no signal handlers of
its own: the process that embeds it decides when it stops)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn

from controlplane.api.client import Client
from controlplane.console.app import make_app, wrapped

log = logging.getLogger(__name__)


class _Embedded(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # SIGTERM and SIGINT belong to the embedding process


class ConsoleServer:
    def __init__(
        self,
        connect: Callable[[str], Client],
        host: str,
        port: int,
        server: str = "",
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """``connect(token)``: a client of the API; ``tls``: (certificate, key) to serve
        HTTPS with (cookies are then Secure)."""
        self.app = make_app(connect, secure=tls is not None, server=server)
        self.host = host
        self.port = port
        self.tls = tls
        self._server: _Embedded | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    async def start(self) -> None:
        # IPPROTO_TCP named: asyncio turns Nagle off only on such sockets (else each answer
        # on a kept-alive connection waits ~40 ms for the client's delayed ACK).
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise OSError(
                e.errno,
                f"the console cannot listen on {self.host}:{self.port}: {e.strerror} "
                "(--console-port 0: any free port; -1: no console)",
            ) from e
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            wrapped(self.app),
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=1,
            ssl_certfile=str(self.tls[0]) if self.tls else None,
            ssl_keyfile=str(self.tls[1]) if self.tls else None,
        )
        self._server = _Embedded(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                await self._task  # its error
                raise RuntimeError("the console stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = self._task = None


async def run_apart(
    server: str,
    host: str,
    port: int,
    client_tls: tuple[str | None, str | None, str | None] | None,
    tls: tuple[Path, Path] | None,
) -> int:
    """``modelctl console``: the console alone, a client of ``server``, until SIGTERM."""
    import signal

    console = ConsoleServer(
        lambda token: Client(server, tls=client_tls, token=token), host, port, server, tls=tls
    )
    await console.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready console={console.address} server={server}", flush=True)
    await stop.wait()
    await console.stop()
    return 0
