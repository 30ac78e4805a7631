"""An in-process backend for fast tests and local development (``--backend fake``).

It builds for real (``builder.run_build`` in a thread) but only *simulates*
serving: replicas get ids and pids, start after ``start_delay_s``, scale in
place when only ``replicas`` changes and are all replaced on any other change,
and replicas asking for more GPUs than the fake cluster has never start. Like
Serve with ``max_surge_percent=100``, a rolling change keeps the replicas from
before it until every new one runs, and a change reverted before that (a failed
rollout going back to its last good spec) keeps them. It serves no HTTP. With a
``state_file`` its "cluster" outlives the process, as a real Ray cluster outlives a
control plane that crashes, and several servers share it as they would share one
Ray cluster: the crash and two-server tests use it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workers.backend import (
    AppObservation,
    AppSpec,
    AppStatus,
    AutoscalingSpec,
    BuildOutcome,
    BuildSpec,
    EndpointAccess,
    NodeResources,
    ReplicaObservation,
    ReplicaStatus,
    TrafficShare,
    rolls,
)
from workers.builder import run_build
from workers.runtime import Runtime
from workers.runtime import current as current_runtime
from workers.signals import Batch, Collector, ProxyFigures, Report


@dataclass
class _Replica:
    id: str
    pid: int
    ready_at: float  # wall clock (time.time()), so a saved cluster means the same later
    start_time: datetime
    fails: str = ""  # started while a test made its app fail at start: never runs


@dataclass
class _App:
    spec: AppSpec
    replicas: list[_Replica] = field(default_factory=list)
    # A rolling change in progress: the spec before it and its replicas, which keep
    # serving until every new replica runs (Serve's max_surge_percent=100).
    retiring_spec: AppSpec | None = None
    retiring: list[_Replica] = field(default_factory=list)


class FakeBackend:
    def __init__(
        self,
        num_gpus: float = 0,
        start_delay_s: float = 0.05,
        http_base: str = "http://127.0.0.1:0",
        state_file: Path | None = None,
        num_cpus: float = 8.0,
        memory_mib: int = 16 * 1024,
    ) -> None:
        self.num_gpus = num_gpus
        self.num_cpus = num_cpus
        self.memory_mib = memory_mib
        # Tests: requests in flight on an application; its autoscaler (instant, no
        # delays) wants ceil(load / target) replicas within the bounds.
        self.load: dict[str, float] = {}
        self.state_file = state_file
        self.start_delay_s = start_delay_s
        self._http_base = http_base
        self.apps: dict[str, _App] = {}
        self.applies = 0
        # Tests can make a model's start fail: app name -> Serve-like message (replicas
        # started while it is set never run).
        self.fail_start: dict[str, str] = {}
        # Tests: the cluster cannot be reached (observe and apply raise ConnectionError).
        self.unreachable = False
        self._reconnected: list[Callable[[], Awaitable[None]]] = []
        # Tests: builds wait (as a Ray task waits for free CPUs) until this is set.
        self.builds_may_start = asyncio.Event()
        self.built = asyncio.Event()  # cleared by a test: applies wait (until_built)
        self.built.set()
        self.builds_may_start.set()
        # Tests: the runtime the "cluster" reports (builds run here, with this Python).
        self.cluster_runtime: Runtime = current_runtime()
        # Tests: replicas' reports and proxies' figures, as they would come from Ray.
        self.collector = Collector()
        self.proxies: dict[str, ProxyFigures] = {}

    @property
    def http_base(self) -> str:
        return self._http_base

    def available(self) -> bool:
        return not self.unreachable

    def on_reconnected(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._reconnected.append(callback)

    async def reconnected(self) -> None:
        """Tests: the cluster is back after an outage (a new one: nothing runs)."""
        self.unreachable = False
        for callback in self._reconnected:
            await callback()

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

    def report(self, *reports: Report) -> None:
        """Tests: what replicas would push (made-up figures and lines)."""
        self.collector.push(reports)

    async def signals(self, epoch: str, cursor: int) -> Batch:
        self._reachable()
        batch = self.collector.read(epoch, cursor)
        return Batch(
            epoch=batch.epoch,
            cursor=batch.cursor,
            replicas=batch.replicas,
            lines=batch.lines,
            proxies=tuple(self.proxies.values()),
            lines_lost=batch.lines_lost,
        )

    def _reachable(self) -> None:
        if self.unreachable:
            raise ConnectionError("the fake cluster cannot be reached")

    async def build(self, spec: BuildSpec) -> BuildOutcome:
        await self.builds_may_start.wait()
        cancel = threading.Event()
        running = asyncio.ensure_future(asyncio.to_thread(run_build, spec, cancel))
        running.add_done_callback(_consume)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            cancel.set()  # the build stops at its next step and removes its staging folder
            await asyncio.wait([running])
            raise

    async def runtime(self) -> Runtime:
        return self.cluster_runtime

    def _new_replica(self, app_name: str) -> _Replica:
        return _Replica(
            id=uuid.uuid4().hex[:8],
            pid=10_000 + uuid.uuid4().int % 1_000_000,
            ready_at=time.time() + self.start_delay_s,
            start_time=datetime.now(UTC),
            fails=self.fail_start.get(app_name, ""),
        )

    def _placeable(self, spec: AppSpec) -> bool:
        return spec.gpus == 0 or spec.gpus * spec.replicas <= self.num_gpus

    def _target(self, name: str, spec: AppSpec, current: int | None) -> int:
        """How many replicas the application should have: its count, or what its
        autoscaler decides (the load a test set, else the count it has, within bounds)."""
        a = spec.autoscaling
        if a is None:
            return spec.replicas
        if name in self.load:
            wanted = -(-self.load[name] // a.target_ongoing_requests)
        else:
            wanted = spec.replicas if current is None else current
        return int(min(max(wanted, a.min_replicas), a.max_replicas))

    def _scale(self, name: str, app: _App, current: int | None) -> None:
        want = self._target(name, app.spec, current)
        while len(app.replicas) < want:
            app.replicas.append(self._new_replica(name))
        del app.replicas[want:]

    async def nodes(self) -> Sequence[NodeResources]:
        """One node with all of its resources free: like ``_placeable``, the fake places
        each application as if it were alone on the cluster (tests on one shared database
        leave other tests' models deployed; they must not take this test's room)."""
        self._reachable()
        return [
            NodeResources(
                node="fake-node",
                cpus_total=self.num_cpus,
                cpus_free=self.num_cpus,
                gpus_total=self.num_gpus,
                gpus_free=self.num_gpus,
                memory_total_mib=self.memory_mib,
                memory_free_mib=self.memory_mib,
            )
        ]

    def _runs(self, app: _App, r: _Replica, now: float) -> bool:
        return self._placeable(app.spec) and not r.fails and now >= r.ready_at

    def _rolled(self, app: _App, now: float) -> bool:
        """Whether the rolling change in progress is over: every new replica runs."""
        return all(self._runs(app, r, now) for r in app.replicas)

    async def until_built(self) -> int:
        """Builds nothing (its applications are ready as applied); a test that clears
        ``built`` holds every apply here, as Serve building an application would."""
        self._reachable()
        if self.built.is_set():
            return 0
        await self.built.wait()
        return 1

    async def apply(self, apps: Sequence[AppSpec]) -> None:
        self._reload()
        self._reachable()
        self.applies += 1
        wanted = {a.app_name: a for a in apps}
        for name in list(self.apps):
            if name not in wanted:
                del self.apps[name]
        now = time.time()
        for name, spec in wanted.items():
            app = self.apps.get(name)
            current = None if app is None else len(app.replicas)
            if app is None:
                app = self.apps[name] = _App(spec)
            elif app.retiring_spec is not None and self._rolled(app, now):
                app.retiring_spec, app.retiring = None, []
            if rolls(app.spec, spec):
                if app.retiring_spec is not None and not rolls(app.retiring_spec, spec):
                    # Back to the spec before the change (it failed): its replicas never
                    # stopped, and they are what serves again.
                    app.replicas, app.retiring_spec, app.retiring = app.retiring, None, []
                else:
                    if app.retiring_spec is None:  # (a change on a change: the oldest serve)
                        app.retiring_spec, app.retiring = app.spec, app.replicas
                    app.replicas = []
            app.spec = spec
            self._scale(name, app, current)
        self._save()

    # ---- what happens behind the control plane's back (tests) ------------------------------

    def delete_app(self, name: str) -> None:
        """Someone deletes the application from the cluster directly."""
        self._reload()
        del self.apps[name]
        self._save()

    def delete_all(self) -> None:
        """The cluster restarted: nothing runs on it any more."""
        self._reload()
        self.apps.clear()
        self._save()

    def kill_replica(self, name: str, replica_id: str) -> None:
        """A replica dies; like Serve, the cluster starts a new one in its place."""
        self._reload()
        app = self.apps[name]
        if any(r.id == replica_id for r in app.retiring):  # an old one: not replaced
            app.retiring = [r for r in app.retiring if r.id != replica_id]
        else:
            app.replicas = [r for r in app.replicas if r.id != replica_id]
            app.replicas.append(self._new_replica(name))
        self._save()

    async def observe(self) -> Mapping[str, AppObservation]:
        self._reload()
        self._reachable()
        now = time.time()
        out: dict[str, AppObservation] = {}
        for name, app in self.apps.items():
            if app.spec.autoscaling is not None and name in self.load:
                self._scale(name, app, len(app.replicas))
            placeable = self._placeable(app.spec)
            failure = next((r.fails for r in app.replicas if r.fails), "")
            old = [] if self._rolled(app, now) else app.retiring
            replicas = tuple(
                ReplicaObservation(
                    id=r.id,
                    pid=r.pid,
                    node="fake-node",
                    start_time=r.start_time,
                    state=ReplicaStatus.RUNNING
                    if r in old or self._runs(app, r, now)
                    else ReplicaStatus.STARTING,
                )
                for r in [*old, *app.replicas]
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
                target_replicas=len(app.replicas),
            )
        if self.load:
            self._save()
        return out


def _load(path: Path) -> dict[str, _App]:
    data: dict[str, Any] = json.loads(path.read_text())
    apps: dict[str, _App] = {}
    for name, app in data.items():
        retiring_spec = app.get("retiring_spec")
        apps[name] = _App(
            spec=_load_spec(app["spec"]),
            replicas=[_load_replica(r) for r in app["replicas"]],
            retiring_spec=_load_spec(retiring_spec) if retiring_spec else None,
            retiring=[_load_replica(r) for r in app.get("retiring", [])],
        )
    return apps


def _load_spec(spec: Mapping[str, Any]) -> AppSpec:
    access = spec.get("access") or {}
    share = spec.get("share")
    autoscaling = spec.get("autoscaling")
    return AppSpec(
        **{
            **spec,
            "access": EndpointAccess(access.get("open", True), tuple(access.get("key_hashes", ()))),
            "share": TrafficShare(**share) if share else None,
            "autoscaling": AutoscalingSpec(**autoscaling) if autoscaling else None,
        }
    )


def _load_replica(r: Mapping[str, Any]) -> _Replica:
    return _Replica(
        id=r["id"],
        pid=r["pid"],
        ready_at=r["ready_at"],
        start_time=datetime.fromisoformat(r["start_time"]),
        fails=r.get("fails", ""),
    )


def _save(path: Path, apps: Mapping[str, _App]) -> None:
    """Atomically (a crash leaves the old or the new cluster, never half of one)."""

    def replicas(rs: list[_Replica]) -> list[dict[str, Any]]:
        return [{**asdict(r), "start_time": r.start_time.isoformat()} for r in rs]

    data = {
        name: {
            "spec": asdict(app.spec),
            "replicas": replicas(app.replicas),
            "retiring_spec": asdict(app.retiring_spec) if app.retiring_spec else None,
            "retiring": replicas(app.retiring),
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
