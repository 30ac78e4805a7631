"""What the tests share besides fixtures (those stay in the conftest.py files):

- here: ``eventually`` (every wait for something to become true), ``gated`` (a model whose
  import waits for a file the test creates), ``app_spec`` (an application handed to a
  backend directly) and the repository's paths;
- ``databases``: PostgreSQL databases of a test's own;
- ``api``: a control plane in this process on the fake backend, and the gRPC calls of a
  workflow (create, upload, build, wait) with their errors;
- ``servers``: `modelctl serve` processes, and commands run to their end;
- ``ray_cluster``: a control plane on the session's Ray cluster, and a steady load;
- ``certs``: a CA of the test's own and the certificates it issues.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar, overload

from workers.backend import AppSpec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

T = TypeVar("T")


# ``timeout`` is how long the condition may take to come true, which the failure reports:
# not a cancel scope that asyncio.timeout could be around the call (ruff's ASYNC109).
@overload
async def eventually(
    what: str,
    check: Callable[[], Awaitable[T]],
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
) -> T: ...


@overload
async def eventually(
    what: str,
    check: Callable[[], T],
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
) -> T: ...


async def eventually(
    what: str,
    check: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109
    interval: float = 0.05,
) -> T:
    """Calls ``check`` (sync or async) every ``interval`` seconds until it returns a truthy
    value, and returns that value. Not yet true: it returns a falsy value or raises
    AssertionError. After ``timeout`` seconds it raises AssertionError naming ``what``, the
    timeout and what the last call returned or raised. An async ``check`` that hangs is
    cut off at the timeout too (given at least a second)."""
    deadline = time.monotonic() + timeout
    last = "no call had finished"
    cause: BaseException | None = None
    while True:
        # A call that hangs is cut off; one that starts just before the deadline has 1 s.
        cut_off = asyncio.timeout(max(deadline - time.monotonic(), interval, 1.0))
        try:
            value = check()
            if inspect.isawaitable(value):
                async with cut_off:
                    value = await value
        except AssertionError as e:
            last, cause = f"it raised {e!r}", e
        except TimeoutError as e:
            if not cut_off.expired():
                raise
            last, cause = f"a call did not finish in time (before it: {last})", e
        else:
            if value:
                return value
            last, cause = f"it returned {value!r}", None
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{what}: not true after {timeout:g} s; {last}") from cause
        await asyncio.sleep(min(interval, left))


def gated(gate: Path, model: str) -> str:
    """``model``'s source, its import held until the file ``gate`` exists: its build stays
    at the import check (step 3/4) until the test, having seen what it waits for, creates
    ``gate``. The build's own timeout bounds a gate never opened."""
    wait = (
        f"import os as _os, time as _time\nwhile not _os.path.exists({str(gate)!r}):\n"
        "    _time.sleep(0.02)\n"
    )
    return wait + model


def app_spec(name: str) -> AppSpec:
    """An application for a backend's ``apply``, named ``name``, one replica of a build
    whose artifact is nowhere: what the backend does with it, not what it serves."""
    return AppSpec(
        app_name=name,
        route_prefix=f"/{name}",
        model_name=f"projects/p/models/{name}",
        deployment_name=f"projects/p/models/{name}/deployments/1",
        build_name=f"projects/p/models/{name}/builds/1",
        artifact_path="/nowhere",
        file_path="model.py",
        function_name="predict",
        replicas=1,
        cpus=0.1,
        memory_mib=0,
        gpus=0,
    )
