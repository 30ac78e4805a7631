"""Soak: random changes under load, the server and replicas killed, watchers and operations
checked to the last event.

Starts one local Ray cluster for the whole run (raycluster.py: `ray start --head --block`,
4 logical CPUs, its own process group) and `modelctl serve --ray-address=...` on it
(SQLite in a temp dir) on FIXED ports (--grpc-port, --http-port and --server-id chosen
once), so that after a `kill -9` the same command starts it again at the same address and
it takes its unfinished jobs back at once. Three models serve the iris example
(examples/iris-v1, `predict`; 1 replica, 0.1 CPU each) under a paced open-loop load of 4
requests/s each (--rate; traffic.py's Paced, raw HTTP/1.1 on 127.0.0.1 only). Then, for
600 s (--seconds; --smoke: 30 s):

- **changes**, one at a time, on a random model, each call with a request_id (a uuid):
  scale (1 <-> 2 replicas), a new build deployed with it, a rollback (deploy an older
  build), a restart, a stop then start (CreateDeployment of its current build; the load
  leaves that model alone from just before the stop until its endpoint answers again).
  A call that fails UNAVAILABLE (or past its deadline) while the server is down is sent
  again with the SAME request_id; every operation accepted is waited on (WaitOperation)
  through every restart.
- **the server killed**: every 60 s (--smoke: once, at ~10 s) SIGKILL, then the same
  command again. Its RSS (VmRSS) is read after the first warm-up, 5 s into each later
  incarnation, and before each kill and at the end: growth per incarnation.
- **a replica killed**: every 30 s (--smoke: once, at ~20 s) SIGKILL to a random replica
  of a serving model (its pid from GetDeployment's replicas), of a model with two running
  when there is one; then the time until GetDeployment shows it replaced.
- **watchers**: 1,000 WatchModels streams on the project (--watchers; --smoke: 50) in 4
  child processes (--processes; the client is not what is measured), all from the same
  revision. A stream remembers the last revision it got and, when it breaks, opens again
  with since_revision=last (wait_for_ready: it waits for the server to come back).

At the end, each operation accepted is looked up: lost = the server no longer knows it
(NOT_FOUND), stuck = not done 180 s after the run. Every stream's revisions (not
BOOKMARKs) up to the head revision at the end must be the same list as a reference
stream (replayed from the first revision after the run): gaps (a revision missed),
repeats (one seen twice or out of order) and extras are counted. Failed requests are
split by cause: "replica killed" (on that model, in flight at the kill or sent within 2 s
after it); "sole replica killed, until replaced" (its model's only running replica: sent
before its replacement ran, plus 2 s; nothing serves that model meanwhile); "server
killed" (sent while the control plane was down, or within 2 s after it was back: Serve
keeps serving without it, so it should be 0); "other".

Exits 1 if any operation is lost or stuck, any stream has a gap, a repeat or an extra,
or a request failed for another cause. Writes bench/results/soak.json (with the machine
it ran on and the "smoke" flag).

    .venv/bin/python bench/soak.py [--seconds 600] [--watchers 1000] [--processes 4]
        [--rate 4] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import multiprocessing
import os
import random
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from queue import Empty
from typing import Any, TypeVar, cast

import grpc
from httpload import warm_up
from procstat import rss_mb
from raycluster import Cluster, free_port, start_cluster, stop_cluster
from run import machine
from serverproc import MODELCTL, Row, Stub, save_result, start_process
from traffic import EXAMPLE, Answer, Endpoint, Paced

from controlplane.api.client import Client, ClientError
from controlplane.domain.states import BuildState, EventType, ReplicaState
from controlplane.domain.types import DeployOptions, Event, Operation, Resources
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from workers.archive import zip_directory

PROJECT = "projects/soak"
MODELS = ("iris-a", "iris-b", "iris-c")
CPUS = 0.1
RATE = 4.0  # requests/s to each model
RETRY = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN"}  # sent again, same request_id
STUCK_S = 180.0  # an operation not done this long after the run is stuck
REPLICA_WINDOW_S = 2.0  # failures this long after a replica's kill are its own
REPLACED_S = 120.0  # how long a killed replica's replacement is waited for
SERVER_WINDOW_S = 2.0  # and this long after the server is back
KINDS = ("scale", "new_build", "rollback", "restart", "stop_start")
STARTED = time.perf_counter()
T = TypeVar("T")


def say(what: str) -> None:
    """A line of progress, with the seconds since this script started."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {what}", flush=True)


# ---- watchers, in child processes ---------------------------------------------------------

# A broken stream's channel tries again soon (gRPC's default backoff grows to minutes).
BACKOFF = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
FINISH_S = 60.0  # once told the last revision, how long streams may take to reach it


def watch_child(
    address: str,
    since: int,
    ids: list[int],
    ready: Any,  # multiprocessing.Queue: one item per stream that got its first event
    results: Any,  # multiprocessing.Queue: this child's one result
    head: Synchronized[int],  # 0 until the run ends; then the last revision to reach
) -> None:
    """A child's streams (spawned: nothing of the parent's gRPC state comes with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    results.put(asyncio.run(_watch(address, since, ids, ready, head)))


async def _watch(
    address: str, since: int, ids: list[int], ready: Any, head: Synchronized[int]
) -> dict[str, Any]:
    channels = [
        grpc.aio.insecure_channel(address, options=BACKOFF) for _ in range((len(ids) + 99) // 100)
    ]
    seen: dict[int, list[int]] = {i: [] for i in ids}
    last = dict.fromkeys(ids, since)
    resumes: collections.Counter[str] = collections.Counter()

    async def follow(stub: Stub, i: int) -> None:
        while True:
            call = stub.WatchModels(
                rpc.WatchModelsRequest(parent=PROJECT, since_revision=last[i]),
                wait_for_ready=True,
            )
            try:
                async for event in call:
                    if event.type == pb.EVENT_TYPE_BOOKMARK:
                        continue
                    if not seen[i]:
                        ready.put(1)
                    seen[i].append(event.revision)
                    last[i] = max(last[i], event.revision)
                resumes["ended"] += 1
            except grpc.aio.AioRpcError as e:
                resumes[e.code().name] += 1
            finally:
                call.cancel()
            await asyncio.sleep(0.2 + random.random() * 0.3)

    tasks = {
        i: asyncio.create_task(follow(Stub(channels[k % len(channels)]), i))
        for k, i in enumerate(ids)
    }
    deadline = None
    while tasks:
        await asyncio.sleep(0.2)
        if not head.value:
            continue
        deadline = deadline or time.monotonic() + FINISH_S
        for i in [i for i in tasks if last[i] >= head.value]:
            tasks.pop(i).cancel()
        if time.monotonic() > deadline:
            break
    incomplete = sorted(tasks)
    for task in tasks.values():
        task.cancel()
    await asyncio.sleep(0.1)
    for ch in channels:
        await ch.close()
    return {"seen": seen, "resumes": dict(resumes), "incomplete": incomplete}


@dataclass
class Watchers:
    """``n`` streams over ``processes`` children, all from revision ``since``."""

    address: str
    n: int
    processes: int
    since: int
    ctx: Any = field(default_factory=lambda: multiprocessing.get_context("spawn"))
    procs: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ready = self.ctx.Queue()
        self.results = self.ctx.Queue()
        self.head: Synchronized[int] = self.ctx.Value("q", 0)
        self.opened = 0

    def start(self) -> None:
        for p in range(self.processes):
            ids = list(range(p, self.n, self.processes))
            proc = self.ctx.Process(
                target=watch_child,
                args=(self.address, self.since, ids, self.ready, self.results, self.head),
                daemon=True,
            )
            proc.start()
            self.procs.append(proc)

    def wait_ready(self, seconds: float) -> int:
        """Until every stream got its first event; how many did."""
        deadline = time.monotonic() + seconds
        while self.opened < self.n and time.monotonic() < deadline:
            with contextlib.suppress(Empty):
                self.opened += self.ready.get(timeout=0.5)
        return self.opened

    def finish(self, head: int) -> list[dict[str, Any]]:
        """Each child's result, once its streams reached ``head`` (or FINISH_S passed)."""
        self.head.value = head
        out = []
        for _ in self.procs:
            with contextlib.suppress(Empty):
                out.append(self.results.get(timeout=FINISH_S + 60))
        return out

    def stop(self) -> None:
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def check_streams(reference: list[int], results: list[dict[str, Any]], head: int) -> dict[str, Any]:
    """Each stream's revisions up to ``head`` against the reference's."""
    ref = set(reference)
    gaps = repeats = extra = identical = 0
    counts: list[int] = []
    distinct: set[tuple[int, ...]] = set()
    resumes: collections.Counter[str] = collections.Counter()
    incomplete = 0
    for r in results:
        resumes.update(r["resumes"])
        incomplete += len(r["incomplete"])
        for revs in r["seen"].values():
            revs = [x for x in revs if x <= head]
            top = 0
            for x in revs:
                repeats += x <= top
                top = max(top, x)
            got = set(revs)
            gaps += len(ref - got)
            extra += len(got - ref)
            identical += revs == reference
            counts.append(len(revs))
            distinct.add(tuple(revs))
    return {
        "streams": len(counts),
        "reference_events": len(reference),
        "reference_in_order": reference == sorted(set(reference)),
        "identical_to_reference": identical,
        "distinct_lists": len(distinct),
        "gaps": gaps,
        "repeats": repeats,
        "extra": extra,
        "events_min": min(counts, default=0),
        "events_max": max(counts, default=0),
        "streams_without_events": sum(c == 0 for c in counts),
        "incomplete": incomplete,
        "resumes": dict(resumes),
    }


# ---- the control plane, through every restart ---------------------------------------------


@dataclass
class Op:
    name: str
    kind: str  # the change it belongs to
    model: str
    request_id: str
    accepted_at: float
    done: bool = False
    error: str = ""
    seconds: float = 0.0


@dataclass
class Kill:
    """A replica's SIGKILL: when, which, and when GetDeployment showed it replaced."""

    at: float
    model: str
    pid: int
    sole: bool  # its model's only running replica: nothing serves until it is replaced
    replaced_s: float | None = None

    def window_end(self) -> float:
        """Its model's failures sent up to here are its own: REPLICA_WINDOW_S after the
        kill; for a sole replica, REPLICA_WINDOW_S after its replacement runs."""
        if not self.sole:
            return self.at + REPLICA_WINDOW_S
        if self.replaced_s is None:
            return float("inf")
        return self.at + max(self.replaced_s, 0.0) + REPLICA_WINDOW_S


@dataclass
class ModelState:
    key: str
    name: str
    url: str
    sha: str
    build: str = ""
    replicas: int = 1


@dataclass
class Soak:
    address: str
    cmd: list[str]
    proc: Any  # subprocess.Popen[str]: the server's current incarnation
    c: Client = field(init=False)  # on the server's current incarnation
    clients: list[Client] = field(default_factory=list)  # every one, closed at the end
    ops: list[Op] = field(default_factory=list)
    changes: collections.Counter[str] = field(default_factory=collections.Counter)
    refused: list[str] = field(default_factory=list)
    retries: collections.Counter[str] = field(default_factory=collections.Counter)
    resent: int = 0  # changes whose first call failed and was sent again (same request_id)
    server_kills: list[tuple[float, float]] = field(default_factory=list)  # (killed, back)
    replica_kills: list[Kill] = field(default_factory=list)
    replacements: list[asyncio.Task[None]] = field(default_factory=list)
    rss: list[dict[str, Any]] = field(default_factory=list)  # one per incarnation
    notes: list[str] = field(default_factory=list)
    models: dict[str, ModelState] = field(default_factory=dict)
    load: Any = None  # Load

    async def call(self, fn: Callable[[Client], Awaitable[T]], deadline_s: float = 120) -> T:
        """``fn`` on the current server, again while it is down (same arguments, so the
        same request_id)."""
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                return await fn(self.c)
            except ClientError as e:
                if e.code not in RETRY or time.monotonic() > deadline:
                    raise
                self.retries[e.code] += 1
            await asyncio.sleep(0.5)

    async def accept(
        self, kind: str, model: str, fn: Callable[[Client, str], Awaitable[Operation]]
    ) -> Op | None:
        """One change's call with a request_id of its own; its operation, None if refused."""
        request_id = str(uuid.uuid4())
        tries = 0

        def attempt(c: Client) -> Awaitable[Operation]:
            nonlocal tries
            tries += 1
            return fn(c, request_id)

        try:
            op = await self.call(attempt)
        except ClientError as e:
            self.refused.append(f"{kind} {model}: {e}")
            say(f"  refused: {e}")
            return None
        rec = Op(op.name, kind, model, request_id, time.perf_counter())
        self.ops.append(rec)
        if tries > 1:
            self.resent += 1
            say(f"  {op.name} accepted after {tries} tries with one request_id")
        return rec

    async def settle(self, op: Op, seconds: float = STUCK_S) -> bool:
        """Waits on ``op`` through restarts; whether it is done (and without error)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                got = await self.call(lambda c: c.wait_operation(op.name, 5.0), seconds)
            except ClientError as e:
                op.error = str(e)
                say(f"  {op.name}: {e}")
                return False
            if got.done:
                op.done = True
                op.seconds = time.perf_counter() - op.accepted_at
                if got.error is not None:
                    op.error = f"{got.error.code} {got.error.reason}: {got.error.message}"
                    say(f"  {op.name} failed: {op.error}")
                return got.error is None
        return False

    async def sync(self, m: ModelState) -> None:
        """The model's current build and replicas, as the server has them."""
        model = await self.call(lambda c: c.get_model(m.name))
        if model.active_deployment:
            dep = await self.call(lambda c: c.get_deployment(model.active_deployment))
            m.build, m.replicas = dep.build, dep.resources.replicas

    # ---- the changes --------------------------------------------------------------------

    async def change(self, m: ModelState, kind: str) -> None:
        res = Resources(replicas=m.replicas, cpus=CPUS)
        older: list[str] = []
        if kind == "rollback":
            builds = await self.call(lambda c: c.list_builds(m.name, page_size=100))
            older = [b.name for b in builds.items if b.state == BuildState.BUILT]
            older = [b for b in older if b != m.build]
            if not older:
                kind = "new_build"
        self.changes[kind] += 1
        say(f"change {sum(self.changes.values())}: {kind} {m.key}")
        if kind == "scale":
            res = Resources(replicas=2 if m.replicas == 1 else 1, cpus=CPUS)
            op = await self.accept(
                kind,
                m.key,
                lambda c, rid: c.create_deployment(m.name, m.build, res, request_id=rid),
            )
        elif kind == "new_build":
            op = await self.accept(
                kind,
                m.key,
                lambda c, rid: c.create_build(
                    m.name, m.sha, "model.py", "predict", deploy=DeployOptions(res), request_id=rid
                ),
            )
        elif kind == "rollback":
            to = random.choice(older)
            op = await self.accept(
                kind, m.key, lambda c, rid: c.create_deployment(m.name, to, res, request_id=rid)
            )
        elif kind == "restart":
            op = await self.accept(
                kind, m.key, lambda c, rid: c.restart_model(m.name, request_id=rid)
            )
        else:
            op = await self.stop_start(m, res)
        if op is not None:
            await self.settle(op)
        await self.sync(m)

    async def stop_start(self, m: ModelState, res: Resources) -> Op | None:
        self.load.paused.add(m.key)  # its endpoint is gone while it is stopped
        await asyncio.sleep(1.0)  # the requests in flight end
        try:
            stop = await self.accept(
                "stop_start", m.key, lambda c, rid: c.stop_model(m.name, request_id=rid)
            )
            if stop is None or not await self.settle(stop):
                return None
            build = m.build
            start = await self.accept(
                "stop_start",
                m.key,
                lambda c, rid: c.create_deployment(m.name, build, res, request_id=rid),
            )
            if start is not None:
                await self.settle(start)
            try:
                await warm_up(m.url)
            except SystemExit as e:
                if not isinstance(e.code, str):  # SIGTERM's (raycluster), not warm_up's
                    raise
                self.notes.append(f"{m.key} after its start: {e}")
            return None
        finally:
            self.load.paused.discard(m.key)

    async def changes_until(self, end: float) -> None:
        deck: list[str] = []  # every kind once per round, in a random order
        while time.perf_counter() < end:
            if not deck:
                deck = random.sample(KINDS, len(KINDS))
            m = random.choice(list(self.models.values()))
            await self.change(m, deck.pop())
            await asyncio.sleep(random.uniform(1.0, 3.0))

    # ---- the kills ----------------------------------------------------------------------

    def start_incarnation_sample(self) -> None:
        self.rss.append({"pid": self.proc.pid, "start_mb": rss_mb([self.proc.pid])})

    async def kill_server(self) -> None:
        self.rss[-1]["end_mb"] = rss_mb([self.proc.pid])
        killed = time.perf_counter()
        self.proc.kill()
        await asyncio.to_thread(self.proc.wait)
        say("server killed (SIGKILL); starting it again")
        self.proc, address = await asyncio.to_thread(start_process, self.cmd)
        if address != self.address:
            raise SystemExit(f"the server came back at {address}, not {self.address}")
        back = time.perf_counter()
        self.server_kills.append((killed, back))
        # A new channel: the old one's reconnect backoff has grown while it was down.
        self.c = Client(self.address)
        self.clients.append(self.c)
        say(f"server back after {back - killed:.1f} s (pid {self.proc.pid})")
        await asyncio.sleep(5.0)  # its watchers back, its loops running
        self.rss.append({"pid": self.proc.pid, "start_mb": rss_mb([self.proc.pid])})

    async def running_pids(self, m: ModelState) -> list[int]:
        """The pids of the model's running replicas (GetDeployment)."""
        model = await self.call(lambda c: c.get_model(m.name))
        if not model.active_deployment:
            return []
        dep = await self.call(lambda c: c.get_deployment(model.active_deployment))
        return [r.pid for r in dep.replicas if r.state == ReplicaState.RUNNING and r.pid > 0]

    async def kill_replica(self) -> None:
        """A random replica of a serving model, one of a model with two running if there
        is one (the other must serve on); then its replacement is timed."""
        for _ in range(30):
            serving = [m for m in self.models.values() if m.key not in self.load.paused]
            found: list[tuple[ModelState, list[int]]] = []
            for m in serving:
                with contextlib.suppress(ClientError):
                    if pids := await self.running_pids(m):
                        found.append((m, pids))
            if found:
                pairs = [f for f in found if len(f[1]) > 1] or found
                m, pids = random.choice(pairs)
                pid = random.choice(pids)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    kill = Kill(time.perf_counter(), m.key, pid, sole=len(pids) == 1)
                    self.replica_kills.append(kill)
                    say(f"replica {pid} of {m.key} ({len(pids)} running) killed (SIGKILL)")
                    self.replacements.append(asyncio.create_task(self.replaced(kill, m, len(pids))))
                    return
            await asyncio.sleep(1.0)
        self.notes.append("no running replica to kill")

    async def replaced(self, kill: Kill, m: ModelState, wanted: int) -> None:
        """Until GetDeployment shows ``wanted`` running replicas again, none of them the
        killed one (or the model was changed meanwhile)."""
        deadline = time.monotonic() + REPLACED_S
        while time.monotonic() < deadline:
            with contextlib.suppress(ClientError):
                pids = await self.running_pids(m)
                if len([p for p in pids if p != kill.pid]) >= min(wanted, m.replicas):
                    kill.replaced_s = time.perf_counter() - kill.at
                    say(f"replica {kill.pid} of {m.key} replaced in {kill.replaced_s:.1f} s")
                    return
            await asyncio.sleep(0.5)

    async def chaos(self, start: float, kills: list[tuple[float, str]]) -> None:
        for at, what in kills:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            await (self.kill_server() if what == "server" else self.kill_replica())

    # ---- after the run ------------------------------------------------------------------

    async def lookup(self, name: str) -> Operation:
        return await self.call(lambda c: c.get_operation(name))

    async def verdict(self, run_end: float) -> dict[str, Any]:
        """Every operation accepted: lost (NOT_FOUND) or stuck (not done by STUCK_S)."""
        lost: list[str] = []
        for op in self.ops:
            try:
                got = await self.lookup(op.name)
            except ClientError as e:
                if e.code == "NOT_FOUND":
                    lost.append(op.name)
                    continue
                raise
            if not got.done:
                await self.settle(op, max(1.0, run_end + STUCK_S - time.perf_counter()))
            else:
                op.done = True
        stuck = [op.name for op in self.ops if not op.done and op.name not in lost]
        errors = collections.Counter(op.error.split(":")[0] for op in self.ops if op.error)
        return {
            "accepted": len(self.ops),
            "lost": len(lost),
            "stuck": len(stuck),
            "lost_names": lost,
            "stuck_names": stuck,
            "failed": sum(bool(op.error) for op in self.ops),
            "errors": dict(errors),
            "by_kind": dict(collections.Counter(op.kind for op in self.ops)),
            "seconds_max": max((op.seconds for op in self.ops), default=0.0),
            "refused": self.refused,
            "retried_calls": dict(self.retries),
            "changes_resent_same_request_id": self.resent,
        }

    def failures(self, answers: list[Answer]) -> dict[str, Any]:
        causes: dict[str, list[str]] = {
            "replica killed": [],
            "sole replica killed, until replaced": [],
            "server killed": [],
            "other": [],
        }
        for a in answers:
            if not a.outcome:
                continue
            end = a.due + a.ms / 1000
            mine = [k for k in self.replica_kills if k.model == a.target and end >= k.at]
            if any(a.due <= k.at + REPLICA_WINDOW_S for k in mine):
                cause = "replica killed"
            elif any(a.due <= k.window_end() for k in mine):
                cause = "sole replica killed, until replaced"
            elif any(k <= a.due <= b + SERVER_WINDOW_S for k, b in self.server_kills):
                cause = "server killed"
            else:
                cause = "other"
            causes[cause].append(f"{a.target} at {a.due - STARTED:.1f} s: {a.outcome}")
        return {
            "sent": len(answers),
            "by_model": dict(collections.Counter(a.target for a in answers)),
            "failed": {k: len(v) for k, v in causes.items()},
            "examples": {k: v[:5] for k, v in causes.items() if v},
        }


@dataclass
class Load(Paced):
    """traffic.py's paced load; a model in ``paused`` (stopped) is not sent anything."""

    paused: set[str] = field(default_factory=set)

    async def _one(self, endpoint: Endpoint, target: str, due: float) -> None:
        if target not in self.paused:
            await super()._one(endpoint, target, due)


async def head_revision(c: Client) -> int:
    """The latest revision: the BOOKMARK that ends a watch's snapshot carries it."""
    stream = cast(AsyncGenerator[Event, None], c.watch_models(PROJECT))
    async with contextlib.aclosing(stream):
        async for event in stream:
            if event.type == EventType.BOOKMARK:
                return event.revision
    raise SystemExit("WatchModels ended before its BOOKMARK")


async def replay(c: Client, since: int, head: int) -> list[int]:
    """The revisions after ``since`` up to ``head``, replayed from the server's records."""
    out: list[int] = []
    if head <= since:
        return out
    stream = cast(AsyncGenerator[Event, None], c.watch_models(PROJECT, since_revision=since))
    async with contextlib.aclosing(stream):
        async for event in stream:
            if event.type != EventType.BOOKMARK:
                out.append(event.revision)
                if event.revision >= head:
                    break
    return [r for r in out if r <= head]


# ---- the run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    seconds: float
    watchers: int
    processes: int
    rate: float
    kills: list[tuple[float, str]]  # (seconds into the run, "server" or "replica")


def schedule(seconds: float, smoke: bool) -> list[tuple[float, str]]:
    if smoke:
        return [(10.0, "server"), (20.0, "replica")]
    kills = [(float(t), "server") for t in range(60, int(seconds) - 10, 60)]
    kills += [(float(t), "replica") for t in range(15, int(seconds) - 10, 30)]
    return sorted(kills)


async def prepare(s: Soak, tmp: Path) -> None:
    zip_path = tmp / "iris-v1.zip"
    zip_directory(EXAMPLE, zip_path)
    source_zip = await asyncio.to_thread(zip_path.read_bytes)

    async def one(key: str) -> ModelState:
        c = s.c
        name = (await c.create_model(PROJECT, key)).name
        sha = (await c.upload_source(name, source_zip)).sha256
        res = Resources(replicas=1, cpus=CPUS)
        op = await c.create_build(name, sha, "model.py", "predict", deploy=DeployOptions(res))
        op = await c.wait(op.name, timeout_s=300)
        if op.error is not None:
            raise SystemExit(f"build and deploy of {key}: {op.error.message}")
        m = ModelState(key, name, (await c.get_model(name)).endpoint, sha)
        await s.sync(m)
        await warm_up(m.url)
        return m

    started = time.perf_counter()
    for m in await asyncio.gather(*(one(k) for k in MODELS)):
        s.models[m.key] = m
    say(f"{len(MODELS)} models built and deployed in {time.perf_counter() - started:.1f} s")


async def phases(s: Soak, tmp: Path, sizes: Sizes) -> dict[str, Any]:
    await prepare(s, tmp)
    s.start_incarnation_sample()
    since = await head_revision(s.c) - 1  # every stream starts with the last event
    watchers = Watchers(s.address, sizes.watchers, sizes.processes, since)
    watchers.start()
    try:
        opened = await asyncio.to_thread(watchers.wait_ready, 120)
        say(f"{opened} of {sizes.watchers} streams open in {sizes.processes} processes")
        s.load = Load({m.key: m.url for m in s.models.values()}, sizes.rate)
        s.load.start()
        start = time.perf_counter()
        chaos = asyncio.create_task(s.chaos(start, sizes.kills))
        try:
            await s.changes_until(start + sizes.seconds)
            await chaos
        finally:
            chaos.cancel()
        run_end = time.perf_counter()
        say(f"run done ({run_end - start:.0f} s); checking every operation")
        ops = await s.verdict(run_end)
        await asyncio.gather(*s.replacements)  # each ends by REPLACED_S
        await asyncio.sleep(1.0)
        await s.load.stop()
        s.rss[-1]["end_mb"] = rss_mb([s.proc.pid])
        head = await head_revision(s.c)
        reference = await replay(s.c, since, head)
        say(f"head revision {head}; waiting for every stream to reach it")
        results = await asyncio.to_thread(watchers.finish, head)
    finally:
        await asyncio.to_thread(watchers.stop)
    watch = check_streams(reference, results, head)
    watch["since_revision"] = since
    # Every revision is an event of this project (ours alone): none may be missing.
    watch["reference_holes"] = head - since - len(set(reference))
    watch["head_revision"] = head
    watch["processes"] = sizes.processes
    watch["children_reported"] = len(results)
    if len(results) < sizes.processes:
        watch["streams_missing"] = sizes.watchers - watch["streams"]
    return {
        "run_s": run_end - start,
        "changes": dict(s.changes),
        "kills": {"server": len(s.server_kills), "replica": len(s.replica_kills)},
        "replica_kills": [
            {
                "model": k.model,
                "pid": k.pid,
                "at_s": k.at - start,
                "sole": k.sole,
                "replaced_s": k.replaced_s,
            }
            for k in s.replica_kills
        ],
        "server_down_s": [b - k for k, b in s.server_kills],
        "ops": ops,
        "watch": watch,
        "requests": s.failures(s.load.answers),
        "rate_per_s": sizes.rate,
        "notes": s.notes,
    }


def run(sizes: Sizes) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()
    # A short temp dir: Ray's socket paths under it must stay under 107 bytes.
    with tempfile.TemporaryDirectory(prefix="bs", dir="/tmp") as name:
        tmp = Path(name)
        cluster: Cluster = start_cluster(tmp / "ray", tmp / "ray.log")
        say(f"Ray cluster at {cluster.address}")
        grpc_port = free_port()
        cmd = [
            MODELCTL,
            "serve",
            "--insecure-no-auth",
            "--console-port=-1",
            f"--ray-address={cluster.address}",
            f"--grpc-port={grpc_port}",
            f"--http-port={free_port()}",
            f"--data-dir={tmp / 'data'}",
            f"--server-id=soak-{grpc_port}",
        ]
        s: Soak | None = None
        try:
            proc, address = start_process(cmd)
            s = Soak(address, cmd, proc)
            result = asyncio.run(_main(s, tmp, sizes))
        finally:
            if s is not None:
                s.proc.terminate()
                try:
                    s.proc.wait(60)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait(10)
            say("stopping the cluster")
            stop_cluster(cluster)
    assert s is not None
    incarnations = []
    for i, r in enumerate(s.rss):
        growth = r.get("end_mb", r["start_mb"]) - r["start_mb"]
        incarnations.append({"incarnation": i, **r, "growth_mb": growth})
    result["rss"] = incarnations
    result["leftover_ray_processes"] = len(cluster.leftovers)
    result["load_average_before"] = list(load_before)
    result["seconds"] = time.perf_counter() - started
    return result


async def _main(s: Soak, tmp: Path, sizes: Sizes) -> dict[str, Any]:
    s.c = Client(s.address)  # its channel on this loop
    s.clients.append(s.c)
    try:
        return await phases(s, tmp, sizes)
    finally:
        for c in s.clients:
            with contextlib.suppress(Exception):
                await c.close()


# ---- the table ----------------------------------------------------------------------------


def problems(result: dict[str, Any]) -> list[str]:
    ops, w, req = result["ops"], result["watch"], result["requests"]
    out = [f"{k} {ops[k]}" for k in ("lost", "stuck") if ops[k]]
    out += [f"watch {k} {w[k]}" for k in ("gaps", "repeats", "extra", "reference_holes") if w[k]]
    if w.get("streams_missing") or w["incomplete"]:
        out.append("streams that never reached the last revision")
    if req["failed"]["other"]:
        out.append(f"{req['failed']['other']} requests failed for another cause")
    return out


def summary(result: dict[str, Any]) -> list[Row]:
    ops, w, req = result["ops"], result["watch"], result["requests"]
    fail = req["failed"]
    return [
        Row(
            f"soak: operations lost (of {ops['accepted']})", ops["lost"], None, "0", not ops["lost"]
        ),
        Row("soak: operations stuck", ops["stuck"], None, "0", not ops["stuck"]),
        Row(
            f"soak: watch gaps + repeats ({w['streams']} streams)",
            w["gaps"] + w["repeats"],
            None,
            "0",
            not (w["gaps"] or w["repeats"] or w["extra"]),
        ),
        Row(
            f"soak: failed requests, other causes (of {req['sent']})",
            fail["other"],
            None,
            "0",
            not fail["other"],
        ),
    ]


def show(result: dict[str, Any]) -> None:
    ops, w, req = result["ops"], result["watch"], result["requests"]
    kills, fail = result["kills"], req["failed"]
    changes = ", ".join(f"{k} {v}" for k, v in sorted(result["changes"].items()))
    down = ", ".join(f"{x:.1f}" for x in result["server_down_s"])
    rows = [
        ("run s", f"{result['run_s']:.0f}", ""),
        (f"changes ({changes})", sum(result["changes"].values()), ""),
        (f"server kills (down s: {down})", kills["server"], ""),
        ("replica kills", kills["replica"], ""),
        (
            f"operations accepted / failed {ops['errors'] or ''}",
            f"{ops['accepted']} / {ops['failed']}",
            "",
        ),
        (
            "calls resent after a kill with the same request_id",
            ops["changes_resent_same_request_id"],
            "",
        ),
        ("operations lost / stuck", f"{ops['lost']} / {ops['stuck']}", "0 / 0"),
        (
            f"watch streams (reference {w['reference_events']} events)",
            f"{w['streams']}, {w['events_min']}-{w['events_max']} events",
            "",
        ),
        (
            "watch identical to reference / distinct lists",
            f"{w['identical_to_reference']} / {w['distinct_lists']}",
            f"{w['streams']} / 1",
        ),
        (
            "watch gaps / repeats / extra / reference holes",
            f"{w['gaps']} / {w['repeats']} / {w['extra']} / {w['reference_holes']}",
            "0",
        ),
        (f"watch resumes {w['resumes']}", "", ""),
        ("requests sent", req["sent"], ""),
        (
            "failed: replica killed / sole one, until replaced",
            f"{fail['replica killed']} / {fail['sole replica killed, until replaced']}",
            "",
        ),
        ("failed: server killed / other", f"{fail['server killed']} / {fail['other']}", "_ / 0"),
    ]
    for k in result["replica_kills"]:
        replaced = "never" if k["replaced_s"] is None else f"{k['replaced_s']:.1f} s"
        rows.append(
            (
                f"replica of {k['model']} killed at {k['at_s']:.0f} s"
                f"{' (its only one)' if k['sole'] else ''}: replaced in",
                replaced,
                "",
            )
        )
    for r in result["rss"]:
        rows.append(
            (
                f"server RSS MB, incarnation {r['incarnation']}",
                f"{r['start_mb']:.0f} -> {r.get('end_mb', r['start_mb']):.0f}",
                f"{r['growth_mb']:+.1f}",
            )
        )
    print(f"\n{'figure':<58}{'value':>22}  must be")
    for label, value, target in rows:
        print(f"{label:<58}{value!s:>22}  {target}")
    for cause, examples in req["examples"].items():
        print(f"  {cause}: {examples}")
    for note in result["notes"]:
        print(f"  note: {note}")
    print(
        f"leftover Ray processes: {result['leftover_ray_processes']}; "
        f"{result['seconds']:.0f} s in all"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600.0, help="changes and kills")
    p.add_argument("--watchers", type=int, default=1000, help="WatchModels streams")
    p.add_argument("--processes", type=int, default=4, help="child processes of the streams")
    p.add_argument("--rate", type=float, default=RATE, help="requests/s to each model")
    p.add_argument("--smoke", action="store_true", help="30 s, 50 streams, one kill of each")
    args = p.parse_args()
    seconds, watchers = (30.0, 50) if args.smoke else (args.seconds, args.watchers)
    sizes = Sizes(seconds, watchers, args.processes, args.rate, schedule(seconds, args.smoke))
    result = run(sizes)
    result["smoke"] = args.smoke
    result["machine"] = machine()
    show(result)
    save_result("soak", result)
    bad = problems(result)
    if bad:
        raise SystemExit("soak failed: " + "; ".join(bad))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
