"""Build cache: a cold build beside unchanged rebuilds (cache hits), in one run.

Starts `modelctl serve` (fake backend: builds run the real builder in the server's
process; SQLite in a temp dir) as its own process, builds the iris example (with a
requirement from the package index unless --smoke) once, then rebuilds the same
inputs N times. Each time is CreateBuild until its operation is done, seen by a
client over gRPC on 127.0.0.1. Prints the figures and the ratio hit/cold beside the
target (a hit under 0.5 s); writes bench/results/builds.json.

    .venv/bin/python bench/builds.py [--rebuilds 20] [--requirement six==1.17.0] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from serverproc import ROOT, Row, save_result, start_server

from controlplane.api.client import Client
from controlplane.domain.types import Build
from workers.archive import zip_directory

TARGET_HIT_S = 0.5


async def timed_build(c: Client, model: str, sha: str) -> tuple[float, Build]:
    started = time.perf_counter()
    op = await c.create_build(model, sha, "model.py", "predict")
    op = await c.wait(op.name, timeout_s=900)
    elapsed = time.perf_counter() - started
    if op.error is not None:
        raise SystemExit(f"build failed: {op.error.message}")
    return elapsed, await c.get_build(op.target)


async def measure(address: str, source: Path, rebuilds: int) -> dict[str, float]:
    async with Client(address) as c:
        model = (await c.create_model("projects/bench", "iris")).name
        data = await asyncio.to_thread(source.read_bytes)
        uploaded = await c.upload_source(model, data)
        cold_s, first = await timed_build(c, model, uploaded.sha256)
        if first.cache_hit:
            raise SystemExit("the first build was a cache hit: the data dir is not fresh")
        hits = []
        for _ in range(rebuilds):
            elapsed, b = await timed_build(c, model, uploaded.sha256)
            if not b.cache_hit or b.image != first.image:
                raise SystemExit(f"rebuild {b.name} was not a cache hit of {first.image}")
            hits.append(elapsed)
    hits.sort()
    return {
        "rebuilds": rebuilds,
        "packages": len(first.packages),
        "cold_build_s": cold_s,
        "hit_p50_s": statistics.median(hits),
        "hit_max_s": hits[-1],
        "hit_over_cold": statistics.median(hits) / cold_s,
    }


async def run(rebuilds: int, requirement: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (src / "model.py").write_text((ROOT / "examples" / "iris-v1" / "model.py").read_text())
        if requirement:
            (src / "requirements.txt").write_text(requirement + "\n")
        zip_directory(src, Path(tmp) / "src.zip")
        proc, address = start_server(Path(tmp) / "data")
        try:
            return await measure(address, Path(tmp) / "src.zip", rebuilds)
        finally:
            proc.terminate()
            proc.wait(30)


def summary(result: dict[str, float]) -> list[Row]:
    return [
        Row(
            "unchanged rebuild (cache hit) p50 s",
            result["hit_p50_s"],
            result["cold_build_s"],
            f"< {TARGET_HIT_S:g} s",
            result["hit_max_s"] < TARGET_HIT_S,
        )
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rebuilds", type=int, default=20)
    p.add_argument("--requirement", default="six==1.17.0", help="'' for none")
    p.add_argument("--smoke", action="store_true", help="3 rebuilds, no requirement (offline)")
    args = p.parse_args()
    rebuilds, requirement = (3, "") if args.smoke else (args.rebuilds, args.requirement)
    result = asyncio.run(run(rebuilds, requirement))
    print(f"{'figure':<30}{'value':>12}{'target':>12}")
    print(f"{'packages installed':<30}{result['packages']:>12.0f}")
    print(f"{'cold build s':<30}{result['cold_build_s']:>12.3f}")
    print(f"{'cache hit p50 s':<30}{result['hit_p50_s']:>12.3f}{TARGET_HIT_S:>12.1f}")
    print(f"{'cache hit max s':<30}{result['hit_max_s']:>12.3f}{TARGET_HIT_S:>12.1f}")
    print(f"{'hit / cold':<30}{result['hit_over_cold']:>12.3f}")
    save_result("builds", result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
