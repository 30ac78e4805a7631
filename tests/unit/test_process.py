"""workers.process: the one runner of pip, the import check and buildah. Its output
streams while it runs; the deadline, a cancel and an interrupt kill its whole group;
reading its output to the end never hangs on what it left behind."""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from workers import process

# The child starts a grandchild (its own group's), says both pids, then waits.
TREE = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print('pids', child.pid, flush=True)\n"
    "print('error line', file=sys.stderr, flush=True)\n"
    "time.sleep(600)\n"
)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "")}


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def gone(pid: int, timeout: float = 10) -> bool:
    """Whether ``pid`` ends within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Lines:
    """A sink that remembers lines and signals the one starting with ``pids``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.started = threading.Event()
        self.pid = 0

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("pids "):
            self.pid = int(line.split()[1])
            self.started.set()


def test_output_streams_line_by_line_and_the_status_comes_back() -> None:
    seen = Lines()
    code = "import sys\nprint('one')\nprint('two', file=sys.stderr)\nsys.exit(3)\n"
    deadline = process.Deadline.after(30)
    assert process.run(python(code), env=env(), output=seen, deadline=deadline, during="x") == 3
    assert sorted(seen.lines) == ["one", "two"]


def test_stdout_apart_from_stderr() -> None:
    out, err = Lines(), Lines()
    code = "import sys\nprint('result')\nprint('log', file=sys.stderr)\n"
    deadline = process.Deadline.after(30)
    process.run(python(code), env=env(), output=err, stdout=out, deadline=deadline, during="x")
    assert (out.lines, err.lines) == (["result"], ["log"])


def test_the_deadline_kills_the_whole_group() -> None:
    seen = Lines()
    started = time.monotonic()
    with pytest.raises(process.Stopped, match=r"^timed out after 1\.5 s while sleeping$"):
        process.run(
            python(TREE),
            env=env(),
            output=seen,
            deadline=process.Deadline.after(1.5),
            during="sleeping",
        )
    assert time.monotonic() - started < 10
    assert seen.started.is_set() and "error line" in seen.lines  # streamed before the end
    assert gone(seen.pid), "the grandchild went with the group"


def test_cancel_kills_the_whole_group() -> None:
    seen, cancel = Lines(), threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            deadline = process.Deadline.after(60, cancel)
            process.run(python(TREE), env=env(), output=seen, deadline=deadline, during="x")
        except BaseException as e:
            failed.append(e)

    runner = threading.Thread(target=run)
    runner.start()
    assert seen.started.wait(10), "the child said its pids"
    cancel.set()
    runner.join(timeout=10)
    assert not runner.is_alive()
    assert [str(e) for e in failed] == ["cancelled while x"]
    assert gone(seen.pid)


def test_an_interrupt_kills_the_whole_group() -> None:
    """KeyboardInterrupt in the caller (how Ray cancels a build task) stops the process."""
    seen = Lines()

    def interrupt(line: str) -> None:
        seen(line)
        if line.startswith("pids "):
            _thread.interrupt_main()

    # Python's own SIGINT handler (interrupt_main does nothing under another one; a full
    # session's earlier tests may leave one: seen twice in CI, never alone).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            deadline = process.Deadline.after(60)
            process.run(python(TREE), env=env(), output=interrupt, deadline=deadline, during="x")
    finally:
        signal.signal(signal.SIGINT, before)
    assert gone(seen.pid)


def test_a_background_child_holding_the_output_does_not_hang_the_reader() -> None:
    """The process exits, but what it started still holds the pipe: killed with its group."""
    seen = Lines()
    code = TREE.replace("time.sleep(600)\n", "")  # the child exits at once; the grandchild stays
    started = time.monotonic()
    deadline = process.Deadline.after(60)
    assert process.run(python(code), env=env(), output=seen, deadline=deadline, during="x") == 0
    assert time.monotonic() - started < process.KILL_GRACE_S + 5
    assert gone(seen.pid)


def test_deadline_check_between_steps() -> None:
    cancel = threading.Event()
    deadline = process.Deadline.after(60, cancel)
    deadline.check("working")
    cancel.set()
    with pytest.raises(process.Stopped, match=r"^cancelled while working$"):
        deadline.check("working")
    with pytest.raises(process.Stopped, match=r"^timed out after 0 s while working$"):
        process.Deadline.after(0).check("working")


def test_a_command_that_cannot_start_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        process.run(
            [str(tmp_path / "missing")],
            env=env(),
            output=print,
            deadline=process.Deadline.after(5),
            during="x",
        )
