"""Fail points: the server kills itself (SIGKILL, as `kill -9` would) at a named step.

They exist to prove crash consistency: the crash tests arm one step, make the
server die exactly there, start it again and check that every unfinished
operation completes exactly once. Off unless ``CP_FAILPOINT_FILE`` names a file;
the file, written by the test when it is ready, holds the name of the step to die
at (read at each step, so a test can arm it after its set-up). Steps, in the
order a change passes them:

- ``job.claimed``        jobs claimed (running, leased), not started
- ``build.started``      build BUILDING recorded, the backend not called yet
- ``build.finished``     the backend built the artifact; the result not recorded
- ``build.recorded``     build BUILT (and, with deploy, the apply job) committed
- ``apply.prepared``     the rollout recorded; the Serve config not applied yet
- ``apply.applied``      the Serve config applied; not yet marked applied
- ``apply.marked``       marked applied; the reconciler takes over
- ``reconcile.writing``  inside a reconcile transaction (it must roll back)
- ``job.done``           a job's work done; the job not yet marked done
- ``rpc.committed``      a mutation's change and its audit record committed; the RPC
                         not answered yet
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "CP_FAILPOINT_FILE"

STEPS = (
    "job.claimed",
    "build.started",
    "build.finished",
    "build.recorded",
    "apply.prepared",
    "apply.applied",
    "apply.marked",
    "reconcile.writing",
    "job.done",
    "rpc.committed",
)


def hit(step: str) -> None:
    """Dies here if ``step`` is armed; a no-op (one env lookup) otherwise."""
    path = os.environ.get(ENV)
    if not path:
        return
    assert step in STEPS, step
    try:
        armed = Path(path).read_text().strip()
    except FileNotFoundError:
        return
    if armed == step:
        log.critical("fail point %s: killing the server (SIGKILL)", step)
        os.kill(os.getpid(), signal.SIGKILL)
