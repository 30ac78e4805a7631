"""Models on one cluster: how the control plane's cost grows with the number of models.

Starts one local Ray cluster (4 logical CPUs) and `modelctl serve` on it (SQLite). For each
size N (default 1, 10, 25), models are added until N run (1 replica, 0.01 CPU each; every
model builds the same iris source, so all but the first build are cache hits): the new
models are built one after another, then deployed all at once, one CreateDeployment each
(operations at scale: the time from the first call to the last operation done, and the
jobs they made, none of which may have run twice or be left unfinished). Then:

- idle: 10 s with nothing changing: the control plane's CPU (the server and its driver
  process, as % of one core) and RSS;
- scale: one model 1 -> 2 replicas in place, seconds until DEPLOYED, and the control
  plane's CPU while it ran; then back to 1;
- new build: one model's new build (a changed source) built and deployed, seconds from
  CreateBuild to DEPLOYED; then back to its first build.

Each change is made ``--trials`` times per size (median reported, every trial kept).

Then the server stops and the anchor runs on the same cluster (bench/models_anchor.py,
a driver of its own): raw Serve given the same application N times in one declarative
config, at the same sizes (the applications a size adds handed over in one config, timed
until every one runs: the anchor of the operations above), and the same scale of one of
them, timed to RUNNING.

Targets (issue 22): a change at the largest N within 1.25x of the same change at 1 model,
and the scale within 1.10x of raw Serve's at the same N; idle control-plane CPU under 5%
of one core. Writes bench/results/models.json.

    .venv/bin/python bench/models.py [--sizes 1,10,25] [--trials 3] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

from procstat import cpu_s, family, rss_mb
from raycluster import free_port, start_cluster, stop_cluster
from serve import artifact_of, build, run_driver
from serverproc import ROOT, Row, save_result, start_on_ray
from timeline import Window, server_lines, show, timeline

from controlplane.api.client import Client
from controlplane.domain.states import ModelState
from controlplane.domain.types import DeployOptions, Resources
from workers.archive import zip_directory

IDLE_S = 10.0  # --smoke: SMOKE_IDLE_S
SMOKE_IDLE_S = 3.0
PROJECT = "projects/many"
TARGET_CHANGE_RATIO = 1.25
TARGET_ANCHOR_RATIO = 1.10
TARGET_IDLE_CPU_PCT = 5.0


async def deployed(c: Client, op_name: str) -> None:
    op = await c.wait(op_name, timeout_s=600)
    if op.error is not None:
        raise SystemExit(f"{op.name} failed: {op.error.message}")


async def built_model(c: Client, i: int, tmp: Path) -> str:
    """A new model with the iris build (a cache hit after the first), not deployed."""
    model = (await c.create_model(PROJECT, f"m{i:03d}")).name
    await build(c, model, ROOT / "examples" / "iris-v1", "predict", tmp)
    return model


async def bring_up(c: Client, fresh: list[str], db: Path) -> dict[str, Any]:
    """One CreateDeployment per new model, all at once, each followed to its end: the
    time from the first call to the last operation done, each operation's own time, and
    the jobs the calls made (none may have run twice or be left unfinished)."""
    started = time.perf_counter()

    async def deploy(model: str) -> float:
        t0 = time.perf_counter()
        await deployed(c, (await c.create_deployment(model, f"{model}/builds/1", small(1))).name)
        return time.perf_counter() - t0

    each = sorted(await asyncio.gather(*(deploy(m) for m in fresh)))
    wall = time.perf_counter() - started
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        jobs = conn.execute(
            f"SELECT kind, state, attempts FROM jobs WHERE kind != 'build' "
            f"AND model IN ({','.join('?' * len(fresh))})",
            fresh,
        ).fetchall()
    return {
        "added": len(fresh),
        "up_s": wall,
        "up_ops_per_s": len(fresh) / wall,
        "up_op_p50_s": statistics.median(each),
        "up_op_max_s": each[-1],
        "up_jobs": dict(Counter(str(kind) for kind, _, _ in jobs)),
        "up_jobs_run_twice": sum(1 for _, _, n in jobs if n > 1),
        "up_jobs_unfinished": sum(1 for _, state, _ in jobs if state != "done"),
    }


def small(replicas: int) -> Resources:
    return Resources(replicas=replicas, cpus=0.01)


async def timed(c: Client, pids: list[int], change: Any) -> tuple[float, float, Window]:
    """(seconds, control-plane CPU seconds, the client's marks) of ``change()`` until its
    operation is done and the model DEPLOYED."""
    cpu, w = cpu_s(pids), Window("change", "")
    model, op_name = await change()
    w.model = model
    w.mark("the call returned its operation")
    await deployed(c, op_name)
    w.mark("WaitOperation returned: done")
    m = await c.get_model(model)
    w.mark(f"GetModel returned: {m.state}")
    if m.state != ModelState.DEPLOYED:
        raise SystemExit(f"{model} is {m.state} after the change: {m.message}")
    return w.seconds, cpu_s(pids) - cpu, w


async def new_source(c: Client, model: str, tmp: Path, n: int) -> str:
    """The iris model with a line changed: a new build (not a cache hit)."""
    folder = tmp / f"iris-{n}"
    folder.mkdir(exist_ok=True)
    text = (ROOT / "examples" / "iris-v1" / "model.py").read_text()
    (folder / "model.py").write_text(f"{text}\n# revision {n}\n")
    for extra in (ROOT / "examples" / "iris-v1").iterdir():
        if extra.name != "model.py" and extra.is_file():
            (folder / extra.name).write_bytes(extra.read_bytes())
    zip_path = tmp / f"iris-{n}.zip"
    zip_directory(folder, zip_path)
    return (await c.upload_source(model, zip_path.read_bytes())).sha256


async def measure(
    c: Client, server_pid: int, models: list[str], tmp: Path, trials: int, idle_s: float
) -> dict[str, Any]:
    pids = family(server_pid)
    await asyncio.sleep(2)  # the last deploy's looks settle
    cpu, own, started = cpu_s(pids), cpu_s([server_pid]), time.perf_counter()
    await asyncio.sleep(idle_s)
    idle_pct = (cpu_s(pids) - cpu) / (time.perf_counter() - started) * 100
    server_pct = (cpu_s([server_pid]) - own) / (time.perf_counter() - started) * 100
    rss = rss_mb(pids)
    target = models[0]
    v1 = f"{target}/builds/1"
    scales: list[tuple[float, float, Window]] = []
    builds: list[tuple[float, float, Window]] = []
    for trial in range(trials):

        async def scale() -> tuple[str, str]:
            return target, (await c.create_deployment(target, v1, small(2))).name

        scales.append(await timed(c, pids, scale))
        await deployed(c, (await c.create_deployment(target, v1, small(1))).name)
        sha = await new_source(c, target, tmp, len(models) * 100 + trial)

        async def new_build(sha: str = sha) -> tuple[str, str]:
            op = await c.create_build(
                target, sha, "model.py", "predict", deploy=DeployOptions(resources=small(1))
            )
            return target, op.name

        builds.append(await timed(c, pids, new_build))
        await deployed(c, (await c.create_deployment(target, v1, small(1))).name)  # v1 again
    scale_s = statistics.median(t for t, _, _ in scales)
    scale_cpu = statistics.median(cpu for _, cpu, _ in scales)
    build_s = statistics.median(t for t, _, _ in builds)
    build_cpu = statistics.median(cpu for _, cpu, _ in builds)
    return {
        "models": len(models),
        "idle_cpu_pct": idle_pct,
        "idle_cpu_server_pct": server_pct,  # the rest: its driver process (Ray's client)
        "rss_mb": rss,
        "trials": trials,
        "scale_s": scale_s,  # medians of the trials
        "scale_all_s": [t for t, _, _ in scales],
        "scale_cpu_s": scale_cpu,
        "new_build_s": build_s,
        "new_build_all_s": [t for t, _, _ in builds],
        # the slowest scale's marks, for its timeline (taken out before the result is saved)
        "_worst_scale": max((w for _, _, w in scales), key=lambda w: w.seconds),
        "new_build_cpu_s": build_cpu,
    }


async def grow(
    address: str, server_pid: int, sizes: list[int], tmp: Path, trials: int, idle_s: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each size's figures, and the args of the anchor's application (our first build)."""
    points = []
    models: list[str] = []
    async with Client(address) as c:
        for n in sizes:
            fresh = [await built_model(c, i, tmp) for i in range(len(models), n)]
            up = await bring_up(c, fresh, tmp / "data" / "controlplane.db")
            models.extend(fresh)
            print(
                f"{n} models running ({up['added']} more at once in {up['up_s']:.1f} s)",
                flush=True,
            )
            point = {**await measure(c, server_pid, models, tmp, trials, idle_s), **up}
            print(
                f"  idle CPU {point['idle_cpu_pct']:.1f}% "
                f"(server {point['idle_cpu_server_pct']:.1f}%) RSS {point['rss_mb']:.0f} MB; "
                f"scale {point['scale_s']:.2f} s; new build {point['new_build_s']:.2f} s",
                flush=True,
            )
            points.append(point)
        v1 = await c.get_build(f"{models[0]}/builds/1")
    app_args = {
        "artifact_path": artifact_of(tmp / "data", v1.image),
        "file_path": v1.file_path,
        "function_name": v1.function_name,
        "build": v1.name,
    }
    return points, app_args


def run_anchor(args: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """Raw Serve at the same sizes, from a driver of its own (bench/models_anchor.py)."""
    points: list[dict[str, Any]] = run_driver("models_anchor.py", args, tmp, 3600, True)["points"]
    return points


def run(sizes: list[int], trials: int, idle_s: float = IDLE_S) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bm", dir="/tmp") as name:
        tmp = Path(name)
        cluster = start_cluster(tmp / "ray", tmp / "ray.log")
        try:
            http_port = free_port()
            # Its debug log in JSON: the slowest scale's timeline (bench/timeline.py).
            debug = ["--log-format=json", "--log-level=debug"]
            proc, address = start_on_ray(
                cluster.address, tmp / "data", http_port, debug, tmp / "log"
            )
            try:
                points, app_args = asyncio.run(grow(address, proc.pid, sizes, tmp, trials, idle_s))
            finally:
                proc.terminate()
                proc.wait(120)
            lines = server_lines(tmp / "log")
            for point in points:
                point["scale_timeline"] = timeline(point.pop("_worst_scale"), lines)
            # Ours stopped (its applications stay on Serve until the anchor deletes them).
            anchor_args = {
                "address": cluster.address,
                "http_port": http_port,
                "app_args": app_args,
                "sizes": sizes,
                "trials": trials,
            }
            anchor = run_anchor(anchor_args, tmp)
        finally:
            stop_cluster(cluster)
    for point, raw in zip(points, anchor, strict=True):
        point["anchor_scale_s"] = raw["scale_s"]
        point["anchor_scale_all_s"] = raw["scale_all_s"]
        point["anchor_scale_timeline"] = raw["worst_events"]
        point["anchor_up_s"] = raw["up_s"]
    first, last = points[0], points[-1]
    return {
        "sizes": sizes,
        "points": points,
        "scale_ratio": last["scale_s"] / first["scale_s"],
        "new_build_ratio": last["new_build_s"] / first["new_build_s"],
        "scale_anchor_ratio": last["scale_s"] / last["anchor_scale_s"],
        "leftover_ray_processes": len(cluster.leftovers),
    }


def summary(result: dict[str, Any]) -> list[Row]:
    first, last = result["points"][0], result["points"][-1]
    n, one = last["models"], first["models"]
    return [
        Row(
            f"one model's in-place scale 1 -> 2 with {n} models running s (anchor: raw "
            f"Serve given {n} applications in one config, the same scale)",
            last["scale_s"],
            last["anchor_scale_s"],
            f"ratio <= {TARGET_ANCHOR_RATIO:g}",
            result["scale_anchor_ratio"] <= TARGET_ANCHOR_RATIO,
        ),
        Row(
            f"one model's in-place scale 1 -> 2 with {n} models running s (anchor: with {one})",
            last["scale_s"],
            first["scale_s"],
            f"ratio <= {TARGET_CHANGE_RATIO:g}",
            result["scale_ratio"] <= TARGET_CHANGE_RATIO,
        ),
        Row(
            f"one model's new build, built and deployed, with {n} models running s "
            f"(anchor: with {one})",
            last["new_build_s"],
            first["new_build_s"],
            f"ratio <= {TARGET_CHANGE_RATIO:g}",
            result["new_build_ratio"] <= TARGET_CHANGE_RATIO,
        ),
        Row(
            f"{last['added']} more models at once ({last['added']} concurrent CreateDeployment, "
            f"{n - last['added']} running) until every one is DEPLOYED s (anchor: raw Serve "
            "given the same applications more in one config, until every one RUNNING)",
            last["up_s"],
            last["anchor_up_s"],
        ),
        Row(
            f"same: operations/s, {last['added']} at once (anchor: applications/s)",
            last["up_ops_per_s"],
            last["added"] / last["anchor_up_s"],
        ),
        Row(
            f"same: jobs run twice or left unfinished (of {sum(last['up_jobs'].values())})",
            last["up_jobs_run_twice"] + last["up_jobs_unfinished"],
            None,
            "0",
            last["up_jobs_run_twice"] + last["up_jobs_unfinished"] == 0,
        ),
        Row(
            f"control plane idle CPU with {n} models, % of one core",
            last["idle_cpu_pct"],
            first["idle_cpu_pct"],
            f"< {TARGET_IDLE_CPU_PCT:g}",
            last["idle_cpu_pct"] < TARGET_IDLE_CPU_PCT,
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,10,25", help="numbers of models, growing")
    p.add_argument("--trials", type=int, default=3, help="of each change, per size (median)")
    p.add_argument("--smoke", action="store_true", help="sizes 1 and 3, one trial, 3 s idle")
    args = p.parse_args()
    sizes = [1, 3] if args.smoke else [int(x) for x in args.sizes.split(",")]
    if sizes != sorted(sizes) or sizes[0] < 1:
        p.error("--sizes: growing numbers of models, from 1")
    result = run(sizes, 1, SMOKE_IDLE_S) if args.smoke else run(sizes, args.trials)
    result["smoke"] = args.smoke
    print(
        f"{'models':>8}{'added':>7}{'up s':>8}{'raw Serve':>11}{'idle CPU %':>12}{'RSS MB':>10}"
        f"{'scale s':>10}{'raw Serve':>11}{'build s':>10}"
    )
    for pt in result["points"]:
        print(
            f"{pt['models']:>8}{pt['added']:>7}{pt['up_s']:>8.1f}{pt['anchor_up_s']:>11.1f}"
            f"{pt['idle_cpu_pct']:>12.1f}{pt['rss_mb']:>10.0f}"
            f"{pt['scale_s']:>10.2f}{pt['anchor_scale_s']:>11.2f}{pt['new_build_s']:>10.2f}"
        )
    last = result["points"][-1]
    n = last["models"]
    show(f"ours, the slowest scale with {n} models", last["scale_timeline"])
    show(f"raw Serve, its slowest scale with {n} applications", last["anchor_scale_timeline"])
    save_result("models", result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
