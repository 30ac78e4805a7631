"""The Ray driver in a process of its own: the server's Backend when it runs on Ray.

A Ray driver cannot let go of a cluster it lost: measured here, ``ray.shutdown`` with
the GCS gone waits for minutes or ends the whole process from inside Ray, and the old
connection ends it too once a new cluster answers at the same address (wrong cluster
id). So the server never imports ray. It runs ``workers.driver_main`` as a child
process (``ray_backend.RayBackend`` inside) and calls it over a socket pair, one pickled
frame per message. When the cluster is gone the child is killed with its process group
(a local Ray it started goes with it) and a new one is started; the server process, its
gRPC port, streams and watchers stay. The new driver joins the cluster (an external
one once it answers again; a local one is started anew) and ``on_reconnected``'s
callbacks apply every model. Meanwhile calls raise ClusterUnavailable.

The child dies with the server (PR_SET_PDEATHSIG): a server killed with -9 leaves no
driver, and no local Ray, behind, as when the driver ran in the server's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

from workers.backend import (
    AppObservation,
    AppSpec,
    BuildOutcome,
    BuildSpec,
    ClusterUnavailable,
    NodeResources,
)
from workers.observations import Changes, Holder
from workers.runtime import Runtime
from workers.signals import Batch

log = logging.getLogger(__name__)

RAY_BACKEND = "workers.ray_backend:RayBackend"
CLOSE_TIMEOUT_S = 60.0  # for the driver to stop the local Ray it started
RESTART_DELAYS_S = (1.0, 2.0, 5.0, 10.0)  # between tries to start a new driver
SILENT_S = 15.0  # a started driver that sends no beat this long is stuck: replaced
_HEADER = struct.Struct(">I")

Callback = Callable[[], Awaitable[None]]


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at the end of the stream."""
    try:
        size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
        return pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def write_frame(writer: asyncio.StreamWriter, message: object) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(body)) + body)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Driver:
    """One driver process and the calls in flight to it."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_event: Callable[[_Driver, tuple[Any, ...]], None],
    ) -> None:
        self.process = process
        self._reader = reader
        self._writer = writer
        self._on_event = on_event
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.ended = asyncio.Event()
        self.last_beat: float | None = None  # monotonic; None: not started yet
        self._reading = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while (message := await read_frame(self._reader)) is not None:
                kind = message[0]
                if kind == "result":
                    _, call, ok, value = message
                    done = self._pending.pop(call, None)
                    if done is not None and not done.done():
                        if ok:
                            done.set_result(value)
                        else:
                            done.set_exception(value)
                elif kind == "beat":
                    self.last_beat = time.monotonic()
                elif kind == "log":
                    record = logging.makeLogRecord(message[1])
                    logging.getLogger(record.name).handle(record)
                else:
                    self._on_event(self, message)
        finally:
            self.ended.set()
            self._writer.close()
            gone = ClusterUnavailable(f"the Ray driver process (pid {self.process.pid}) ended")
            for done in self._pending.values():
                if not done.done():
                    done.set_exception(gone)
            self._pending.clear()
            self._on_event(self, ("ended",))

    async def call(self, method: str, *args: Any) -> Any:
        if self.ended.is_set():
            raise ClusterUnavailable("the Ray driver process ended")
        call = next(self._ids)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call] = done
        write_frame(self._writer, ("call", call, method, args))
        try:
            return await done
        except asyncio.CancelledError:
            self._pending.pop(call, None)
            if not self.ended.is_set():
                write_frame(self._writer, ("cancel", call))
            raise

    async def close(self, patience: float) -> None:
        """Asks the driver to close its backend (a local Ray it started stops), then
        ends it; a driver that does not finish in ``patience`` seconds is killed."""
        if patience > 0:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.call("close"), patience)
            with contextlib.suppress(Exception):
                self._writer.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 10)
        self.kill()  # what is left of its group
        await self.process.wait()
        self._reading.cancel()
        await asyncio.gather(self._reading, return_exceptions=True)

    def kill(self) -> None:
        """SIGKILL to the driver's process group: the driver and a local Ray it started."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


class DriverBackend:
    """A Backend whose calls run in a driver process (``factory``: "module:Class" of the
    backend it runs, built there with ``options``); the driver is replaced when its
    cluster is gone or when it ends."""

    def __init__(
        self,
        http_base: str,
        factory: str = RAY_BACKEND,
        silent_s: float = SILENT_S,
        **options: Any,
    ) -> None:
        """``http_base``: where the backend's HTTP proxy answers (its options say so to
        it; a port chosen here, not in a driver, stays the same across drivers).
        ``silent_s``: a started driver with no beat for this long is replaced."""
        self._http_base = http_base
        self._silent_s = silent_s
        self._factory = factory
        self._options = options
        self._driver: _Driver | None = None
        self._up = False
        self._down_since: float | None = None
        self._reconnected: list[Callback] = []
        self._replacing: asyncio.Task[None] | None = None
        self._telling: asyncio.Future[None] | None = None
        self._closing = False
        self._watching: asyncio.Task[None] | None = None
        self._observed = Holder()  # the applications as the driver last reported them
        self._observing = asyncio.Lock()
        self.drivers_started = 0  # how many driver processes this backend started

    @property
    def http_base(self) -> str:
        return self._http_base

    @property
    def driver_pid(self) -> int | None:
        return self._driver.process.pid if self._driver is not None else None

    def available(self) -> bool:
        return self._up and self._driver is not None and not self._driver.ended.is_set()

    def on_reconnected(self, callback: Callback) -> None:
        self._reconnected.append(callback)

    async def start(self) -> None:
        """Starts the driver and its backend (with an external cluster that does not
        answer yet, the driver joins it later and ``on_reconnected``'s callbacks run)."""
        self._driver = await self._spawn()
        try:
            self._up = await self._started(self._driver)
        except BaseException:
            driver, self._driver = self._driver, None
            await driver.close(0.0)
            raise
        self._driver.last_beat = time.monotonic()
        if not self._up:
            self._down_since = time.time()
        self._watching = asyncio.ensure_future(self._watch_beats())

    async def _started(self, driver: _Driver) -> bool:
        """Starts the driver's backend: whether its cluster is up. Where a cluster's Serve
        runs already with another HTTP port, the backend uses that one: so does this."""
        up, http_base = await driver.call("start")
        if http_base != self._http_base:
            self._http_base = str(http_base)
        return bool(up)

    async def _watch_beats(self) -> None:
        """A started driver whose beats stop (its loop hangs in a call into Ray that never
        returns, the cluster gone) is replaced like one whose cluster is gone."""
        while True:
            await asyncio.sleep(1.0)
            driver = self._driver
            if driver is None or driver.last_beat is None or self._closing:
                continue
            silent = time.monotonic() - driver.last_beat
            if silent > self._silent_s and not driver.ended.is_set():
                driver.last_beat = None  # once
                self._replace(f"the Ray driver gave no sign of life for {silent:.0f} s")

    async def _spawn(self) -> _Driver:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "workers.driver_main",
                str(theirs.fileno()),
                str(os.getpid()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # its group: the driver and a local Ray it starts
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        # The driver logs as this process's own loggers would (their debug lines included).
        level = logging.getLogger(__name__).getEffectiveLevel()
        write_frame(writer, ("init", self._factory, self._options, level))
        self.drivers_started += 1
        return _Driver(process, reader, writer, self._event)

    def _event(self, driver: _Driver, message: tuple[Any, ...]) -> None:
        if driver is not self._driver:
            return  # an old driver's last words
        kind = message[0]
        if kind == "up":
            self._up = bool(message[1])
        elif kind == "joined":  # a cluster that did not answer at start answers now
            self._up = True
            self._down_since = None
            self._telling = asyncio.ensure_future(self._tell_reconnected())
        elif kind in ("lost", "ended") and not self._closing:
            self._replace("the Ray cluster is gone" if kind == "lost" else "the Ray driver ended")

    def _replace(self, why: str) -> None:
        if self._replacing is not None and not self._replacing.done():
            return
        self._up = False
        self._down_since = self._down_since or time.time()
        log.error("%s: starting a new Ray driver to join it anew", why)
        self._replacing = asyncio.ensure_future(self._new_driver())

    async def _new_driver(self) -> None:
        old, self._driver = self._driver, None
        if old is not None:
            old.kill()
            await old.process.wait()
        for attempt in itertools.count():
            try:
                driver = await self._spawn()
                self._driver = driver
                up = await self._started(driver)
                driver.last_beat = time.monotonic()
                break
            except Exception as e:
                if self._driver is not None:
                    self._driver.kill()
                    self._driver = None
                delay = RESTART_DELAYS_S[min(attempt, len(RESTART_DELAYS_S) - 1)]
                log.error("a new Ray driver did not start (%s); trying again in %.0f s", e, delay)
                await asyncio.sleep(delay)
        if up:  # a new local Ray, or the external cluster already back
            self._up = True
            await self._tell_reconnected()
        # else: the driver joins the cluster once it answers ("joined")

    async def _tell_reconnected(self) -> None:
        took = time.time() - (self._down_since or time.time())
        self._down_since = None
        log.warning("joined the Ray cluster (after %.0f s): applying every model", took)
        for callback in self._reconnected:
            try:
                await callback()
            except Exception:
                log.exception("after joining the cluster")

    async def _call(self, method: str, *args: Any) -> Any:
        driver = self._driver
        if driver is None or not self._up:
            since = time.strftime("%H:%M:%S", time.localtime(self._down_since or time.time()))
            raise ClusterUnavailable(
                f"the Ray cluster does not answer since {since}; connecting again"
            )
        return await driver.call(method, *args)

    async def close(self) -> None:
        self._closing = True
        for task in (self._replacing, self._telling, self._watching):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        driver, self._driver = self._driver, None
        if driver is not None:
            # A driver whose cluster is gone has nothing to stop in order: killed at once.
            await driver.close(CLOSE_TIMEOUT_S if self._up else 0.0)
        self._up = False

    async def build(self, spec: BuildSpec) -> BuildOutcome:
        return cast(BuildOutcome, await self._call("build", spec))

    async def runtime(self) -> Runtime:
        return cast(Runtime, await self._call("runtime"))

    async def until_built(self) -> int:
        return cast(int, await self._call("until_built"))

    async def apply(self, apps: Sequence[AppSpec]) -> None:
        await self._call("apply", list(apps))

    async def observe(self) -> Mapping[str, AppObservation]:
        """Only what changed since the last look crosses the socket (workers.observations);
        one look at a time, so that changes apply to the set they were made against."""
        async with self._observing:
            changes = await self._call("observe_changes", self._observed.number)
            return self._observed.apply(cast(Changes, changes))

    async def nodes(self) -> Sequence[NodeResources]:
        return cast(Sequence[NodeResources], await self._call("nodes"))

    async def signals(self, epoch: str, cursor: int) -> Batch:
        return cast(Batch, await self._call("signals", epoch, cursor))
