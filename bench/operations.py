"""Operations at scale: 100 concurrent CreateDeployment calls on 100 different models.

Two `modelctl serve` (fake backend: what is measured is the control plane) on one fresh
PostgreSQL database and one data dir, so they share the fake cluster as two servers share
one Ray cluster. 100 models, each with a build. Then 100 CreateDeployment calls at once,
half through each server, and a WaitOperation on each: the time from the first call to
the last operation done, operations/s, each operation's own time (p50/p99), and every job
the change made from the jobs table: none may have run twice (attempts > 1) or be left
unfinished. Writes bench/results/operations.json.

    .venv/bin/python bench/operations.py [--models 100] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import psycopg
from records import create_database, drop_database
from serverproc import Row, Stub, finished, save_result, start_build, start_server

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc

PROJECT = "projects/ops"
MODEL = "def predict(body):\n    return body\n"


async def built_model(stub: Stub, i: int) -> tuple[str, str]:
    """A model with one build; (model, build)."""
    model = await stub.CreateModel(rpc.CreateModelRequest(parent=PROJECT, model_id=f"m{i:03d}"))
    op = await finished(stub, await start_build(stub, model.name, MODEL))
    if op.HasField("error"):
        raise SystemExit(f"build of {model.name} failed: {op.error.message}")
    return str(model.name), f"{model.name}/builds/1"


def jobs_of(url: str, after: float) -> list[tuple[str, str, int]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT kind, state, attempts FROM jobs WHERE model LIKE %s "
            "AND create_time >= to_timestamp(%s)",
            (f"{PROJECT}/%", after),
        ).fetchall()
    return [(str(k), str(s), int(n)) for k, s, n in rows]


async def run(models: int) -> dict[str, Any]:
    db_name, url = create_database()
    procs: list[subprocess.Popen[str]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pg = url.replace("postgresql://", "postgresql+psycopg://")
            data = Path(tmp) / "data"
            for server_id in ("ops-a", "ops-b"):
                proc, address = start_server(
                    data, extra=[f"--database-url={pg}", f"--server-id={server_id}"]
                )
                procs.append(proc)
                if server_id == "ops-a":
                    address_a = address
                else:
                    address_b = address
            async with (
                grpc.aio.insecure_channel(address_a) as ca,
                grpc.aio.insecure_channel(address_b) as cb,
            ):
                a, b = Stub(ca), Stub(cb)
                t_build = time.perf_counter()
                made = [await built_model(a, i) for i in range(models)]
                build_s = time.perf_counter() - t_build
                started_wall = time.time() - 1  # the jobs of the change, not of the builds
                await asyncio.sleep(1.1)
                started = time.perf_counter()

                async def deploy(k: int, model: str, build: str) -> float:
                    stub = a if k % 2 == 0 else b
                    t0 = time.perf_counter()
                    op = await stub.CreateDeployment(
                        rpc.CreateDeploymentRequest(
                            parent=model,
                            build=build,
                            resources=pb.Resources(replicas=1, cpus=0.01),
                        )
                    )
                    ended = await finished(stub, op.name)
                    if ended.HasField("error"):
                        raise SystemExit(f"{model}: {ended.error.message}")
                    return time.perf_counter() - t0

                each = await asyncio.gather(
                    *(deploy(k, m, build) for k, (m, build) in enumerate(made))
                )
                wall = time.perf_counter() - started
            jobs = jobs_of(url, started_wall + 1)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        drop_database(db_name)
    kinds = Counter(kind for kind, _, _ in jobs)
    ms = sorted(x * 1000 for x in each)
    return {
        "models": models,
        "servers": 2,
        "builds_s": build_s,
        "wall_s": wall,
        "operations_per_s": models / wall,
        "operation_p50_ms": statistics.median(ms),
        "operation_p99_ms": ms[max(0, int(len(ms) * 0.99) - 1)],
        "jobs": len(jobs),
        "jobs_by_kind": dict(kinds),
        "jobs_run_twice": sum(1 for _, _, n in jobs if n > 1),
        "jobs_unfinished": sum(1 for _, state, _ in jobs if state != "done"),
    }


def summary(result: dict[str, Any]) -> list[Row]:
    n = result["models"]
    return [
        Row(
            f"{n} concurrent CreateDeployment on {n} models, 2 servers: operations/s",
            result["operations_per_s"],
        ),
        Row("same run: one operation, call to done, p99 ms", result["operation_p99_ms"]),
        Row(
            f"same run: jobs run twice or left unfinished (of {result['jobs']})",
            result["jobs_run_twice"] + result["jobs_unfinished"],
            target="0",
            met=result["jobs_run_twice"] + result["jobs_unfinished"] == 0,
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=100)
    p.add_argument("--smoke", action="store_true", help="10 models")
    args = p.parse_args()
    result = asyncio.run(run(10 if args.smoke else args.models))
    result["smoke"] = args.smoke
    for key, value in result.items():
        print(f"{key:<22} {value}")
    save_result("operations", result)
    if result["jobs_run_twice"] or result["jobs_unfinished"]:
        raise SystemExit("a job ran twice or was left unfinished")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
