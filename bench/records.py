"""Records at scale: List with pagination over 10,000 models and 100,000 deployments.

Fills a fresh PostgreSQL database (migrated by the server's own code) with 10,000
stopped models, 9 deployments each, plus one model with 10,000 deployments: 100,000
deployment records. Then pages through them over gRPC on `modelctl serve` (its own
process) and, as the anchor, runs the same keyset query straight on PostgreSQL with
psycopg (the big model: 5 rounds, ours then the anchor in each, so both see the same
moments of a busy machine). Prints p50/p99 per page and the ratio; target p99 < 20 ms. Writes
bench/results/records.json.

    .venv/bin/python bench/records.py [--models 10000] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
from serverproc import Row, Stub, save_result, start_server

from controlplane.storage.db import Database
from modellifecycle.v1 import service_pb2 as rpc

R = TypeVar("R")
PG_ADMIN = os.environ.get("CP_TEST_PG", "postgresql://root@127.0.0.1:5432/test")
PAGE = 100
TARGET_P99_MS = 20.0
BIG = "projects/bench/models/big"

_MODELS = """
INSERT INTO models (name, project, display_name, description, state, active_deployment,
    message, running_operation, next_build_version, next_deployment_number, revision,
    create_time, update_time)
SELECT 'projects/bench/models/m' || lpad(i::text, 6, '0'), 'bench', '', '', 'STOPPED', '',
    '', '', 2, %(per)s + 1, 0, now(), now()
FROM generate_series(1, %(models)s) AS i
UNION ALL
SELECT %(big)s, 'bench', '', '', 'STOPPED', '', '', '', 2, %(big_n)s + 1, 0, now(), now()
"""
_DEPLOYMENTS = """
INSERT INTO deployments (name, model, number, build, replicas, cpus, memory_mib, gpus,
    environment, state, observed_replicas, message, restart_generation, applied,
    expect_roll, previous_replica_ids, revision, create_time, update_time)
SELECT m.name || '/deployments/' || n, m.name, n, m.name || '/builds/1', 2, 0.5, 512, 0,
    '{}', 'STOPPED', '[]', '', 0, true, false, '[]', 0, now(), now()
FROM models AS m, generate_series(1, CASE WHEN m.name = %(big)s THEN %(big_n)s
                                          ELSE %(per)s END) AS n
ORDER BY n, m.id
"""
# The anchor: what the server's keyset page asks of the database, as one plain query.
_ANCHOR = """
SELECT * FROM deployments WHERE model = %s AND (%s::bigint IS NULL OR id < %s)
ORDER BY id DESC LIMIT %s
"""


def create_database() -> tuple[str, str]:
    name = f"cp_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    return name, f"{base}/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill(url: str, models: int, per: int, big_n: int) -> int:
    db = Database(url.replace("postgresql://", "postgresql+psycopg://"))
    db.migrate()
    db.close()
    with psycopg.connect(url) as conn:
        args = {"models": models, "per": per, "big": BIG, "big_n": big_n}
        conn.execute(_MODELS, args)
        conn.execute(_DEPLOYMENTS, args)
        conn.execute("ANALYZE")
        row = conn.execute("SELECT count(*) FROM deployments").fetchone()
        return int(row[0]) if row else 0


def stats(seconds: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in seconds)
    return {
        "pages": len(ms),
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[max(0, int(len(ms) * 0.99) - 1)],
    }


async def timed(call: Awaitable[R], into: list[float]) -> R:
    started = time.perf_counter()
    result = await call
    into.append(time.perf_counter() - started)
    return result


async def page_all_models(stub: Stub) -> list[float]:
    spent: list[float] = []
    token = ""
    while True:
        req = rpc.ListModelsRequest(parent="projects/bench", page_size=PAGE, page_token=token)
        resp = await timed(stub.ListModels(req), spent)
        token = resp.next_page_token
        if not token:
            return spent


async def page_deployments(stub: Stub, model: str, spent: list[float]) -> int:
    token, seen = "", 0
    while True:
        req = rpc.ListDeploymentsRequest(parent=model, page_size=PAGE, page_token=token)
        resp = await timed(stub.ListDeployments(req), spent)
        seen += len(resp.deployments)
        token = resp.next_page_token
        if not token:
            return seen


def anchor_pages(url: str, model: str, spent: list[float]) -> int:
    seen, last = 0, None
    with psycopg.connect(url) as conn:
        while True:
            started = time.perf_counter()
            rows = conn.execute(_ANCHOR, (model, last, last, PAGE + 1)).fetchall()
            spent.append(time.perf_counter() - started)
            page = rows[:PAGE]
            seen += len(page)
            if len(rows) <= PAGE:
                return seen
            last = page[-1][0]


async def measure(address: str, url: str, models: int, samples: int, rounds: int) -> dict[str, Any]:
    small = [
        f"projects/bench/models/m{i:06d}" for i in random.sample(range(1, models + 1), samples)
    ]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = Stub(channel)
        await stub.ListModels(rpc.ListModelsRequest(parent="projects/bench", page_size=1))
        model_pages = await page_all_models(stub)
        big: list[float] = []
        anchor_big: list[float] = []
        for _ in range(rounds):  # ours, then the anchor, round after round: same machine
            big_seen = await page_deployments(stub, BIG, big)
            anchor_pages(url, BIG, anchor_big)
        few: list[float] = []
        for m in small:
            await page_deployments(stub, m, few)
    anchor_few: list[float] = []
    for m in small:
        anchor_pages(url, m, anchor_few)
    return {
        "list_models": stats(model_pages),
        "list_deployments_big": {**stats(big), "records": big_seen},
        "list_deployments_small": stats(few),
        "anchor_big": stats(anchor_big),
        "anchor_small": stats(anchor_few),
    }


async def run(models: int, per: int, big_n: int, samples: int, rounds: int) -> dict[str, Any]:
    name, url = create_database()
    try:
        started = time.perf_counter()
        deployments = await asyncio.to_thread(fill, url, models, per, big_n)
        fill_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            proc, address = start_server(
                Path(tmp) / "data",
                extra=[f"--database-url={url.replace('postgresql://', 'postgresql+psycopg://')}"],
            )
            try:
                result = await measure(address, url, models, samples, rounds)
            finally:
                proc.terminate()
                proc.wait(30)
        return {"models": models + 1, "deployments": deployments, "fill_s": fill_s, **result}
    finally:
        drop_database(name)


def summary(result: dict[str, Any]) -> list[Row]:
    target = f"< {TARGET_P99_MS:g}"
    models, big, few = (
        result["list_models"],
        result["list_deployments_big"],
        result["list_deployments_small"],
    )
    n = f"{result['models']:,} models, {result['deployments']:,} deployments"
    return [
        Row(
            f"ListModels p99 ms ({n})",
            models["p99_ms"],
            None,
            target,
            models["p99_ms"] < TARGET_P99_MS,
        ),
        Row(
            f"ListDeployments p99 ms, one model with {big['records']:,}",
            big["p99_ms"],
            result["anchor_big"]["p99_ms"],
            target,
            big["p99_ms"] < TARGET_P99_MS,
        ),
        Row(
            "ListDeployments p99 ms, small models",
            few["p99_ms"],
            result["anchor_small"]["p99_ms"],
            target,
            few["p99_ms"] < TARGET_P99_MS,
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=10_000)
    p.add_argument("--smoke", action="store_true", help="200 models, 1,000 + 1,800 deployments")
    args = p.parse_args()
    if args.smoke:
        result = asyncio.run(run(200, 9, 1_000, 20, 1))
    else:
        result = asyncio.run(run(args.models, 9, 10_000, 200, 5))
    print(f"{result['models']:,} models, {result['deployments']:,} deployments (PostgreSQL)")
    print(f"{'page of ' + str(PAGE):<34}{'pages':>7}{'p50 ms':>9}{'p99 ms':>9}{'target':>8}")
    for label, key in (
        ("ListModels (all)", "list_models"),
        ("ListDeployments (big model)", "list_deployments_big"),
        ("ListDeployments (200 small)", "list_deployments_small"),
        ("anchor: same SQL, big model", "anchor_big"),
        ("anchor: same SQL, small models", "anchor_small"),
    ):
        r = result[key]
        target = f"{TARGET_P99_MS:>8.0f}" if not key.startswith("anchor") else ""
        print(f"{label:<34}{r['pages']:>7}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{target}")
    ratio = result["list_deployments_big"]["p99_ms"] / result["anchor_big"]["p99_ms"]
    print(f"big model p99, ours / plain SQL: {ratio:.1f}x")
    result["big_p99_over_anchor"] = ratio
    save_result("records", result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
