"""The driver process (``workers.driver``): runs one backend and answers the server's
calls to it over the socket it was given, until the server closes it or dies.

    python -m workers.driver_main FD PARENT_PID

The first message names the backend ("module:Class") and its options. Then each call
runs as a task of its own (a build and an apply run side by side) and may be cancelled;
what the backend logs goes to the server's logger, record by record. Messages this
process sends besides results: ("up", bool) when the backend's availability changes,
("lost",) when its cluster is gone, ("joined",) when a cluster that did not answer at
start is joined, ("beat",) five times a second once started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import logging
import os
import pickle
import signal
import socket
import sys
from typing import Any

from workers.driver import read_frame, write_frame
from workers.observations import Sender

PR_SET_PDEATHSIG = 1
UP_POLL_S = 0.2


def _die_with(parent: int) -> None:
    """SIGKILL when the server's process ends, however it ends (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


class _ToServer(logging.Handler):
    """Every record, formatted here (message and traceback), sent to the server."""

    def __init__(self, send: Any) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": record.getMessage(),
                "args": None,
                "exc_text": self.formatter.formatException(record.exc_info)
                if record.exc_info and self.formatter
                else record.exc_text,
                "created": record.created,
                "pathname": record.pathname,
                "lineno": record.lineno,
                "funcName": record.funcName,
                "process": record.process,
                "threadName": record.threadName,
            }
            self._send(("log", fields))
        except Exception:
            self.handleError(record)


def _sendable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


async def serve(fd: int) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))

    def send(message: object) -> None:
        if _in_loop_thread(loop):
            write_frame(writer, message)
        else:
            loop.call_soon_threadsafe(write_frame, writer, message)

    init = await read_frame(reader)
    if init is None:
        return
    _, factory, options, level = init
    root = logging.getLogger()
    root.handlers[:] = [_ToServer(send)]
    root.handlers[0].setFormatter(logging.Formatter())
    root.setLevel(max(level, logging.INFO))  # as the server's: libraries stay at INFO
    logging.getLogger("workers").setLevel(level)
    module, _, name = factory.partition(":")
    backend = getattr(importlib.import_module(module), name)(**options)

    async def lost() -> None:
        send(("lost",))

    async def joined() -> None:
        send(("joined",))

    if hasattr(backend, "on_lost"):
        backend.on_lost(lost)
    backend.on_reconnected(joined)
    calls: dict[int, asyncio.Task[None]] = {}
    sent = Sender()  # the observations, as last sent
    watching: asyncio.Task[None] | None = None

    async def watch_up() -> None:
        """Availability changes, and a beat each time: the server replaces a driver
        whose loop stops (a call into Ray that hangs on it)."""
        last = backend.available()
        while True:
            await asyncio.sleep(UP_POLL_S)
            now = backend.available()
            if now != last:
                send(("up", now))
                last = now
            send(("beat",))

    async def run(call: int, method: str, args: tuple[Any, ...]) -> None:
        nonlocal watching
        try:
            if method == "start":  # up, and where its HTTP proxy answers (Serve's own port)
                await backend.start()
                value: Any = (backend.available(), backend.http_base)
                watching = watching or asyncio.ensure_future(watch_up())
            elif method == "observe_changes":  # what changed since the server's set
                value = sent.changes(await backend.observe(), *args)
            elif method == "close":
                if watching is not None:
                    watching.cancel()
                value = await backend.close()
            else:
                value = await getattr(backend, method)(*args)
            send(("result", call, True, value))
        except asyncio.CancelledError:
            pass
        except BaseException as e:
            send(("result", call, False, _sendable(e)))
        finally:
            calls.pop(call, None)

    while (message := await read_frame(reader)) is not None:
        if message[0] == "call":
            _, call, method, args = message
            calls[call] = asyncio.ensure_future(run(call, method, args))
        elif message[0] == "cancel":
            task = calls.get(message[1])
            if task is not None:
                task.cancel()
    # The server closed the socket: nothing more will be asked.
    for task in calls.values():
        task.cancel()


def _in_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread runs ``loop`` (a Ray thread may log: its record is handed over)."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def main() -> None:
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when this ends
    asyncio.run(serve(fd))
    os._exit(0)  # Ray's atexit hooks have nothing left to stop


if __name__ == "__main__":
    main()
