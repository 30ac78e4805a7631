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
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from serverproc import Stub, save_result, start_server

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc

TARGET_P99_MS = 100.0
TARGET_RSS_MB = 500.0


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


async def run(n: int, changes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_server(Path(tmp) / "data", http_port=18997)
        try:
            return await measure(proc, address, n, changes)
        finally:
            proc.terminate()
            proc.wait(30)


async def measure(
    proc: subprocess.Popen[str], address: str, n: int, changes: int
) -> dict[str, float]:
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, n // 100))]
    stub = Stub(channels[0])
    model = await deploy(stub)
    latencies: list[float] = []
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
            if event.type != pb.EVENT_TYPE_CURRENT:
                latencies.append(time.time() - event.time.ToDatetime().timestamp())

    rss_idle = rss_mb(proc.pid)
    tasks = [asyncio.create_task(watch(i)) for i in range(n)]
    await asyncio.wait_for(all_ready.wait(), 120)
    rss_watching = rss_mb(proc.pid)
    for _ in range(changes):
        op = await stub.RestartModel(rpc.RestartModelRequest(name=model))
        await done(stub, op.name)
    await asyncio.sleep(1.0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    ms = sorted(x * 1000 for x in latencies)
    return {
        "watchers": n,
        "events_delivered": len(ms),
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[int(len(ms) * 0.99) - 1] if ms else 0.0,
        "rss_idle_mb": rss_idle,
        "rss_mb": max(rss_watching, rss_mb(proc.pid)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--watchers", type=int, default=1000)
    p.add_argument("--changes", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="50 watchers, 2 changes")
    args = p.parse_args()
    n, k = (50, 2) if args.smoke else (args.watchers, args.changes)
    result = asyncio.run(run(n, k))
    print(f"{'figure':<28}{'value':>12}{'target':>12}")
    print(f"{'watchers':<28}{result['watchers']:>12.0f}")
    print(f"{'events delivered':<28}{result['events_delivered']:>12.0f}")
    print(f"{'change -> delivery p50 ms':<28}{result['p50_ms']:>12.1f}")
    print(f"{'change -> delivery p99 ms':<28}{result['p99_ms']:>12.1f}{TARGET_P99_MS:>12.0f}")
    print(f"{'server RSS MB (idle)':<28}{result['rss_idle_mb']:>12.0f}")
    print(f"{'server RSS MB (watching)':<28}{result['rss_mb']:>12.0f}{TARGET_RSS_MB:>12.0f}")
    save_result("watchers", result)
    if not result["events_delivered"]:
        raise SystemExit("no event was delivered")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
