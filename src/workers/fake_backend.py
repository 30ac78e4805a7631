"""An in-process backend for fast tests and local development (``--backend fake``).

It builds for real (``builder.run_build`` in a thread) but only *simulates*
serving: replicas get ids and pids, start after ``start_delay_s``, scale in
place when only ``replicas`` changes and are all replaced on any other change,
and replicas asking for more GPUs than the fake cluster has never start. It
serves no HTTP. With a ``state_file`` its "cluster" outlives the process, as a
real Ray cluster outlives a control plane that crashes, and several servers share
it as they would share one Ray cluster: the crash and two-server tests use it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workers.backend import (
    AppObservation,
    AppSpec,
    AppStatus,
    BuildOutcome,
    BuildSpec,
    ReplicaObservation,
    ReplicaStatus,
    rolls,
)
from workers.builder import run_build


@dataclass
class _Replica:
    id: str
    pid: int
    ready_at: float  # wall clock (time.time()), so a saved cluster means the same later
    start_time: datetime


@dataclass
class _App:
    spec: AppSpec
    replicas: list[_Replica] = field(default_factory=list)


class FakeBackend:
    def __init__(
        self,
        num_gpus: float = 0,
        start_delay_s: float = 0.05,
        http_base: str = "http://127.0.0.1:0",
        state_file: Path | None = None,
    ) -> None:
        self.num_gpus = num_gpus
        self.state_file = state_file
        self.start_delay_s = start_delay_s
        self._http_base = http_base
        self.apps: dict[str, _App] = {}
        self.applies = 0
        # Tests can make a model's start fail: app name -> Serve-like message.
        self.fail_start: dict[str, str] = {}

    @property
    def http_base(self) -> str:
        return self._http_base

    async def start(self) -> None:
        self._reload()

    def _reload(self) -> None:
        """With a state file the cluster is shared (several servers, or a restart): read it."""
        if self.state_file is not None and self.state_file.exists():
            self.apps = _load(self.state_file)

    async def close(self) -> None:
        self.apps.clear()

    def _save(self) -> None:
        if self.state_file is not None:
            _save(self.state_file, self.apps)

    async def build(self, spec: BuildSpec) -> BuildOutcome:
        cancel = threading.Event()
        running = asyncio.ensure_future(asyncio.to_thread(run_build, spec, cancel))
        running.add_done_callback(_consume)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            cancel.set()  # the build stops at its next step and removes its staging folder
            await asyncio.wait([running])
            raise

    def _new_replica(self) -> _Replica:
        return _Replica(
            id=uuid.uuid4().hex[:8],
            pid=10_000 + uuid.uuid4().int % 1_000_000,
            ready_at=time.time() + self.start_delay_s,
            start_time=datetime.now(UTC),
        )

    async def apply(self, apps: Sequence[AppSpec]) -> None:
        self._reload()
        self.applies += 1
        wanted = {a.app_name: a for a in apps}
        for name in list(self.apps):
            if name not in wanted:
                del self.apps[name]
        for name, spec in wanted.items():
            app = self.apps.get(name)
            if app is None or rolls(app.spec, spec):
                app = self.apps[name] = _App(spec)
            app.spec = spec
            while len(app.replicas) < spec.replicas:
                app.replicas.append(self._new_replica())
            del app.replicas[spec.replicas :]
        self._save()

    # ---- what happens behind the control plane's back (tests) ------------------------------

    def delete_app(self, name: str) -> None:
        """Someone deletes the application from the cluster directly."""
        self._reload()
        del self.apps[name]
        self._save()

    def kill_replica(self, name: str, replica_id: str) -> None:
        """A replica dies; like Serve, the cluster starts a new one in its place."""
        self._reload()
        app = self.apps[name]
        app.replicas = [r for r in app.replicas if r.id != replica_id] + [self._new_replica()]
        self._save()

    async def observe(self) -> Mapping[str, AppObservation]:
        self._reload()
        now = time.time()
        out: dict[str, AppObservation] = {}
        for name, app in self.apps.items():
            placeable = app.spec.gpus * app.spec.replicas <= self.num_gpus or app.spec.gpus == 0
            failure = self.fail_start.get(name)
            replicas = tuple(
                ReplicaObservation(
                    id=r.id,
                    pid=r.pid,
                    node="fake-node",
                    start_time=r.start_time,
                    state=ReplicaStatus.RUNNING
                    if placeable and not failure and now >= r.ready_at
                    else ReplicaStatus.STARTING,
                )
                for r in app.replicas
            )
            if failure:
                status, message = AppStatus.DEPLOY_FAILED, failure
            elif not placeable:
                status = AppStatus.DEPLOYING
                message = (
                    f"Deployment cannot be scheduled: {app.spec.gpus:g} GPUs per replica "
                    f"requested, {self.num_gpus:g} in the cluster"
                )
            elif all(r.state is ReplicaStatus.RUNNING for r in replicas):
                status, message = AppStatus.RUNNING, ""
            else:
                status, message = AppStatus.DEPLOYING, ""
            out[name] = AppObservation(
                app_name=name,
                status=status,
                message=message,
                replicas=replicas,
                unplaceable="" if placeable else message,
            )
        return out


def _load(path: Path) -> dict[str, _App]:
    data: dict[str, Any] = json.loads(path.read_text())
    apps: dict[str, _App] = {}
    for name, app in data.items():
        spec = dict(app["spec"])
        apps[name] = _App(
            spec=AppSpec(**spec),
            replicas=[
                _Replica(
                    id=r["id"],
                    pid=r["pid"],
                    ready_at=r["ready_at"],
                    start_time=datetime.fromisoformat(r["start_time"]),
                )
                for r in app["replicas"]
            ],
        )
    return apps


def _save(path: Path, apps: Mapping[str, _App]) -> None:
    """Atomically (a crash leaves the old or the new cluster, never half of one)."""
    data = {
        name: {
            "spec": asdict(app.spec),
            "replicas": [
                {**asdict(r), "start_time": r.start_time.isoformat()} for r in app.replicas
            ],
        }
        for name, app in apps.items()
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _consume(done: asyncio.Future[BuildOutcome]) -> None:
    """Retrieves the result of a build nobody awaits any more (it was cancelled)."""
    if not done.cancelled():
        done.exception()
