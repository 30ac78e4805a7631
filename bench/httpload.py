"""A steady bounded HTTP load on a model's endpoint, and the failed requests inside each
change's window."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import httpx

PAYLOAD = {"features": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}  # the iris examples
POLL_S = 0.1
TAIL_S = 1.0  # requests counted after a change is seen done
CALLERS, PAUSE_S = 4, 0.05  # at most 80 requests/s


def _version(r: httpx.Response) -> int:
    """The model version that answered (the iris examples say 1 or 2); 0 if none."""
    with suppress(ValueError, AttributeError):
        return int(r.json()["response"]["version"])
    return 0


@dataclass
class Load:
    """``CALLERS`` callers POSTing the payload, each pausing ``PAUSE_S`` after an answer.
    Records (send time, "" for a 200 or what went wrong, the version that answered)
    until stopped."""

    url: str
    records: list[tuple[float, str, int]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Future[None] | None = None

    async def _caller(self, http: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            sent, version = time.perf_counter(), 0
            try:
                r = await http.post(self.url, json=PAYLOAD)
                outcome = "" if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
                version = _version(r)
            except httpx.HTTPError as e:
                outcome = f"{type(e).__name__}: {e}"
            self.records.append((sent, outcome, version))
            await asyncio.sleep(PAUSE_S)

    @contextmanager
    def running(self) -> Iterator[None]:
        self._stop.clear()
        self._task = asyncio.ensure_future(self._run())
        try:
            yield
        finally:
            self._stop.set()

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=CALLERS)
        async with httpx.AsyncClient(timeout=10, limits=limits) as http:
            await asyncio.gather(*(self._caller(http) for _ in range(CALLERS)))

    async def finish(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def window(self, start: float, end: float) -> dict[str, Any]:
        inside = [(o, v) for sent, o, v in self.records if start <= sent <= end]
        failed = [o for o, _ in inside if o]
        return {
            "sent": len(inside),
            "failed": len(failed),
            "non_200": sum(o.startswith("HTTP ") for o in failed),
            "errors": sum(not o.startswith("HTTP ") for o in failed),
            "examples": sorted(set(failed))[:3],
            "versions": sorted({v for o, v in inside if not o}),  # the build that answered
        }


async def warm_up(url: str, seconds: float = 60) -> None:
    """Until the endpoint answers 200 (a route reaches the proxy a moment after RUNNING)."""
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            with suppress(httpx.HTTPError):
                if (await http.post(url, json=PAYLOAD)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} never answered 200")
            await asyncio.sleep(POLL_S)


async def changes_under_load(
    url: str, changes: Mapping[str, Callable[[], Awaitable[None]]], settle_s: float
) -> dict[str, Any]:
    """Each change in turn under the load; its window: just before it starts until it is
    seen done plus ``TAIL_S``. Windows are counted once every request has ended."""
    await warm_up(url)
    load = Load(url)
    windows: dict[str, tuple[float, float, float]] = {}
    with load.running():
        await asyncio.sleep(settle_s)
        for name, change in changes.items():
            start = time.perf_counter()
            await change()
            done = time.perf_counter()
            await asyncio.sleep(TAIL_S)
            windows[name] = (start, done + TAIL_S, done - start)
    await load.finish()
    return {
        name: {**load.window(start, end), "change_s": took}
        for name, (start, end, took) in windows.items()
    }
