"""Reading a build's log: replayed from its first line, then followed as it grows.

The builder appends timestamped lines (``<ISO time> <text>``) and flushes each one to the
build's log on the disk of the server that runs the build (a build on a node away from
that disk sends its lines there as it writes them); a reader on that server tails the
file. A reader on another server (``--artifact-store database``) reads, while the build
runs, the parts the building server puts in the database as the log grows, then the
whole log fetched once the build ended: the parts are a prefix of that file, so the
offset carries over (``LogSource``). Following ends once the build is BUILT or FAILED and
every line is read; the ``finished`` check runs only when nothing new came, so a busy
build's lines stream without reading its state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

CHUNK = 256 * 1024
POLL_S = 0.1


@dataclass(frozen=True)
class LogLine:
    number: int  # 1 for the first line
    time: datetime | None
    text: str


def parse(number: int, raw: bytes) -> LogLine:
    line = raw.decode("utf-8", errors="replace").rstrip("\r")
    stamp, _, text = line.partition(" ")
    try:
        return LogLine(number, datetime.fromisoformat(stamp), text)
    except ValueError:  # not one of the builder's lines: kept whole
        return LogLine(number, None, line)


def read_file(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(CHUNK)
    except FileNotFoundError:
        return b""  # the build has not started yet (or runs on another server)


class LogSource:
    """A build's log read from an offset: the file at ``path()`` once this server has it,
    else (``parts`` given: the log is only on the server that runs the build) the parts
    that server has shared so far, in order. ``parts(n)`` returns parts n, n+1, ..."""

    def __init__(
        self, path: Callable[[], Path], parts: Callable[[int], list[bytes]] | None = None
    ) -> None:
        self._path = path
        self._parts = parts
        self._next_part = 0

    def read(self, offset: int) -> bytes:
        path = self._path()
        if self._parts is None or path.is_file():
            return read_file(path, offset)
        parts = self._parts(self._next_part)
        self._next_part += len(parts)
        return b"".join(parts)


async def follow(
    read: Callable[[int], bytes],
    follow: bool,
    finished: Callable[[], Awaitable[bool]],
    poll_s: float = POLL_S,
) -> AsyncIterator[LogLine]:
    """Every line of the log; with ``follow``, new ones until the build ``finished``."""
    offset, number, pending = 0, 0, b""
    ended = not follow
    while True:
        data = await asyncio.to_thread(read, offset)
        if data:
            offset += len(data)
            *complete, pending = (pending + data).split(b"\n")
            for raw in complete:
                number += 1
                yield parse(number, raw)
            continue
        if ended:
            break
        ended = await finished()  # if so: one more read for what came meanwhile
        if not ended:
            await asyncio.sleep(poll_s)
    if pending:  # a last line without its newline (a build killed mid-write)
        yield parse(number + 1, pending)
