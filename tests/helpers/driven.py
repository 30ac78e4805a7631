"""A backend for ``workers.driver`` tests: it runs in the driver process and says what
happened there (its pid, the calls it got, a build that was cancelled) through files."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from workers.backend import (
    AppObservation,
    AppSpec,
    AppStatus,
    BuildOutcome,
    BuildSpec,
    ClusterUnavailable,
    NodeResources,
)
from workers.runtime import Runtime, current
from workers.signals import Batch


class Probe:
    """``folder``: where it writes ``pid`` at start, ``applied`` (app names, one per
    line, kept across drivers), ``building`` when a build starts (it runs until it is
    cancelled) and ``cancelled`` then."""

    def __init__(self, folder: str, http_host: str, http_port: int) -> None:
        self.folder = Path(folder)
        self.http_base = f"http://{http_host}:{http_port}"
        self._up = False

    def available(self) -> bool:
        return self._up

    def on_reconnected(self, callback: Callable[[], Awaitable[None]]) -> None:
        pass

    async def start(self) -> None:
        (self.folder / "pid").write_text(str(os.getpid()))
        self._up = True

    async def close(self) -> None:
        (self.folder / "closed").write_text(str(os.getpid()))

    async def build(self, spec: BuildSpec) -> BuildOutcome:
        (self.folder / "building").write_text(spec.build_name)
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            (self.folder / "cancelled").write_text(spec.build_name)
            raise
        raise AssertionError("not reached")

    async def runtime(self) -> Runtime:
        return current()

    async def apply(self, apps: Sequence[AppSpec]) -> None:
        (self.folder / "applied").write_text("".join(f"{a.app_name}\n" for a in apps))

    async def observe(self) -> Mapping[str, AppObservation]:
        path = self.folder / "applied"
        names = path.read_text().split() if path.exists() else []
        return {n: AppObservation(n, AppStatus.RUNNING, "", ()) for n in names}

    async def freeze(self) -> None:
        """Blocks the driver's loop (as a call into Ray that never returns would)."""
        threading.Event().wait()  # never set: the loop does not come back

    async def nodes(self) -> Sequence[NodeResources]:
        raise ClusterUnavailable("no nodes listed: the probe says so")

    async def signals(self, epoch: str, cursor: int) -> Batch:
        raise ValueError(f"bad cursor {cursor}")
