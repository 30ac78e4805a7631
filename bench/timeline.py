"""Where one change's time went: the client's own marks beside the server's log in its window.

The server runs with ``--log-format=json --log-level=debug``: its log then says when a job
was claimed and done, how long each apply's steps took, and each reconciler look at the
changing model with what Serve said of its replicas. A change's window is from the call
that started it to the moment the client saw it done; the timeline is every mark of the
client and every line of the server about that model (or about no model: the reconciler's
ticks) in the window, as milliseconds from its start.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

OWN = ("controlplane", "workers")  # loggers whose lines go into a timeline


@dataclass
class Window:
    """One timed change, as the client saw it (wall-clock seconds)."""

    figure: str
    model: str
    started: float = field(default_factory=time.time)
    marks: list[tuple[float, str]] = field(default_factory=list)
    cpu_s: float = 0.0  # what the side's own processes used meanwhile

    def mark(self, what: str) -> None:
        self.marks.append((time.time(), what))

    @property
    def ended(self) -> float:
        return self.marks[-1][0] if self.marks else self.started

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass(frozen=True)
class Line:
    at: float
    model: str
    text: str


def server_lines(log_path: Path) -> list[Line]:
    """The JSON lines of this project's loggers in a server's log (other lines skipped)."""
    out = []
    for raw in log_path.read_text(errors="replace").splitlines():
        try:
            line: dict[str, Any] = json.loads(raw)
        except ValueError:
            continue
        logger = str(line.get("logger", ""))
        if not isinstance(line, dict) or logger.split(".")[0] not in OWN:
            continue
        at = datetime.fromisoformat(str(line["time"])).timestamp()
        who = logger.rsplit(".", 1)[-1]
        out.append(Line(at, str(line.get("model", "")), f"{who}: {line.get('message', '')}"))
    return out


def timeline(window: Window, lines: list[Line]) -> list[dict[str, Any]]:
    """The window's client marks and server lines (about its model, or no model), in order.
    The server's times have millisecond precision: a line may sort 1 ms early."""
    slack = 0.002
    events = [(at, "client", what) for at, what in window.marks]
    events += [
        (ln.at, "server", ln.text)
        for ln in lines
        if window.started - slack <= ln.at <= window.ended + slack
        and ln.model in ("", window.model)
    ]
    events.sort(key=lambda e: e[0])
    return [
        {"ms": round((at - window.started) * 1000), "side": side, "what": what}
        for at, side, what in events
    ]


def show(title: str, events: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    for e in events:
        print(f"{e['ms']:>7} ms  {e['side']:<6}  {e['what']}")
