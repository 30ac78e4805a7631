"""Reading a build's log: replayed from its first line, then followed as it grows.

The builder appends timestamped lines (``<ISO time> <text>``) and flushes each one,
to a file on the disk the control plane shares with the cluster; a reader tails it.
Following ends once the build is BUILT or FAILED and every line is read; the
``finished`` check runs only when the file has nothing new, so a busy build's lines
stream without database reads.
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


def _read(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(CHUNK)
    except FileNotFoundError:
        return b""  # the build has not started yet


async def follow(
    path: Path,
    follow: bool,
    finished: Callable[[], Awaitable[bool]],
    poll_s: float = POLL_S,
) -> AsyncIterator[LogLine]:
    """Every line of the log; with ``follow``, new ones until the build ``finished``."""
    offset, number, pending = 0, 0, b""
    ended = not follow
    while True:
        data = await asyncio.to_thread(_read, path, offset)
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
