"""Reads on PostgreSQL beside the same reads on SQLite: GetModel and ListModels.

Starts two `modelctl serve` (fake backend): one on SQLite in a temp dir (GetModel answers
from memory: every write is this process's), one on a fresh PostgreSQL database (other
servers may write too: GetModel answers from memory only once one head-revision query,
shared by the calls waiting at the time, says nothing changed). Both get the same 100
models. Then GetModel at 1, 10 and 100 callers back to back and ListModels (pages of 50)
at 10 callers, the two servers interleaved round by round. Prints calls/s and p99 side by
side, PostgreSQL over SQLite; writes bench/results/pgreads.json.

    .venv/bin/python bench/pgreads.py [--seconds 2] [--rounds 3] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from records import create_database, drop_database
from serverproc import Row, Stub, back_to_back, save_result, start_server

from modellifecycle.v1 import service_pb2 as rpc

MODELS = 100
PROJECT = "projects/bench"
TARGET_RATIO = 1.2  # PostgreSQL's calls/s within 1.2x of SQLite's
POINTS = [("GetModel", 1), ("GetModel", 10), ("GetModel", 100), ("ListModels", 10)]


async def prepare(address: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = Stub(channel)
        made = []
        for i in range(MODELS):
            m = await stub.CreateModel(rpc.CreateModelRequest(parent=PROJECT, model_id=f"m{i:03d}"))
            made.append(str(m.name))
        return made


def call_of(stub: Stub, method: str, names: list[str]) -> Callable[[int], Awaitable[object]]:
    if method == "GetModel":
        return lambda i: stub.GetModel(rpc.GetModelRequest(name=names[i % len(names)]))
    return lambda i: stub.ListModels(rpc.ListModelsRequest(parent=PROJECT, page_size=50))


async def load(
    address: str, method: str, names: list[str], callers: int, seconds: float
) -> dict[str, float]:
    """``callers`` coroutines calling back to back for ``seconds``."""
    return await back_to_back(address, lambda stub: call_of(stub, method, names), callers, seconds)


def merged(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Median of each figure over the rounds."""
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


async def run(seconds: float, rounds: int) -> dict[str, Any]:
    db_name, url = create_database()
    procs: list[subprocess.Popen[str]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sqlite, sqlite_address = start_server(Path(tmp) / "sqlite")
            procs.append(sqlite)
            pg_url = url.replace("postgresql://", "postgresql+psycopg://")
            pg, pg_address = start_server(Path(tmp) / "pg", extra=[f"--database-url={pg_url}"])
            procs.append(pg)
            names = await prepare(sqlite_address)
            await prepare(pg_address)
            points = []
            for method, callers in POINTS:
                sides: dict[str, list[dict[str, float]]] = {"postgresql": [], "sqlite": []}
                for _ in range(rounds):
                    for side, address in (("sqlite", sqlite_address), ("postgresql", pg_address)):
                        sides[side].append(await load(address, method, names, callers, seconds))
                pg_side, lite = merged(sides["postgresql"]), merged(sides["sqlite"])
                points.append(
                    {
                        "method": method,
                        "callers": callers,
                        "postgresql": pg_side,
                        "sqlite": lite,
                        "slowdown": lite["calls_per_s"] / pg_side["calls_per_s"],
                    }
                )
            return {"models": MODELS, "seconds": seconds, "rounds": rounds, "points": points}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        drop_database(db_name)


def summary(result: dict[str, Any]) -> list[Row]:
    rows = []
    for p in result["points"]:
        what = f"{p['method']} {p['callers']} callers on PostgreSQL (anchor: SQLite)"
        rows.append(
            Row(
                f"{what}: calls/s, median of {result['rounds']}",
                p["postgresql"]["calls_per_s"],
                p["sqlite"]["calls_per_s"],
                f"SQLite / ours <= {TARGET_RATIO:g}",
                p["slowdown"] <= TARGET_RATIO,
            )
        )
        rows.append(Row(f"{what}: p99 ms", p["postgresql"]["p99_ms"], p["sqlite"]["p99_ms"]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="per point, per round, per side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="0.3 s, 1 round")
    args = p.parse_args()
    seconds, rounds = (0.3, 1) if args.smoke else (args.seconds, args.rounds)
    result = asyncio.run(run(seconds, rounds))
    result["smoke"] = args.smoke
    print(f"{'point':<24}{'pg/s':>10}{'sqlite/s':>10}{'slower':>8}{'pg p99':>10}{'lite p99':>10}")
    for point in result["points"]:
        pg_side, lite = point["postgresql"], point["sqlite"]
        print(
            f"{point['method'] + ' x' + str(point['callers']):<24}"
            f"{pg_side['calls_per_s']:>10.0f}{lite['calls_per_s']:>10.0f}"
            f"{point['slowdown']:>8.2f}{pg_side['p99_ms']:>10.2f}{lite['p99_ms']:>10.2f}"
        )
    print(f"target: SQLite's calls/s over PostgreSQL's <= {TARGET_RATIO}")
    save_result("pgreads", result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
