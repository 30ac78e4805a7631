"""Watch fan-out: N WatchModel and N WatchModels streams on one server; latency from a
change to delivery.

Starts `modelctl serve` (fake backend, SQLite in a temp dir) as its own process, opens
N streams spread over client processes of their own (the client is not what is measured),
makes K changes one at a time, one starting every second on both sides (RestartModel of a
deployed model: each makes several events) and measures, per delivered event, the time
from the event's commit (its `time` field, stamped in the transaction) to its arrival.
Then the same against the anchor: a bare grpc.aio server replaying the events of one of
our changes, with the same spacing, from memory. The two take turns, 3 rounds each; each
side's figures are the median of its rounds. Prints p50/p99, CPU per delivered event and
RSS beside the anchor's, and the p99 ratio round by round; writes
bench/results/watchers.json.

    .venv/bin/python bench/watchers.py [--watchers 1000] [--changes 10] [--every 1.0]
                                       [--rounds 3] [--processes 4]
                                       [--kinds model,models] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import grpc
from procstat import cpu_s, rss_mb
from serverproc import (
    Row,
    Stub,
    finished,
    save_result,
    serve_bare,
    start_build,
    start_process,
    start_server,
)

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from modellifecycle.v1 import service_pb2_grpc

TARGET_P99_RATIO = 1.2
TARGET_RSS_MB = 500.0
PROJECT = "projects/bench"
KINDS = ("model", "models")
SETTLE_S = 1.0  # after the last change: what is still on its way arrives
# A change starts this long after the one before it, on both sides (if that one is done).
CHANGE_EVERY_S = 1.0


async def deploy(stub: Stub) -> str:
    model = await stub.CreateModel(rpc.CreateModelRequest(parent=PROJECT, model_id="m"))
    deploy = rpc.DeployOptions(resources=pb.Resources(replicas=1))
    source = "def predict(body):\n    return body\n"
    await finished(stub, await start_build(stub, model.name, source, deploy), 120)
    return str(model.name)


class Bare(service_pb2_grpc.ModelLifecycleServicer):
    """The anchor: watch streams fed from memory. Each RestartModel replays the events
    one change of ours made, with the same spacing, to every stream."""

    def __init__(self, change: list[tuple[float, bytes]]) -> None:
        self.change = [(offset, pb.ModelEvent.FromString(raw)) for offset, raw in change]
        self.queues: set[asyncio.Queue[pb.ModelEvent]] = set()
        self.revision = 0

    async def _stream(self) -> AsyncIterator[pb.ModelEvent]:
        queue: asyncio.Queue[pb.ModelEvent] = asyncio.Queue()
        self.queues.add(queue)
        try:
            yield pb.ModelEvent(revision=self.revision, type=pb.EVENT_TYPE_BOOKMARK)
            while True:
                yield await queue.get()
        finally:
            self.queues.discard(queue)

    async def WatchModel(
        self, request: rpc.WatchModelRequest, context: Any
    ) -> AsyncIterator[pb.ModelEvent]:
        async for event in self._stream():
            yield event

    async def WatchModels(
        self, request: rpc.WatchModelsRequest, context: Any
    ) -> AsyncIterator[pb.ModelEvent]:
        async for event in self._stream():
            yield event

    async def RestartModel(self, request: rpc.RestartModelRequest, context: Any) -> pb.Operation:
        started, wall = time.monotonic(), time.time()
        for offset, template in self.change:
            await asyncio.sleep(max(0.0, started + offset - time.monotonic()))
            self.revision += 1
            event = pb.ModelEvent()
            event.CopyFrom(template)
            event.revision = self.revision
            # Stamped when it was due, as ours are at their commit: a late put (the loop
            # busy sending the one before) counts in its latency.
            event.time.FromNanoseconds(int((wall + offset) * 1e9))
            for queue in self.queues:
                queue.put_nowait(event)
        return pb.Operation(name="operations/bare", done=True)

    async def WaitOperation(self, request: rpc.WaitOperationRequest, context: Any) -> pb.Operation:
        return pb.Operation(name=request.name, done=True)


# ---- watchers, in child processes ---------------------------------------------------------


def watch_child(
    address: str,
    model: str,
    kind: str,
    n: int,
    first: bool,  # this child keeps its first stream's events (what the anchor replays)
    ready: Any,  # multiprocessing.Queue: one item per stream that got its first BOOKMARK
    results: Any,  # multiprocessing.Queue: this child's one result
    stop: Any,  # multiprocessing.Event: set once the changes are made and settled
) -> None:
    """A child's streams (spawned: nothing of the parent's gRPC state comes with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    results.put(asyncio.run(_watch(address, model, kind, n, first, ready, stop)))


async def _watch(
    address: str, model: str, kind: str, n: int, first: bool, ready: Any, stop: Any
) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, n // 100))]
    latencies: list[tuple[int, float]] = []  # (revision, seconds from commit to arrival)
    counts = [0] * n
    seen: list[tuple[float, str]] = []  # the first stream's events: (commit time, hex)
    cpu_at_ready = [0.0]
    opened = [0]

    async def watch(i: int) -> None:
        stub = Stub(channels[i % len(channels)])
        call = (
            stub.WatchModel(rpc.WatchModelRequest(name=model))
            if kind == "model"
            else stub.WatchModels(rpc.WatchModelsRequest(parent=PROJECT))
        )
        bookmarked = False
        async for event in call:
            if event.type == pb.EVENT_TYPE_BOOKMARK:
                if not bookmarked:
                    bookmarked = True
                    opened[0] += 1
                    if opened[0] == n:
                        cpu_at_ready[0] = time.process_time()
                    ready.put(1)
                continue
            if event.type == pb.EVENT_TYPE_CURRENT:
                continue
            sent = event.time.seconds + event.time.nanos / 1e9
            latencies.append((event.revision, time.time() - sent))
            counts[i] += 1
            if first and i == 0:
                seen.append((sent, event.SerializeToString().hex()))

    tasks = [asyncio.create_task(watch(i)) for i in range(n)]
    await asyncio.to_thread(stop.wait)
    cpu = time.process_time() - cpu_at_ready[0]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    return {"latencies": latencies, "counts": counts, "seen": seen, "cpu_s": cpu}


class Watchers:
    """``n`` streams of one kind over ``processes`` spawned children."""

    def __init__(self, address: str, model: str, kind: str, n: int, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.n = n
        self.ready, self.results = ctx.Queue(), ctx.Queue()
        self.stop = ctx.Event()
        shares = [len(range(p, n, processes)) for p in range(min(processes, n))]
        self.procs = [
            ctx.Process(
                target=watch_child,
                args=(address, model, kind, k, p == 0, self.ready, self.results, self.stop),
                daemon=True,
            )
            for p, k in enumerate(shares)
        ]
        for proc in self.procs:
            proc.start()

    def wait_ready(self, seconds: float) -> None:
        deadline, opened = time.monotonic() + seconds, 0
        while opened < self.n:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {opened} of {self.n} streams opened in {seconds:g} s")
            with contextlib.suppress(Empty):
                opened += self.ready.get(timeout=0.5)

    def finish(self) -> list[dict[str, Any]]:
        self.stop.set()
        out = [self.results.get(timeout=120) for _ in self.procs]
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        return out


async def make_changes(address: str, model: str, changes: int, every: float) -> None:
    """``changes`` restarts, one starting every ``every`` seconds (or, if one takes
    longer, as soon as it is done): both sides get the same changes per second, whatever
    each takes to make one. Back to back, the side that makes a change faster would be
    offered more events per second, and a backlog of deliveries, for being faster."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = Stub(channel)
        start = time.monotonic()
        for k in range(changes):
            await asyncio.sleep(max(0.0, start + k * every - time.monotonic()))
            op = await stub.RestartModel(rpc.RestartModelRequest(name=model))
            await finished(stub, op.name, 120)


async def changes_alone(
    proc: subprocess.Popen[str], address: str, model: str, changes: int, every: float
) -> float:
    """The server's CPU seconds for the changes (and the settle time) with no watcher: what
    the changes themselves cost, taken off before CPU per delivered event."""
    before = cpu_s([proc.pid])
    await make_changes(address, model, changes, every)
    await asyncio.sleep(SETTLE_S)
    return cpu_s([proc.pid]) - before


async def measure(
    proc: subprocess.Popen[str],
    address: str,
    model: str,
    kind: str,
    n: int,
    changes: int,
    every: float,
    processes: int,
    alone_cpu_s: float,
) -> tuple[dict[str, Any], list[tuple[float, bytes]]]:
    """Opens ``n`` watches of one ``kind``, makes ``changes`` restarts of ``model`` (one
    every ``every`` seconds); also
    returns the events (offset from the first, serialized) of a typical change, as
    the first stream saw them."""
    rss_idle = rss_mb([proc.pid])
    watchers = Watchers(address, model, kind, n, processes)
    try:
        await asyncio.to_thread(watchers.wait_ready, 120)
        rss_watching = rss_mb([proc.pid])
        server_cpu, started = cpu_s([proc.pid]), time.perf_counter()
        await make_changes(address, model, changes, every)
        await asyncio.sleep(SETTLE_S)
        wall = time.perf_counter() - started
        server_cpu = cpu_s([proc.pid]) - server_cpu
        rss_watching = max(rss_watching, rss_mb([proc.pid]))
    finally:
        results = await asyncio.to_thread(watchers.finish)
    ms = sorted(x * 1000 for r in results for _, x in r["latencies"])
    # Per event: its first arrival (the path from commit to the fan-out) and its last.
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for r in results:
        for rev, x in r["latencies"]:
            first[rev] = min(first.get(rev, x), x)
            last[rev] = max(last.get(rev, x), x)
    counts = [c for r in results for c in r["counts"]]
    seen = next(r["seen"] for r in results if r["seen"])
    delivered = len(ms)
    return {
        "events_delivered": delivered,
        "events_per_watcher": len(seen),
        "watchers_complete": sum(c == len(seen) for c in counts),
        "p50_ms": statistics.median(ms) if ms else 0.0,
        "p99_ms": ms[int(len(ms) * 0.99) - 1] if ms else 0.0,
        "first_arrival_p50_ms": statistics.median(first.values()) * 1000 if first else 0.0,
        "last_arrival_p50_ms": statistics.median(last.values()) * 1000 if last else 0.0,
        "rss_idle_mb": rss_idle,
        "rss_mb": rss_watching,
        # Where the time went while the changes were made and delivered (2 cores in all).
        "changes_wall_s": wall,
        "server_cpu_s": server_cpu,
        "server_cpu_changes_alone_s": alone_cpu_s,
        # Beyond what the same changes cost with no watcher.
        "server_cpu_us_per_event": max(0.0, server_cpu - alone_cpu_s) / delivered * 1e6
        if delivered
        else 0.0,
        "client_cpu_s": sum(r["cpu_s"] for r in results),
    }, one_change([(sent, bytes.fromhex(raw)) for sent, raw in seen])


def one_change(seen: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """The events of a typical change (from an operation's creation up to the next one's:
    of the changes seen, one with the median number of events), each with its offset from
    the first: what the anchor replays."""
    events = [(sent, pb.ModelEvent.FromString(raw), raw) for sent, raw in seen]
    starts = [
        i
        for i, (_, e, _) in enumerate(events)
        if e.type == pb.EVENT_TYPE_CREATED and e.WhichOneof("resource") == "operation"
    ]
    changes = [events[a:b] for a, b in zip(starts, [*starts[1:], len(events)], strict=True)]
    if not changes:
        return []
    typical = sorted(changes, key=len)[len(changes) // 2]
    t0 = typical[0][0]
    return [(sent - t0, raw) for sent, _, raw in typical]


@contextlib.contextmanager
def running(proc: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(30)


async def run(
    n: int, changes: int, every: float, processes: int, kinds: list[str], rounds: int
) -> dict[str, Any]:
    """``rounds`` rounds of each kind on both servers, taking turns (ours, then the
    anchor), both up for the whole run: each side's figures are the median of its rounds,
    so one slow round of the machine's does not decide the ratio."""
    ours: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    bare: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_server(Path(tmp) / "data", http_port=18997)
        with running(proc):
            async with grpc.aio.insecure_channel(address) as channel:
                model = await deploy(Stub(channel))
            alone = await changes_alone(proc, address, model, changes, every)
            change: list[tuple[float, bytes]] = []
            server = (proc, address, alone)

            async def once(
                side: tuple[subprocess.Popen[str], str, float], kind: str
            ) -> tuple[dict[str, Any], list[tuple[float, bytes]]]:
                side_proc, side_address, side_alone = side
                return await measure(
                    side_proc, side_address, model, kind, n, changes, every, processes, side_alone
                )

            for kind in kinds:  # ours first: the anchor replays one of its changes
                got, seen = await once(server, kind)
                ours[kind].append(got)
                change = change or seen
            change_file = Path(tmp) / "change.json"
            change_file.write_text(json.dumps([(o, raw.hex()) for o, raw in change]))
            bare_proc, bare_address = start_process(
                [sys.executable, __file__, "--bare-server", str(change_file)]
            )
            with running(bare_proc):
                bare_alone = await changes_alone(bare_proc, bare_address, model, changes, every)
                bare_side = (bare_proc, bare_address, bare_alone)
                for r in range(rounds):
                    for kind in kinds:
                        if r:
                            ours[kind].append((await once(server, kind))[0])
                        bare[kind].append((await once(bare_side, kind))[0])
    kinds_out = {}
    for kind in kinds:
        mine, anchor = median_of(ours[kind]), median_of(bare[kind])
        kinds_out[kind] = {
            "ours": mine,
            "bare": anchor,
            "p99_ratio": mine["p99_ms"] / anchor["p99_ms"] if anchor["p99_ms"] else None,
            "rounds": [{"ours": o, "bare": b} for o, b in zip(ours[kind], bare[kind], strict=True)],
        }
    return {
        "watchers": n,
        "changes": changes,
        "change_every_s": every,
        "rounds": rounds,
        "processes": processes,
        "events_per_change": len(change),
        "kinds": kinds_out,
    }


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds; the fewest watchers that got every event and
    the most memory, of any round."""
    out = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    out["watchers_complete"] = min(r["watchers_complete"] for r in rounds)
    out["rss_mb"] = max(r["rss_mb"] for r in rounds)
    return out


RPC_NAME = {"model": "WatchModel", "models": "WatchModels"}


def summary(result: dict[str, Any]) -> list[Row]:
    n = result["watchers"]
    rows = []
    for kind, sides in result["kinds"].items():
        ours, bare = sides["ours"], sides["bare"]
        what = f"{RPC_NAME[kind]} x{n}"
        ratio = ours["p99_ms"] / bare["p99_ms"] if bare["p99_ms"] else None
        rows += [
            Row(f"{what}: change -> delivery p50 ms", ours["p50_ms"], bare["p50_ms"]),
            Row(
                f"{what}: change -> delivery p99 ms",
                ours["p99_ms"],
                bare["p99_ms"],
                f"ratio <= {TARGET_P99_RATIO:g}",
                ratio is not None and ratio <= TARGET_P99_RATIO,
            ),
            Row(
                f"{what}: server CPU us per delivered event",
                ours["server_cpu_us_per_event"],
                bare["server_cpu_us_per_event"],
            ),
            Row(
                f"{what}: server RSS MB",
                ours["rss_mb"],
                bare["rss_mb"],
                f"< {TARGET_RSS_MB:g}",
                ours["rss_mb"] < TARGET_RSS_MB,
            ),
        ]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--watchers", type=int, default=1000)
    p.add_argument("--changes", type=int, default=10)
    p.add_argument(
        "--every",
        type=float,
        default=CHANGE_EVERY_S,
        help="seconds from one change's start to the next's, on both sides",
    )
    p.add_argument("--processes", type=int, default=4, help="client processes")
    p.add_argument("--kinds", default=",".join(KINDS), help="model, models or both")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each side, taking turns")
    p.add_argument(
        "--smoke", action="store_true", help="50 watchers, 2 changes, 2 processes, 1 round"
    )
    p.add_argument("--bare-server", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare_server:
        change = json.loads(args.bare_server.read_text())
        bare = Bare([(float(o), bytes.fromhex(h)) for o, h in change])  # type: ignore[abstract]  # answers only what it is asked
        asyncio.run(serve_bare(bare))
        return
    if args.rounds < 1 or args.every < 0:
        p.error("--rounds: 1 or more; --every: 0 or more seconds")
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kinds: some of {', '.join(KINDS)}")
    n, k, procs = (50, 2, 2) if args.smoke else (args.watchers, args.changes, args.processes)
    rounds = 1 if args.smoke else args.rounds
    result = asyncio.run(run(n, k, args.every, procs, kinds, rounds))
    result["smoke"] = args.smoke
    print(
        f"{n} watchers in {procs} client processes, {k} changes (one every "
        f"{args.every:g} s) of {result['events_per_change']} events each; median of "
        f"{rounds} round(s) per side, taking turns"
    )
    for kind, sides in result["kinds"].items():
        ours, bare = sides["ours"], sides["bare"]
        print(f"\n{RPC_NAME[kind]}")
        print(f"{'figure':<32}{'ours':>10}{'bare':>10}")
        for label, key in (
            ("events delivered", "events_delivered"),
            ("change -> delivery p50 ms", "p50_ms"),
            ("change -> delivery p99 ms", "p99_ms"),
            ("per event: first arrival p50 ms", "first_arrival_p50_ms"),
            ("per event: last arrival p50 ms", "last_arrival_p50_ms"),
            ("changes wall s", "changes_wall_s"),
            ("server CPU s", "server_cpu_s"),
            ("server CPU s, changes alone", "server_cpu_changes_alone_s"),
            ("server CPU us / event", "server_cpu_us_per_event"),
            ("client CPU s (all processes)", "client_cpu_s"),
            ("server RSS MB (idle)", "rss_idle_mb"),
            ("server RSS MB (watching)", "rss_mb"),
        ):
            print(f"{label:<32}{ours[key]:>10.1f}{bare[key]:>10.1f}")
        rounds_p99 = [(r["ours"]["p99_ms"], r["bare"]["p99_ms"]) for r in sides["rounds"]]
        ratios = [mine / anchor for mine, anchor in rounds_p99 if anchor]
        print(f"{'p99 ratio, round by round':<32}" + " ".join(f"{x:.2f}" for x in ratios))
    save_result("watchers", result)
    for kind, sides in result["kinds"].items():
        for side in ("ours", "bare"):
            if sides[side]["watchers_complete"] != n:
                raise SystemExit(f"{RPC_NAME[kind]} ({side}): a watcher missed an event")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
