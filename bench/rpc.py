"""Unary RPC cost: GetModel on `modelctl serve` beside a bare grpc.aio server, in one run.

Both servers run as their own processes on 127.0.0.1. The bare one answers GetModel
with the very Model message our server returned, from memory: what is left is gRPC
itself. One client process drives each at 1, 10 and 100 concurrent callers, back to
back for a fixed time, and reports throughput, p50/p99 latency and our/bare throughput;
then 100 callers at a fixed 1,000 calls/s in all (latency at a load both carry: back to
back, p99 is mostly the wait behind the 99 other callers). Targets: >= 0.5x the bare
throughput, p99 < 5 ms at 100 callers. Writes bench/results/rpc.json.

    .venv/bin/python bench/rpc.py [--seconds 5] [--smoke] [--database-url URL]

``--database-url`` takes an empty database (the model is created in it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from serverproc import Row, Stub, back_to_back, save_result, serve_bare, start_process, start_server

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from modellifecycle.v1 import service_pb2_grpc

CONCURRENCY = (1, 10, 100)
PACED_CALLERS, PACED_RATE = 100, 1000.0  # 100 callers, 10 calls/s each
TARGET_RATIO = 0.5
TARGET_P99_MS_AT_100 = 5.0


class Bare(service_pb2_grpc.ModelLifecycleServicer):
    """Answers GetModel with one fixed message: gRPC's own cost and nothing else."""

    def __init__(self, model: pb.Model) -> None:
        self.model = model

    async def GetModel(self, request: rpc.GetModelRequest, context: Any) -> pb.Model:
        return self.model


def start_bare(model_file: Path) -> tuple[subprocess.Popen[str], str]:
    return start_process([sys.executable, __file__, "--bare-server", str(model_file)])


async def load(address: str, name: str, callers: int, seconds: float) -> dict[str, float]:
    """``callers`` coroutines calling GetModel back to back for ``seconds``."""
    request = rpc.GetModelRequest(name=name)
    return await back_to_back(
        address, lambda stub: lambda i: stub.GetModel(request), callers, seconds
    )


async def paced(
    address: str, name: str, callers: int, rate: float, seconds: float
) -> dict[str, float]:
    """``callers`` coroutines sending ``rate`` calls/s in all, on a fixed schedule: latency
    at a load both servers can carry. Counted from each call's scheduled time, so a late
    send counts against the server (no coordinated omission)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = Stub(channel)
        request = rpc.GetModelRequest(name=name)
        await stub.GetModel(request)
        latencies: list[float] = []
        interval = callers / rate
        start = time.perf_counter() + 0.05
        end = start + seconds

        async def caller(i: int) -> None:
            due = start + interval * i / callers
            while due < end:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                await stub.GetModel(request)
                latencies.append(time.perf_counter() - due)
                due += interval

        await asyncio.gather(*(caller(i) for i in range(callers)))
    ms = sorted(x * 1000 for x in latencies)
    return {
        "calls_per_s": len(ms) / seconds,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[max(0, int(len(ms) * 0.99) - 1)],
    }


async def run(seconds: float, database_url: str = "") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"--database-url={database_url}"] if database_url else []
        ours, address = start_server(Path(tmp) / "data", extra=extra)
        bare: subprocess.Popen[str] | None = None
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                model = await Stub(channel).CreateModel(
                    rpc.CreateModelRequest(parent="projects/bench", model_id="iris")
                )
            model_file = Path(tmp) / "model.pb"
            model_file.write_bytes(model.SerializeToString())
            bare, bare_address = start_bare(model_file)
            rows = []
            for callers in CONCURRENCY:
                mine = await load(address, model.name, callers, seconds)
                anchor = await load(bare_address, model.name, callers, seconds)
                rows.append(
                    {
                        "callers": callers,
                        "ours": mine,
                        "bare": anchor,
                        "throughput_ratio": mine["calls_per_s"] / anchor["calls_per_s"],
                    }
                )
            fixed = {
                "callers": PACED_CALLERS,
                "rate": PACED_RATE,
                "ours": await paced(address, model.name, PACED_CALLERS, PACED_RATE, seconds),
                "bare": await paced(bare_address, model.name, PACED_CALLERS, PACED_RATE, seconds),
            }
            return {"seconds_per_point": seconds, "points": rows, "paced": fixed}
        finally:
            for proc in (ours, bare):
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)


def summary(result: dict[str, Any]) -> list[Row]:
    rows = []
    for point in result["points"]:
        n, ours, bare = point["callers"], point["ours"], point["bare"]
        rows.append(
            Row(
                f"GetModel {n} callers back to back: calls/s",
                ours["calls_per_s"],
                bare["calls_per_s"],
                f"ratio >= {TARGET_RATIO}",
                point["throughput_ratio"] >= TARGET_RATIO,
            )
        )
        rows.append(
            Row(f"GetModel {n} callers back to back: p99 ms", ours["p99_ms"], bare["p99_ms"])
        )
    fixed = result["paced"]
    rows.append(
        Row(
            f"GetModel {fixed['callers']} callers at {fixed['rate']:.0f}/s: p99 ms",
            fixed["ours"]["p99_ms"],
            fixed["bare"]["p99_ms"],
            f"< {TARGET_P99_MS_AT_100:g}",
            fixed["ours"]["p99_ms"] < TARGET_P99_MS_AT_100,
        )
    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="per concurrency level")
    p.add_argument("--smoke", action="store_true", help="0.3 s per point")
    p.add_argument(
        "--database-url",
        default="",
        help="our server's database (default: SQLite, where GetModel answers from memory); "
        "e.g. postgresql+psycopg://127.0.0.1:5432/test reads the database on every call",
    )
    p.add_argument("--bare-server", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare_server:
        bare = Bare(pb.Model.FromString(args.bare_server.read_bytes()))  # type: ignore[abstract]  # answers only what it is asked
        asyncio.run(serve_bare(bare))
        return
    result = asyncio.run(run(0.3 if args.smoke else args.seconds, args.database_url))
    print(
        f"{'callers':>8}{'ours/s':>10}{'bare/s':>10}{'ratio':>8}{'(>=0.5)':>8}"
        f"{'ours p50':>10}{'ours p99':>10}{'bare p99':>10}  ms"
    )
    for row in result["points"]:
        ours, bare = row["ours"], row["bare"]
        print(
            f"{row['callers']:>8}{ours['calls_per_s']:>10.0f}{bare['calls_per_s']:>10.0f}"
            f"{row['throughput_ratio']:>8.2f}{'':>8}{ours['p50_ms']:>10.2f}"
            f"{ours['p99_ms']:>10.2f}{bare['p99_ms']:>10.2f}"
        )
    fixed = result["paced"]
    print(
        f"paced: {fixed['callers']} callers, {fixed['rate']:.0f} calls/s in all: "
        f"ours p50 {fixed['ours']['p50_ms']:.2f} p99 {fixed['ours']['p99_ms']:.2f} ms, "
        f"bare p50 {fixed['bare']['p50_ms']:.2f} p99 {fixed['bare']['p99_ms']:.2f} ms"
    )
    print(
        f"target: ratio >= {TARGET_RATIO}, ours p99 < {TARGET_P99_MS_AT_100} ms at 100 callers "
        "(back to back, every caller waits on the others: p99 there is queueing; the paced "
        "line is the latency at a rate both servers carry)"
    )
    save_result("rpc", result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
