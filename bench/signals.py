"""The cost of a replica's signals: the same replicas with them and without, in one run.

Starts one local Ray cluster of its own (bench/raycluster.py) and, from this driver,
Serve on it and the signals' collector first (``ray_backend._start_collector``, as
``RayBackend.start`` does). Then it hands Serve one declarative config (what
`serve deploy` submits) with two applications of the iris example (examples/iris-v1,
loaded from its folder as a replica loads an artifact), both through
``workers.ray_backend:build_app`` with the same replicas and CPUs, differing only in
``args.signals``: True (every request counted, timed and given an access line; stdout,
stderr and logging teed into lines; a thread pushing reports to the collector) or False.

The load is closed-loop: ``--callers`` connections on 127.0.0.1, each POSTing the iris
body and sending the next as soon as the answer is in (a minimal HTTP/1.1 keep-alive
client, so that the client's own CPU, on the same 2 cores, dilutes the difference as
little as it can). Each side gets ``--rounds`` segments of ``--seconds``, interleaved
(A B, then B A, ...: each side first in half the rounds, so drift and noise hit both).
Figures per side: the median over its segments of requests/s and p50 latency (a burst
of another process on this shared machine spoils a segment, not the figure; figures
pooled over all segments are saved too), p99 over all its requests, and the CPU per
request of every process that serves (the replicas, Serve's proxy and controller, the
collector, this client). Targets: requests/s with signals >= 0.95x without, p50 <= 1.05x.

The benchmark fails unless the instrumentation ran: the collector's figures of the
instrumented replicas must count every request sent to them (warm-up included), and the
plain application must have none. Writes bench/results/signals.json.

    .venv/bin/python bench/signals.py [--rounds 24] [--seconds 2.5] [--callers 8] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from httpload import PAYLOAD, POLL_S
from procstat import cpu_s
from raycluster import HOST, Cluster, free_port, ours_pids, start_cluster, stop_cluster
from serverproc import ROOT, Row, save_result

EXAMPLE = ROOT / "examples" / "iris-v1"
SIDES = ("signals", "plain")  # A, B
APPS = {"signals": "bench.signals", "plain": "bench.plain"}
ROUTES = {"signals": "/bench/signals", "plain": "/bench/plain"}
REPLICAS, REPLICA_CPUS = 2, 0.5  # each application's (the cluster has 4 logical CPUs)
WARM_UP = 50  # requests to each side before it is measured (counted too)
TARGET_THROUGHPUT = 0.95  # signals / plain, at least
TARGET_P50 = 1.05  # signals / plain, at most
COUNT_WAIT_S = 15.0  # for the replicas' last reports to reach the collector
FIGURES = ("requests_per_s", "p50_ms", "p99_ms")


# ---- Serve: two applications of the same model, signals on and off ------------------------


def app_config(side: str) -> dict[str, Any]:
    return {
        "name": APPS[side],
        "route_prefix": ROUTES[side],
        "import_path": "workers.ray_backend:build_app",
        "args": {
            "artifact_path": str(EXAMPLE),
            "file_path": "model.py",
            "function_name": "predict",
            "build": "iris-v1",
            "signals": side == "signals",
        },
        "deployments": [
            {
                "name": "model",
                "num_replicas": REPLICAS,
                "ray_actor_options": {"num_cpus": REPLICA_CPUS, "num_gpus": 0.0},
                "user_config": {"open": True, "keys": []},  # open to all, as --insecure-no-auth
            }
        ],
    }


@dataclass
class Serving:
    """Serve and the collector on the cluster, from this driver."""

    client: Any  # Serve's controller client
    collector: Any
    http_port: int

    def replica_pids(self) -> dict[str, list[int]]:
        """{side: its RUNNING replicas' pids} once both applications run, else {}."""
        apps = self.client.get_serve_details().get("applications") or {}
        out: dict[str, list[int]] = {}
        for side in SIDES:
            app = apps.get(APPS[side])
            if app is None or _value(app.get("status")) != "RUNNING":
                return {}
            found = [r for d in (app.get("deployments") or {}).values() for r in d["replicas"]]
            running = [int(r.get("pid") or 0) for r in found if _value(r["state"]) == "RUNNING"]
            if len(running) != REPLICAS or len(found) != REPLICAS:
                return {}
            out[side] = running
        return out

    def counted(self) -> tuple[dict[str, int], dict[str, int], int]:
        """Requests the collector's figures count per application (every replica), the
        lines it holds of the instrumented one by stream, and the lines it lost."""
        import ray

        requests: dict[str, int] = {}
        streams: dict[str, int] = {}
        lost = 0
        epoch, cursor = "", 0
        while True:
            batch = ray.get(self.collector.read.remote(epoch, cursor))
            if not epoch:
                for f in batch.replicas:
                    requests[f.app] = requests.get(f.app, 0) + f.requests
                lost = batch.lines_lost
            for line in batch.lines:
                if line.app == APPS["signals"]:
                    streams[line.stream] = streams.get(line.stream, 0) + 1
            if not batch.lines:
                return requests, streams, lost
            epoch, cursor = batch.epoch, batch.cursor


def _value(v: Any) -> str:
    return str(getattr(v, "value", v))


def start_serving(cluster: Cluster) -> Serving:
    import logging

    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    import ray
    from workers.ray_backend import _start_collector

    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    http_port = free_port()
    client = serve_api.serve_start(http_options={"host": HOST, "port": http_port})
    collector = _start_collector()  # before any replica, as RayBackend.start
    ray.get(collector.read.remote("", 0))  # it is up
    config = {
        "http_options": {"host": HOST, "port": http_port},
        "applications": [app_config(side) for side in SIDES],
    }
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    serving = Serving(client, collector, http_port)
    deadline = time.monotonic() + 300
    while not serving.replica_pids():
        if time.monotonic() > deadline:
            raise SystemExit(f"the two applications did not run in 300 s: {config}")
        time.sleep(POLL_S)
    return serving


# ---- the load: closed loop, HTTP/1.1 keep-alive ------------------------------------------


class Failed(Exception):
    pass


def request_bytes(port: int, path: str) -> bytes:
    body = json.dumps(PAYLOAD).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() != "chunked":
        raise Failed(f"an answer without a length: {head!r}")
    body = b""
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        body += (await reader.readexactly(size + 2))[:-2]
    await reader.readuntil(b"\r\n")  # the last chunk's (empty) trailer
    return status, body


@dataclass
class Segment:
    """One side's closed-loop run: its latencies and how long it took."""

    side: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # per process group


async def closed_loop(port: int, side: str, callers: int, seconds: float) -> Segment:
    request = request_bytes(port, ROUTES[side])
    seg = Segment(side)
    connections = [await asyncio.open_connection(HOST, port) for _ in range(callers)]

    async def caller(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (now := time.perf_counter()) < end:
            writer.write(request)
            status, body = await read_response(reader)
            seg.latencies.append(time.perf_counter() - now)
            if status != 200:
                seg.failed.append(f"HTTP {status}: {body[:200]!r}")

    started = time.perf_counter()
    end = started + seconds
    try:
        await asyncio.gather(*(caller(r, w) for r, w in connections))
    finally:
        for _, w in connections:
            w.close()
    seg.seconds = time.perf_counter() - started
    return seg


async def warm_up(port: int, side: str, n: int) -> int:
    """``n`` requests one after another, the first until it is a 200 with the iris answer;
    returns how many were sent (every one reached a replica)."""
    request = request_bytes(port, ROUTES[side])
    reader, writer = await asyncio.open_connection(HOST, port)
    sent = 0
    deadline = time.monotonic() + 60
    try:
        while sent < n:
            writer.write(request)
            status, body = await read_response(reader)
            if status == 200:
                sent += 1
                if json.loads(body)["response"]["classes"] != ["setosa", "virginica"]:
                    raise Failed(f"{side} answered {body[:200]!r}")
            elif status in (404, 503) and not sent and time.monotonic() < deadline:
                # The route reaches the proxy a moment after RUNNING; not a replica's answer.
                await asyncio.sleep(POLL_S)
            else:
                raise Failed(f"{side} warm-up: HTTP {status}: {body[:200]!r}")
    finally:
        writer.close()
    return sent


# ---- CPU of every process that serves (from /proc) ----------------------------------------


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def process_groups(cluster: Cluster, replicas: dict[str, list[int]]) -> dict[str, list[int]]:
    """The processes whose CPU is measured: each side's replicas, and of this cluster's
    workers (children of its raylet) Serve's proxy, Serve's controller, the collector."""
    raylets = {p for p in ours_pids(cluster.temp_dir) if "raylet" in _title(p)}
    workers: dict[str, list[int]] = {"proxy": [], "controller": [], "collector": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or _ppid(int(entry.name)) not in raylets:
            continue
        title = _title(int(entry.name))
        for group, prefix in (
            ("proxy", "ray::ProxyActor"),
            ("controller", "ray::ServeController"),
            ("collector", "ray::Collector"),
        ):
            if title.startswith(prefix):
                workers[group].append(int(entry.name))
    groups = {f"replicas {side}": pids for side, pids in replicas.items()}
    return groups | workers


def cpu_now(groups: dict[str, list[int]]) -> dict[str, float]:
    now = {group: cpu_s(pids) for group, pids in groups.items()}
    now["client"] = time.process_time()
    return now


# ---- the run ------------------------------------------------------------------------------


@dataclass
class Plan:
    rounds: int
    seconds: float
    callers: int


def order_of(r: int) -> tuple[str, str]:
    return SIDES if r % 2 == 0 else (SIDES[1], SIDES[0])


async def drive(plan: Plan, port: int, groups: dict[str, list[int]]) -> list[Segment]:
    segments: list[Segment] = []
    for r in range(plan.rounds):
        for side in order_of(r):
            before = cpu_now(groups)
            seg = await closed_loop(port, side, plan.callers, plan.seconds)
            after = cpu_now(groups)
            seg.cpu_s = {g: after[g] - before[g] for g in after}
            if seg.failed:
                raise SystemExit(f"{side}: {len(seg.failed)} requests failed: {seg.failed[:3]}")
            print(
                f"round {r + 1}/{plan.rounds} {side:<8} {len(seg.latencies) / seg.seconds:7.1f}"
                f" requests/s  p50 {_pct(seg.latencies, 50) * 1000:6.2f} ms",
                flush=True,
            )
            segments.append(seg)
    return segments


def _pct(values: Iterable[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(len(ordered) * p / 100) - 1))]


def segment_figures(seg: Segment) -> dict[str, float]:
    return {
        "requests_per_s": len(seg.latencies) / seg.seconds,
        "p50_ms": _pct(seg.latencies, 50) * 1000,
        "p99_ms": _pct(seg.latencies, 99) * 1000,
    }


def side_figures(segments: list[Segment], side: str) -> dict[str, Any]:
    """A side's figures: requests/s and p50, the median of its segments' (a burst of
    another process on the machine spoils a segment or two, not the figure); p99 over
    all its requests. Pooled figures too."""
    mine = [s for s in segments if s.side == side]
    per = [segment_figures(s) for s in mine]
    latencies = [x for s in mine for x in s.latencies]
    n = len(latencies)
    seconds = sum(s.seconds for s in mine)
    cpu: dict[str, float] = {}
    for s in mine:
        for g, v in s.cpu_s.items():
            cpu[g] = cpu.get(g, 0.0) + v
    pooled = {
        "requests": n,
        "seconds": seconds,
        "requests_per_s": n / seconds,
        "p50_ms": _pct(latencies, 50) * 1000,
        "p99_ms": _pct(latencies, 99) * 1000,
    }
    return {
        "requests_per_s": statistics.median(f["requests_per_s"] for f in per),
        "p50_ms": statistics.median(f["p50_ms"] for f in per),
        "p99_ms": pooled["p99_ms"],  # a short segment has too few requests for its own
        "segments": per,
        "pooled": pooled,
        # Each group's CPU while this side was loaded, per request of it.
        "cpu_ms_per_request": {g: v * 1000 / n for g, v in sorted(cpu.items())},
    }


def check_counted(serving: Serving, sent: dict[str, int]) -> dict[str, Any]:
    """The instrumentation ran: the collector counts every request sent to the
    instrumented replicas, and none of the plain ones'. Waits for their last reports."""
    deadline = time.monotonic() + COUNT_WAIT_S
    while True:
        requests, streams, lost = serving.counted()
        counted = requests.get(APPS["signals"], 0)
        if counted == sent["signals"] or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if counted != sent["signals"]:
        raise SystemExit(
            f"the instrumented replicas counted {counted} requests, {sent['signals']} were "
            f"sent to them: the instrumentation did not run as it should ({requests})"
        )
    if APPS["plain"] in requests:
        raise SystemExit(f"the plain replicas reported signals: {requests}")
    return {"sent": sent["signals"], "counted": counted, "lines": streams, "lost": lost}


def measure(plan: Plan, cluster: Cluster) -> dict[str, Any]:
    serving = start_serving(cluster)
    replicas = serving.replica_pids()
    groups = process_groups(cluster, replicas)
    port = serving.http_port

    async def run_all() -> tuple[dict[str, int], list[Segment]]:
        sent = {side: await warm_up(port, side, WARM_UP) for side in SIDES}
        segments = await drive(plan, port, groups)
        for seg in segments:
            sent[seg.side] += len(seg.latencies)
        return sent, segments

    sent, segments = asyncio.run(run_all())
    counted = check_counted(serving, sent)
    sides = {side: side_figures(segments, side) for side in SIDES}
    on, off = sides["signals"], sides["plain"]
    # Each round's two segments side by side: signals / plain.
    pairs = [
        {k: segment_figures(a)[k] / segment_figures(b)[k] for k in FIGURES}
        for a, b in zip(
            [s for s in segments if s.side == "signals"],
            [s for s in segments if s.side == "plain"],
            strict=True,
        )
    ]
    if set(serving.replica_pids().get("signals", [])) != set(replicas["signals"]):
        raise SystemExit("a replica restarted during the run")
    return {
        "sides": sides,
        "ratios": {k: on[k] / off[k] for k in FIGURES},
        "pooled_ratios": {k: on["pooled"][k] / off["pooled"][k] for k in FIGURES},
        "round_ratios": pairs,
        "signals_check": counted,
        "processes": {g: len(p) for g, p in groups.items()},
    }


def disconnect() -> None:
    """This driver leaves the cluster before it stops: a driver whose GCS is gone waits
    60 s for it at exit, then aborts the process."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run(plan: Plan) -> dict[str, Any]:
    started = time.perf_counter()
    # A short temp dir: Ray's socket paths under it must stay under 107 bytes.
    with tempfile.TemporaryDirectory(prefix="bg", dir="/tmp") as name:
        tmp = Path(name)
        cluster = start_cluster(tmp / "ray", tmp / "ray.log")
        try:
            result = measure(plan, cluster)
        finally:
            disconnect()
            stop_cluster(cluster)
    return result | {
        "rounds": plan.rounds,
        "segment_s": plan.seconds,
        "callers": plan.callers,
        "replicas": REPLICAS,
        "replica_cpus": REPLICA_CPUS,
        "leftover_ray_processes": len(cluster.leftovers),
        "seconds": time.perf_counter() - started,
    }


# ---- the table ----------------------------------------------------------------------------


def summary(result: dict[str, Any]) -> list[Row]:
    on, off, ratios = result["sides"]["signals"], result["sides"]["plain"], result["ratios"]
    load = f"{result['callers']} callers, {result['replicas']} replicas"
    check = result["signals_check"]
    return [
        Row(
            f"invocations/s with signals, {load}",
            on["requests_per_s"],
            off["requests_per_s"],
            f"ratio >= {TARGET_THROUGHPUT}",
            ratios["requests_per_s"] >= TARGET_THROUGHPUT,
        ),
        Row(
            f"invocation p50 ms with signals, {load}",
            on["p50_ms"],
            off["p50_ms"],
            f"ratio <= {TARGET_P50}",
            ratios["p50_ms"] <= TARGET_P50,
        ),
        Row(f"invocation p99 ms with signals, {load}", on["p99_ms"], off["p99_ms"]),
        Row(
            f"invocations counted by signals (of {check['sent']} sent)",
            check["counted"],
            None,
            str(check["sent"]),
            check["counted"] == check["sent"],
        ),
    ]


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"


def show(result: dict[str, Any]) -> None:
    print(f"\n{'figure':<58}{'signals':>9}{'plain':>9}{'ratio':>8}  target")
    for r in summary(result):
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else ""
        met = "" if r.met is None or r.met else "  MISSED"
        anchor = f"{_num(r.anchor):>9}" if r.anchor is not None else " " * 9
        print(f"{r.figure:<58}{_num(r.ours):>9}{anchor}{ratio:>8}  {r.target}{met}")
    print("\nCPU ms per invocation, each process group, while that side was loaded:")
    on, off = result["sides"]["signals"]["cpu_ms_per_request"], result["sides"]["plain"]
    for group in on:
        print(f"  {group:<20}{on[group]:>9.3f}{off['cpu_ms_per_request'][group]:>9.3f}")
    rounds = ", ".join(f"{x['requests_per_s']:.3f}" for x in result["round_ratios"])
    pooled = ", ".join(f"{k} {v:.3f}" for k, v in result["pooled_ratios"].items())
    c = result["signals_check"]
    print(
        f"requests/s ratio per round: {rounds}\npooled over all segments, ratios: {pooled}\n"
        f"collector: {c['counted']} of {c['sent']} "
        f"counted; its lines by stream {c['lines']} ({c['lost']} lost); leftover Ray "
        f"processes: {result['leftover_ray_processes']}; {result['seconds']:.0f} s in all"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=24, help="even: each side first as often")
    p.add_argument("--seconds", type=float, default=2.5, help="of load per side per round")
    p.add_argument("--callers", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="one round of 2 s per side")
    args = p.parse_args()
    plan = (
        Plan(1, 2.0, args.callers) if args.smoke else Plan(args.rounds, args.seconds, args.callers)
    )
    result = run(plan)
    result["smoke"] = args.smoke
    show(result)
    save_result("signals", result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
