"""An in-process backend for fast tests and local development (``--backend fake``).

It builds for real (``builder.run_build`` in a thread) but only *simulates*
serving: replicas get ids and pids, start after ``start_delay_s``, scale in
place when only ``replicas`` changes and are all replaced on any other change,
and replicas asking for more GPUs than the fake cluster has never start. It
serves no HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

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

_pids = itertools.count(10_000)


@dataclass
class _Replica:
    id: str
    pid: int
    ready_at: float
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
    ) -> None:
        self.num_gpus = num_gpus
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
        return None

    async def close(self) -> None:
        self.apps.clear()

    async def build(self, spec: BuildSpec) -> BuildOutcome:
        return await asyncio.to_thread(run_build, spec)

    def _new_replica(self) -> _Replica:
        return _Replica(
            id=uuid.uuid4().hex[:8],
            pid=next(_pids),
            ready_at=time.monotonic() + self.start_delay_s,
            start_time=datetime.now(UTC),
        )

    async def apply(self, apps: Sequence[AppSpec]) -> None:
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

    async def observe(self) -> Mapping[str, AppObservation]:
        now = time.monotonic()
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
                app_name=name, status=status, message=message, replicas=replicas
            )
        return out
