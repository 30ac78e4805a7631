"""Runs a subprocess that must never outlive its caller's deadline: pip, the import
check, buildah. One runner, so that every one of them stops the same way.

The process gets a process group of its own, and its output streams line by line to a
sink (the build log, the export log) while it runs. At the deadline, when the cancel
event is set, or on any exception in the caller's thread (KeyboardInterrupt: Ray
cancelling a build), the whole group is killed with SIGKILL: a model's or pip's own
children go with it. Reading the output to its end never hangs: when the process has
exited but something it started still holds the pipe, that group is killed too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

KILL_GRACE_S = 5.0  # how long to wait for a killed group, or for its output's end
_POLL_S = 0.1  # how often the deadline and the cancel event are looked at

Sink = Callable[[str], None]


class Stopped(Exception):
    """The deadline passed or the cancel event was set; the message says which, and
    while doing what: "timed out after 2 s while importing model.py"."""


@dataclass(frozen=True)
class Deadline:
    """When a whole job (a build, an export) must end, and the event that cancels it."""

    at: float  # time.monotonic()
    timeout_s: float  # what the job was given, for the message
    cancel: threading.Event | None = None

    @classmethod
    def after(cls, timeout_s: float, cancel: threading.Event | None = None) -> Deadline:
        return cls(time.monotonic() + timeout_s, timeout_s, cancel)

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, during: str) -> None:
        """Raises Stopped when the job is cancelled or out of time."""
        if self.cancel is not None and self.cancel.is_set():
            raise Stopped(f"cancelled while {during}")
        if self.left() <= 0:
            raise Stopped(f"timed out after {self.timeout_s:g} s while {during}")


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str],
    output: Sink,
    deadline: Deadline,
    during: str,
    cwd: Path | None = None,
    stdout: Sink | None = None,
) -> int:
    """Runs ``cmd`` to its end and returns its exit status.

    Every line of its output goes to ``output`` (without the line break); with
    ``stdout``, the lines of its stdout go there instead and only stderr goes to
    ``output``. Raises Stopped (see ``Deadline.check``) once the group is killed, and
    OSError when ``cmd`` cannot start.
    """
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stdout is not None else subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,  # its own process group, killed as one
    )
    assert proc.stdout is not None
    streams = [proc.stdout]
    pumps = [_pump(proc.stdout, stdout or output)]
    if stdout is not None:
        assert proc.stderr is not None
        streams.append(proc.stderr)
        pumps.append(_pump(proc.stderr, output))
    try:
        _wait(proc, deadline, during)
    finally:
        _drain(proc, pumps, streams)
    return proc.returncode


def _pump(stream: IO[str], sink: Sink) -> threading.Thread:
    def read() -> None:
        for raw in stream:
            sink(raw.rstrip("\n"))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _wait(proc: subprocess.Popen[str], deadline: Deadline, during: str) -> None:
    try:
        while proc.poll() is None:
            deadline.check(during)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(_POLL_S, max(deadline.left(), 0.001)))
    except BaseException:  # out of time, cancelled, or interrupted (Ray cancels a build)
        kill_group(proc)
        raise


def _drain(
    proc: subprocess.Popen[str], pumps: list[threading.Thread], streams: list[IO[str]]
) -> None:
    """Waits for the output's end; kills what the process left holding it (its group)."""
    for pump in pumps:
        pump.join(timeout=1.0)
    if any(pump.is_alive() for pump in pumps):
        kill_group(proc)
        for pump in pumps:
            pump.join(timeout=KILL_GRACE_S)
    if not any(pump.is_alive() for pump in pumps):  # closing under a reader would block
        for stream in streams:
            stream.close()


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL to the process's whole group; waits a little for the process itself."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)
