"""The Ray driver runs in a process of its own (``workers.driver``): calls and their
errors cross the socket, a cancelled call is cancelled in the driver, a driver that ends
is replaced (and ``on_reconnected``'s callbacks run), and no driver outlives its server.
A probe backend stands in for Ray here; tests/ray/test_ray_restart.py runs the real one."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, app_spec, eventually
from workers.backend import BuildSpec, ClusterUnavailable
from workers.driver import DriverBackend

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return state != "Z"


def probe_backend(folder: Path) -> DriverBackend:
    """A driver running the probe backend, which reports into ``folder``."""
    return DriverBackend(
        "http://127.0.0.1:1",
        "tests.helpers.driven:Probe",
        silent_s=2.0,
        folder=str(folder),
        http_host="127.0.0.1",
        http_port=1,
    )


@pytest.fixture
async def driven(tmp_path: Path) -> AsyncIterator[DriverBackend]:
    backend = probe_backend(tmp_path)
    await backend.start()
    yield backend
    await backend.close()


async def test_calls_and_their_errors_cross_to_the_driver(
    driven: DriverBackend, tmp_path: Path
) -> None:
    pid = int((tmp_path / "pid").read_text())
    assert pid == driven.driver_pid and pid != os.getpid(), "the backend runs in the driver"
    assert driven.available()
    await driven.apply([app_spec("a"), app_spec("b")])
    first = await driven.observe()
    assert sorted(first) == ["a", "b"]
    # Only changes cross (workers.observations): the server still holds the whole set,
    # and what did not change is the object it had.
    await driven.apply([app_spec("b"), app_spec("c")])
    second = await driven.observe()
    assert sorted(second) == ["b", "c"] and second["b"] is first["b"]
    with pytest.raises(ClusterUnavailable, match="the probe says so"):
        await driven.nodes()
    with pytest.raises(ValueError, match="bad cursor 7"):
        await driven.signals("e", 7)
    assert (await driven.runtime()).python_version.startswith(f"{sys.version_info[0]}.")


async def test_a_cancelled_call_is_cancelled_in_the_driver(
    driven: DriverBackend, tmp_path: Path
) -> None:
    build = BuildSpec("projects/p/models/m/builds/9", tmp_path, "m.py", "f", tmp_path, tmp_path)
    running = asyncio.ensure_future(driven.build(build))
    await eventually("the build running in the driver", (tmp_path / "building").exists, 10)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await eventually("the build cancelled in the driver", (tmp_path / "cancelled").exists, 10)
    assert (tmp_path / "cancelled").read_text() == build.build_name
    await driven.apply([app_spec("after")])  # the driver goes on


async def test_a_driver_that_ends_is_replaced_and_models_are_applied_again(
    driven: DriverBackend, tmp_path: Path
) -> None:
    told = asyncio.Event()

    async def reconnected() -> None:
        told.set()

    driven.on_reconnected(reconnected)
    await driven.apply([app_spec("a")])
    first = driven.driver_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await asyncio.wait_for(told.wait(), 30)
    assert driven.driver_pid not in (None, first) and driven.drivers_started == 2
    assert int((tmp_path / "pid").read_text()) == driven.driver_pid
    assert driven.available()
    assert sorted(await driven.observe()) == ["a"]
    assert not alive(first)


async def test_a_driver_whose_loop_hangs_is_replaced(driven: DriverBackend) -> None:
    """A call into Ray that never returns on the driver's loop (the cluster gone in the
    middle of it) stops its beats: the driver is replaced, and calls work again."""
    told = asyncio.Event()

    async def reconnected() -> None:
        told.set()

    driven.on_reconnected(reconnected)
    first = driven.driver_pid
    hung = asyncio.ensure_future(driven._call("freeze"))
    await asyncio.wait_for(told.wait(), 30)
    assert driven.driver_pid != first and driven.available()
    with pytest.raises(ClusterUnavailable):
        await hung  # the call in flight ends with its driver
    await driven.apply([app_spec("after")])
    assert first is not None and not alive(first)


async def test_close_closes_the_backend_in_the_driver_and_ends_it(tmp_path: Path) -> None:
    backend = probe_backend(tmp_path)
    await backend.start()
    pid = backend.driver_pid
    assert pid is not None
    await backend.close()
    assert (tmp_path / "closed").read_text() == str(pid)
    assert not alive(pid)
    with pytest.raises(ClusterUnavailable):
        await backend.observe()


async def test_the_driver_dies_with_a_server_killed_with_sigkill(tmp_path: Path) -> None:
    """A server killed with -9 leaves no driver behind (nor a local Ray it started)."""
    program = textwrap.dedent(
        f"""
        import asyncio
        from workers.driver import DriverBackend

        async def main():
            b = DriverBackend("http://127.0.0.1:1", "tests.helpers.driven:Probe",
                              folder={str(tmp_path)!r}, http_host="127.0.0.1", http_port=1)
            await b.start()
            print(b.driver_pid, flush=True)
            await asyncio.Event().wait()  # until it is killed

        asyncio.run(main())
        """
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", program, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        driver = int(await asyncio.wait_for(server.stdout.readline(), 30))
        assert alive(driver)
    finally:
        server.kill()
        await server.wait()

    async def gone() -> bool:
        return not alive(driver)

    await eventually(f"driver {driver} gone with its server", gone, 10, 0.05)
