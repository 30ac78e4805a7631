"""Watch fan-out: N WatchModel streams on one server; latency from a change to delivery.

Starts `modelctl serve` (fake backend, SQLite in a temp dir) as its own process, opens
N streams on 127.0.0.1, makes K changes one at a time (RestartModel of a deployed model:
each makes several events) and measures, per delivered event, the time from the event's
commit (its `time` field, stamped in the transaction) to its arrival. Prints p50/p99, the
server's RSS, and the targets beside them; writes bench/results/watchers.json.

    .venv/bin/python bench/watchers.py [--watchers 1000] [--changes 10] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from serverproc import Row, Stub, save_result, serve_bare, start_process, start_server

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from modellifecycle.v1 import service_pb2_grpc

TARGET_P99_MS = 100.0
TARGET_RSS_MB = 500.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def deploy(stub: Stub) -> str:
    import io
    import zipfile

    model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/bench", model_id="m"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.py", "def predict(body):\n    return body\n")

    async def chunks() -> AsyncIterator[rpc.UploadSourceRequest]:
        yield rpc.UploadSourceRequest(parent=model.name, chunk=buf.getvalue())

    src = await stub.UploadSource(chunks())
    op = await stub.CreateBuild(
        rpc.CreateBuildRequest(
            parent=model.name,
            source_sha256=src.sha256,
            file_path="model.py",
            function_name="predict",
            deploy=rpc.DeployOptions(resources=pb.Resources(replicas=1)),
        )
    )
    await done(stub, op.name)
    return str(model.name)


async def done(stub: Stub, name: str) -> None:
    from google.protobuf import duration_pb2

    for _ in range(120):
        op = await stub.WaitOperation(
            rpc.WaitOperationRequest(name=name, timeout=duration_pb2.Duration(seconds=1))
        )
        if op.done:
            return
    raise SystemExit(f"{name} not done")


class Bare(service_pb2_grpc.ModelLifecycleServicer):
    """The anchor: WatchModel streams fed from memory. Each RestartModel replays the events
    one change of ours made, with the same spacing, stamped now, to every stream."""

    def __init__(self, change: list[tuple[float, bytes]]) -> None:
        self.change = [(offset, pb.ModelEvent.FromString(raw)) for offset, raw in change]
        self.queues: set[asyncio.Queue[pb.ModelEvent]] = set()
        self.revision = 0

    async def WatchModel(
        self, request: rpc.WatchModelRequest, context: Any
    ) -> AsyncIterator[pb.ModelEvent]:
        queue: asyncio.Queue[pb.ModelEvent] = asyncio.Queue()
        self.queues.add(queue)
        try:
            yield pb.ModelEvent(revision=self.revision, type=pb.EVENT_TYPE_BOOKMARK)
            while True:
                yield await queue.get()
        finally:
            self.queues.discard(queue)

    async def RestartModel(self, request: rpc.RestartModelRequest, context: Any) -> pb.Operation:
        started = time.monotonic()
        for offset, template in self.change:
            await asyncio.sleep(max(0.0, started + offset - time.monotonic()))
            self.revision += 1
            event = pb.ModelEvent()
            event.CopyFrom(template)
            event.revision = self.revision
            event.time.GetCurrentTime()
            for queue in self.queues:
                queue.put_nowait(event)
        return pb.Operation(name="operations/bare", done=True)

    async def WaitOperation(self, request: rpc.WaitOperationRequest, context: Any) -> pb.Operation:
        return pb.Operation(name=request.name, done=True)


async def run(n: int, changes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_server(Path(tmp) / "data", http_port=18997)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                model = await deploy(Stub(channel))
            ours, change = await measure(proc, address, model, n, changes)
        finally:
            proc.terminate()
            proc.wait(30)
        change_file = Path(tmp) / "change.json"
        change_file.write_text(json.dumps([(o, raw.hex()) for o, raw in change]))
        bare_proc, bare_address = start_process(
            [sys.executable, __file__, "--bare-server", str(change_file)]
        )
        try:
            bare, _ = await measure(bare_proc, bare_address, model, n, changes)
        finally:
            bare_proc.terminate()
            bare_proc.wait(30)
    return {
        "watchers": n,
        "changes": changes,
        "events_per_change": len(change),
        "ours": ours,
        "bare": bare,
        "p99_ratio": ours["p99_ms"] / bare["p99_ms"] if bare["p99_ms"] else None,
    }


async def measure(
    proc: subprocess.Popen[str], address: str, model: str, n: int, changes: int
) -> tuple[dict[str, float], list[tuple[float, bytes]]]:
    """Opens ``n`` watches of ``model``, makes ``changes`` restarts; also returns the events
    (offset from the first, serialized) that the first watcher got for the first change."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, n // 100))]
    stub = Stub(channels[0])
    latencies: list[float] = []
    seen: list[tuple[float, pb.ModelEvent]] = []  # by the first watcher
    ready = 0
    all_ready = asyncio.Event()

    async def watch(i: int) -> None:
        nonlocal ready
        s = Stub(channels[i % len(channels)])
        async for event in s.WatchModel(rpc.WatchModelRequest(name=model)):
            if event.type == pb.EVENT_TYPE_BOOKMARK:
                ready += 1
                if ready == n:
                    all_ready.set()
                continue
            if event.type == pb.EVENT_TYPE_CURRENT:
                continue
            sent = event.time.ToDatetime().timestamp()
            latencies.append(time.time() - sent)
            if i == 0:
                seen.append((sent, event))

    rss_idle = rss_mb(proc.pid)
    tasks = [asyncio.create_task(watch(i)) for i in range(n)]
    await asyncio.wait_for(all_ready.wait(), 120)
    rss_watching = rss_mb(proc.pid)
    server_cpu, client_cpu, started = cpu_s(proc.pid), cpu_s(os.getpid()), time.perf_counter()
    for _ in range(changes):
        op = await stub.RestartModel(rpc.RestartModelRequest(name=model))
        await done(stub, op.name)
    await asyncio.sleep(1.0)
    wall = time.perf_counter() - started
    server_cpu, client_cpu = cpu_s(proc.pid) - server_cpu, cpu_s(os.getpid()) - client_cpu
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    ms = sorted(x * 1000 for x in latencies)
    return {
        "events_delivered": len(ms),
        "events_per_watcher": len(seen),
        "p50_ms": statistics.median(ms) if ms else 0.0,
        "p99_ms": ms[int(len(ms) * 0.99) - 1] if ms else 0.0,
        "rss_idle_mb": rss_idle,
        "rss_mb": max(rss_watching, rss_mb(proc.pid)),
        # Where the time went while the changes were made and delivered (2 cores in all).
        "changes_wall_s": wall,
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
    }, first_change(seen)


def first_change(seen: list[tuple[float, pb.ModelEvent]]) -> list[tuple[float, bytes]]:
    """The events of the first change (up to the next operation's creation), each with
    its offset from the first: what the anchor replays."""
    starts = [
        i
        for i, (_, e) in enumerate(seen)
        if e.type == pb.EVENT_TYPE_CREATED and e.WhichOneof("resource") == "operation"
    ]
    if not starts:
        return []
    end = starts[1] if len(starts) > 1 else len(seen)
    t0 = seen[starts[0]][0]
    return [(sent - t0, e.SerializeToString()) for sent, e in seen[starts[0] : end]]


def summary(result: dict[str, Any]) -> list[Row]:
    ours, bare = result["ours"], result["bare"]
    n = result["watchers"]
    return [
        Row(f"watch {n} streams: change -> delivery p50 ms", ours["p50_ms"], bare["p50_ms"]),
        Row(
            f"watch {n} streams: change -> delivery p99 ms",
            ours["p99_ms"],
            bare["p99_ms"],
            f"< {TARGET_P99_MS:g}",
            ours["p99_ms"] < TARGET_P99_MS,
        ),
        Row(
            f"watch {n} streams: server RSS MB",
            ours["rss_mb"],
            bare["rss_mb"],
            f"< {TARGET_RSS_MB:g}",
            ours["rss_mb"] < TARGET_RSS_MB,
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--watchers", type=int, default=1000)
    p.add_argument("--changes", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="50 watchers, 2 changes")
    p.add_argument("--bare-server", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare_server:
        change = json.loads(args.bare_server.read_text())
        bare = Bare([(float(o), bytes.fromhex(h)) for o, h in change])  # type: ignore[abstract]  # answers only what it is asked
        asyncio.run(serve_bare(bare))
        return
    n, k = (50, 2) if args.smoke else (args.watchers, args.changes)
    result = asyncio.run(run(n, k))
    ours, bare = result["ours"], result["bare"]
    print(f"{n} watchers, {k} changes of {result['events_per_change']} events each")
    print(f"{'figure':<28}{'ours':>10}{'bare':>10}{'target':>10}")
    for label, key, target in (
        ("events delivered", "events_delivered", ""),
        ("change -> delivery p50 ms", "p50_ms", ""),
        ("change -> delivery p99 ms", "p99_ms", f"{TARGET_P99_MS:g}"),
        ("changes wall s", "changes_wall_s", ""),
        ("server CPU s", "server_cpu_s", ""),
        ("client CPU s", "client_cpu_s", ""),
        ("server RSS MB (idle)", "rss_idle_mb", ""),
        ("server RSS MB (watching)", "rss_mb", f"{TARGET_RSS_MB:g}"),
    ):
        print(f"{label:<28}{ours[key]:>10.1f}{bare[key]:>10.1f}{target:>10}")
    save_result("watchers", result)
    for side in (ours, bare):
        if side["events_delivered"] != n * side["events_per_watcher"]:
            raise SystemExit("a watcher missed an event")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
