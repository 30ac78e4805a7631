"""A traffic split's extra hop, and failed requests during a rollout, on Ray Serve, in one run.

Starts one local Ray cluster for the whole run (raycluster.py: `ray start --head --block`,
4 logical CPUs, its own process group) and `modelctl serve --ray-address=...` on it
(SQLite in a temp dir). Builds the iris example (examples/iris-v1, `predict`) for two
models, untimed, each build with no_cache so that every build is a build of its own:

- **the hop.** Model `iris-plain` serves build 1 (1 replica, 0.1 CPU): today's path, the
  proxy straight to its replica. Model `iris-split` serves build 1 the same way, then
  SetTraffic {build 1: 1, build 2: 99}: its replica of build 1 (the stable build) sends
  99% of requests through a Serve handle to the application `bench.iris-split.candidate`
  (build 2, the same resources) and returns that answer. One client process (raw HTTP/1.1
  keep-alive connections, as signals.py's) sends both a paced open-loop load of 25
  requests/s each (--rate), interleaved (one to each model every 40 ms, 20 ms apart), to
  127.0.0.1 only, for 30 s (--smoke: 5 s) after 2 s (1 s) not counted. Latency is counted
  from each request's scheduled time (a late send counts against the server). Of the
  split model, only requests answered by build 2 (forwarded) are counted. Figures: p50
  and p99 of each and their differences (split - not split). Targets: p50 difference
  <= 1 ms, p99 difference <= 3 ms, 0 failed requests.
- **rollouts.** The split model is stopped; under the same paced load on `iris-plain`
  alone, an IMMEDIATE re-deploy of its build 2, then a CANARY rollout of its
  build 3 (steps 10, 50, 100 %, 2 s bake each, gates: error rate <= 1% over >= 10
  requests; --smoke: steps 50, 100, 1 s bake). Each window runs from just before the
  CreateDeployment until the operation is done plus 1 s. Figures: failed requests
  (non-200 answers and connection errors) and the time from CreateDeployment until its
  operation is done. Target: 0 failed for both.

Why 25 requests/s and not 100: on the 2-core machine the proxy, the control plane, the
replicas and the client share, Serve costs ~7 ms of CPU per request in its proxy, ~6-8
ms in a replica that answers and ~9-10 ms in one that forwards (~5 ms in the candidate),
so 100/s to each model asks for ~3.5 cores: the load saturates (answers seconds late,
timeouts) and the figures measure the queue, not the hop. 25/s each is ~1 core. Pass
--rate 100 on a machine with the cores for it.

Writes bench/results/traffic.json (with the machine it ran on and the "smoke" flag).

    .venv/bin/python bench/traffic.py [--seconds 30] [--rate 25] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from httpload import PAYLOAD, TAIL_S, warm_up
from raycluster import HOST, Cluster, free_port, start_cluster, stop_cluster
from run import machine
from serverproc import MODELCTL, ROOT, Row, save_result, start_process
from signals import Failed, read_response

from controlplane.api.client import Client
from controlplane.domain.states import ModelState
from controlplane.domain.traffic import Gates, Strategy, StrategyKind
from controlplane.domain.types import Operation, Resources
from workers.archive import zip_directory

PROJECT = "projects/bench"
EXAMPLE = ROOT / "examples" / "iris-v1"
RATE = 25.0  # requests/s to each model (the module's doc says why not 100)
CPUS = 0.1
SPLIT = 99  # percent of the split model's requests forwarded to build 2
TARGET_P50_DIFF_MS = 1.0
TARGET_P99_DIFF_MS = 3.0
TIMEOUT_S = 10.0  # a request without its answer by then failed
IDLE_MAX_S = 30.0  # a keep-alive connection idle longer is closed, not used again
GATES = Gates(max_error_rate=0.01, min_requests=10)
SETTLE_S = 1.0  # load before a change, and between the two changes
STARTED = time.perf_counter()


def say(what: str) -> None:
    """A line of progress, with the seconds since this script started."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {what}", flush=True)


# ---- a paced open-loop load ---------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    target: str  # the name the load was given for the URL
    due: float  # perf_counter when it was scheduled to go
    lag_ms: float  # how late it went (this process's own delay)
    ms: float  # from ``due`` until its answer
    outcome: str  # "" for a 200, else what went wrong
    build: str  # the build that answered (the answer's "build"), "" if none


def _build_of(body: bytes) -> str:
    with suppress(ValueError, AttributeError, TypeError):
        return str(json.loads(body).get("build", ""))
    return ""


class Endpoint:
    """HTTP/1.1 keep-alive connections to one model's endpoint (127.0.0.1 only), each
    carrying one request at a time, opened as needed and kept for the next: a raw client
    (signals.py's) costs this process far less CPU per request than httpx, which here
    shares the cores with Serve."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.hostname != HOST or parts.port is None:
            raise SystemExit(f"the load goes to {HOST} only, not {url}")
        self.port = parts.port
        body = json.dumps(PAYLOAD).encode()
        self.request = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        # (reader, writer, when it last answered)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.opened = 0

    async def post(self) -> tuple[int, bytes]:
        """One request on an idle connection or a new one; (status, body)."""
        while self.idle:
            reader, writer, used = self.idle.pop()
            # Serve's proxy keeps a connection 90 s: one idle for a third of that, or that
            # the proxy closed, is not used again (its request would fail for nothing).
            if not reader.at_eof() and time.perf_counter() - used < IDLE_MAX_S:
                break
            writer.close()
        else:
            reader, writer = await asyncio.open_connection(HOST, self.port)
            self.opened += 1
        try:
            async with asyncio.timeout(TIMEOUT_S):
                writer.write(self.request)
                status, body = await read_response(reader)
        except BaseException:
            writer.close()
            raise
        self.idle.append((reader, writer, time.perf_counter()))
        return status, body

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


@dataclass
class Paced:
    """``rate`` requests/s to each of ``urls`` on a fixed schedule, interleaved (the
    targets' schedules offset by an equal share of one interval), each request sent at
    its time whatever the earlier ones are doing (open loop), until stopped."""

    urls: Mapping[str, str]
    rate: float
    answers: list[Answer] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Future[None] | None = None
    connections: dict[str, int] = field(default_factory=dict)  # opened, by target

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stops sending; returns once every request sent has its answer."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _one(self, endpoint: Endpoint, target: str, due: float) -> None:
        sent, build = time.perf_counter(), ""
        try:
            status, body = await endpoint.post()
            outcome = "" if status == 200 else f"HTTP {status}: {body[:200]!r}"
            build = _build_of(body)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, Failed) as e:
            outcome = f"{type(e).__name__}: {e}"
        done = time.perf_counter()
        self.answers.append(
            Answer(target, due, (sent - due) * 1000, (done - due) * 1000, outcome, build)
        )

    async def _run(self) -> None:
        endpoints = {t: Endpoint(u) for t, u in self.urls.items()}
        interval = 1 / self.rate
        offsets = [(t, interval * i / len(self.urls)) for i, t in enumerate(self.urls)]
        pending: set[asyncio.Task[None]] = set()
        try:
            start = time.perf_counter() + 0.05
            n = 0
            while not self._stop.is_set():
                for target, offset in offsets:
                    due = start + n * interval + offset
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                    task = asyncio.create_task(self._one(endpoints[target], target, due))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                n += 1
            await asyncio.gather(*pending)
        finally:
            for target, endpoint in endpoints.items():
                endpoint.close()
                self.connections[target] = endpoint.opened

    def window(self, start: float, end: float, target: str | None = None) -> list[Answer]:
        return [
            a
            for a in self.answers
            if start <= a.due <= end and (target is None or a.target == target)
        ]


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    if not sorted_ms:
        return math.nan
    return sorted_ms[max(0, math.ceil(len(sorted_ms) * q) - 1)]


def version(build: str) -> str:
    """projects/p/models/m/builds/2 -> "2"."""
    return build.rsplit("/", 1)[-1]


def counts(answers: Sequence[Answer]) -> dict[str, Any]:
    failed = [a.outcome for a in answers if a.outcome]
    return {
        "sent": len(answers),
        "failed": len(failed),
        "non_200": sum(o.startswith("HTTP ") for o in failed),
        "errors": sum(not o.startswith("HTTP ") for o in failed),
        "examples": sorted(set(failed))[:3],
        # answers by the version of the build that answered them
        "builds": dict(sorted(collections.Counter(version(a.build) for a in answers).items())),
    }


def latency(answers: Sequence[Answer]) -> dict[str, Any]:
    ms = sorted(a.ms for a in answers)
    lag = sorted(a.lag_ms for a in answers)
    return {
        "counted": len(ms),
        "p50_ms": percentile(ms, 0.50),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": ms[-1] if ms else math.nan,
        "send_lag_p99_ms": percentile(lag, 0.99),
    }


# ---- the control plane, a client over gRPC ------------------------------------------------


async def done(c: Client, op: Operation, what: str) -> Operation:
    op = await c.wait(op.name, timeout_s=300)
    if op.error is not None:
        raise SystemExit(f"{what}: {op.name} failed: {op.error.reason}: {op.error.message}")
    return op


async def build(c: Client, model: str, source_zip: bytes) -> str:
    """A build of its own (no cache) of the iris example; its name."""
    source = await c.upload_source(model, source_zip)
    op = await c.create_build(model, source.sha256, "model.py", "predict", no_cache=True)
    return (await done(c, op, f"a build of {model}")).target


async def deploy(c: Client, model: str, build_name: str, rollout: Strategy | None = None) -> None:
    resources = Resources(replicas=1, cpus=CPUS) if rollout is None else None
    op = await c.create_deployment(model, build_name, resources, rollout=rollout)
    await done(c, op, f"deploy {build_name}")
    m = await c.get_model(model)
    if m.state != ModelState.DEPLOYED:
        raise SystemExit(f"{model} is {m.state} after deploying {build_name}: {m.message}")


async def forwarding(url: str, to: str, seconds: float = 60) -> None:
    """Until most answers of the split model come from ``to`` (the share reached the
    replica: Serve reconfigures it a moment after SetTraffic is done)."""
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            got = []
            for _ in range(20):
                r = await http.post(url, json=PAYLOAD)
                got.append(_build_of(r.content) if r.status_code == 200 else "")
            if sum(b == to for b in got) >= 15:
                return
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"the split does not forward: of 20 answers after SetTraffic "
                    f"{{1: {100 - SPLIT}, 2: {SPLIT}}}, {sum(b == to for b in got)} came "
                    f"from {to}: {collections.Counter(got)}"
                )
            await asyncio.sleep(0.2)


@dataclass
class Models:
    plain: str
    split: str
    builds: dict[str, list[str]]  # by model: build 1, 2 (and 3 for the plain one)
    urls: dict[str, str] = field(default_factory=dict)


async def prepare(c: Client, tmp: Path) -> Models:
    zip_path = tmp / "iris-v1.zip"
    zip_directory(EXAMPLE, zip_path)
    source_zip = await asyncio.to_thread(zip_path.read_bytes)
    plain = (await c.create_model(PROJECT, "iris-plain")).name
    split = (await c.create_model(PROJECT, "iris-split")).name
    started = time.perf_counter()
    # One after the other within a model (build numbers in order), both models at once.
    plain_builds, split_builds = await asyncio.gather(
        _builds(c, plain, source_zip, 3), _builds(c, split, source_zip, 2)
    )
    say(f"5 builds in {time.perf_counter() - started:.1f} s")
    m = Models(plain, split, {"plain": plain_builds, "split": split_builds})
    await asyncio.gather(deploy(c, plain, plain_builds[0]), deploy(c, split, split_builds[0]))
    say("both models deployed")
    for name, model in (("plain", plain), ("split", split)):
        m.urls[name] = (await c.get_model(model)).endpoint
        await warm_up(m.urls[name])
    return m


async def _builds(c: Client, model: str, source_zip: bytes, n: int) -> list[str]:
    return [await build(c, model, source_zip) for _ in range(n)]


# ---- the two measurements -----------------------------------------------------------------


async def hop(c: Client, m: Models, rate: float, seconds: float, warm_s: float) -> dict[str, Any]:
    stable, candidate = m.builds["split"][:2]
    started = time.perf_counter()
    op = await c.set_traffic(m.split, {stable: 100 - SPLIT, candidate: SPLIT})
    await done(c, op, "SetTraffic")
    set_s = time.perf_counter() - started
    model = await c.get_model(m.split)
    if model.traffic is None or model.traffic.percent != SPLIT:
        raise SystemExit(f"SetTraffic is done but the model's traffic is {model.traffic}")
    await forwarding(m.urls["split"], candidate)
    say(f"split {100 - SPLIT}/{SPLIT} forwarding (SetTraffic: {set_s:.1f} s); load {seconds:g} s")

    load = Paced({"plain": m.urls["plain"], "split": m.urls["split"]}, rate)
    load.start()
    await asyncio.sleep(warm_s + seconds)
    await load.stop()
    first = min(a.due for a in load.answers)
    start, end = first + warm_s, first + warm_s + seconds
    plain = load.window(start, end, "plain")
    split = load.window(start, end, "split")
    forwarded = [a for a in split if not a.outcome and a.build == candidate]
    answered_plain = [a for a in plain if not a.outcome]
    side_plain = {**counts(plain), **latency(answered_plain)}
    side_split = {**counts(split), **latency(forwarded)}
    side_split["forwarded"] = len(forwarded)
    side_split["answered_by_stable"] = sum(not a.outcome and a.build == stable for a in split)
    return {
        "rate_per_s": rate,
        "seconds": seconds,
        "warm_s": warm_s,
        "split_percent": SPLIT,
        "stable_build": stable,
        "candidate_build": candidate,
        "plain_build": m.builds["plain"][0],
        "set_traffic_s": set_s,
        "connections": load.connections,
        "plain": side_plain,
        "split": side_split,
        "p50_diff_ms": side_split["p50_ms"] - side_plain["p50_ms"],
        "p99_diff_ms": side_split["p99_ms"] - side_plain["p99_ms"],
    }


async def rollouts(
    c: Client, m: Models, rate: float, steps: tuple[int, ...], bake_s: float
) -> dict[str, Any]:
    first, second, third = m.builds["plain"]
    canary = Strategy(StrategyKind.CANARY, steps=steps, bake_s=bake_s, gates=GATES)

    async def immediate() -> None:
        await deploy(c, m.plain, second)

    async def canary_rollout() -> None:
        await deploy(c, m.plain, third, rollout=canary)

    changes: dict[str, tuple[Callable[[], Awaitable[None]], str, str]] = {
        "immediate": (immediate, first, second),
        "canary": (canary_rollout, second, third),
    }
    load = Paced({"plain": m.urls["plain"]}, rate)
    windows: dict[str, tuple[float, float, float]] = {}
    load.start()
    try:
        for name, (change, _, _) in changes.items():
            await asyncio.sleep(SETTLE_S)
            say(f"rollout: {name}")
            start = time.perf_counter()
            await change()
            took = time.perf_counter() - start
            await asyncio.sleep(TAIL_S)
            windows[name] = (start, start + took + TAIL_S, took)
    finally:
        await load.stop()
    out: dict[str, Any] = {}
    for name, (start, end, took) in windows.items():
        inside = load.window(start, end)
        _, before, after = changes[name]
        tail = [a for a in inside if a.due > end - TAIL_S / 2 and not a.outcome]
        out[name] = {
            **counts(inside),
            "seconds": took,
            "from_build": before,
            "to_build": after,
            "last_answers_from_new_build": bool(tail) and all(a.build == after for a in tail),
        }
    out["canary"]["steps"] = list(steps)
    out["canary"]["bake_s"] = bake_s
    out["canary"]["gates"] = {
        "max_error_rate": GATES.max_error_rate,
        "min_requests": GATES.min_requests,
    }
    out["rate_per_s"] = rate
    out["tail_s"] = TAIL_S
    return out


# ---- the run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    rate: float  # requests/s to each model
    seconds: float
    warm_s: float
    steps: tuple[int, ...]
    bake_s: float


async def phases(address: str, tmp: Path, sizes: Sizes) -> dict[str, Any]:
    async with Client(address) as c:
        m = await prepare(c, tmp)
        result: dict[str, Any] = {"models": {"plain": m.plain, "split": m.split}}
        result["builds"] = m.builds
        result["hop"] = await hop(c, m, sizes.rate, sizes.seconds, sizes.warm_s)
        # The split model's two applications would take CPU from the rollouts' load.
        say("load done; stopping the split model")
        await done(c, await c.stop_model(m.split), "stop the split model")
        await asyncio.sleep(2.0)  # its replicas exiting
        result["rollouts"] = await rollouts(c, m, sizes.rate, sizes.steps, sizes.bake_s)
        return result


def run(sizes: Sizes) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()
    # A short temp dir: Ray's socket paths under it must stay under 107 bytes.
    with tempfile.TemporaryDirectory(prefix="bt", dir="/tmp") as name:
        tmp = Path(name)
        cluster: Cluster = start_cluster(tmp / "ray", tmp / "ray.log")
        say(f"Ray cluster at {cluster.address}")
        try:
            proc, address = start_process(
                [
                    MODELCTL,
                    "serve",
                    "--insecure-no-auth",
                    "--console-port=-1",
                    f"--ray-address={cluster.address}",
                    "--grpc-port=0",
                    f"--http-port={free_port()}",
                    f"--data-dir={tmp / 'data'}",
                ]
            )
            try:
                result = asyncio.run(phases(address, tmp, sizes))
            finally:
                proc.terminate()
                proc.wait(60)
        finally:
            say("stopping the cluster")
            stop_cluster(cluster)
    result["leftover_ray_processes"] = len(cluster.leftovers)
    result["load_average_before"] = list(load_before)
    result["seconds"] = time.perf_counter() - started
    return result


# ---- the table ----------------------------------------------------------------------------

TODAY = "(anchor: not split, today's path)"


def summary(result: dict[str, Any]) -> list[Row]:
    h, r = result["hop"], result["rollouts"]
    split, plain = h["split"], h["plain"]
    im, ca = r["immediate"], r["canary"]
    steps = ",".join(str(s) for s in ca["steps"])
    return [
        Row(
            f"{SPLIT}% split, forwarded requests p50 ms {TODAY}",
            split["p50_ms"],
            plain["p50_ms"],
            f"diff <= {TARGET_P50_DIFF_MS:g} ms (+{h['p50_diff_ms']:.2f})",
            h["p50_diff_ms"] <= TARGET_P50_DIFF_MS,
        ),
        Row(
            f"{SPLIT}% split, forwarded requests p99 ms {TODAY}",
            split["p99_ms"],
            plain["p99_ms"],
            f"diff <= {TARGET_P99_DIFF_MS:g} ms (+{h['p99_diff_ms']:.2f})",
            h["p99_diff_ms"] <= TARGET_P99_DIFF_MS,
        ),
        Row(
            f"failed requests at {h['rate_per_s']:g}/s each, split (of {split['sent']}) "
            f"vs not split (of {plain['sent']})",
            split["failed"],
            plain["failed"],
            "0",
            split["failed"] == 0 and plain["failed"] == 0,
        ),
        Row(
            f"failed requests during a rollout: CANARY {steps} (of {ca['sent']}) "
            f"vs IMMEDIATE (of {im['sent']})",
            ca["failed"],
            im["failed"],
            "0",
            ca["failed"] == 0 and im["failed"] == 0,
        ),
        Row(
            f"rollout to done s: CANARY {steps}, bake {ca['bake_s']:g} s vs IMMEDIATE",
            ca["seconds"],
            im["seconds"],
        ),
    ]


def show(result: dict[str, Any]) -> None:
    h, r = result["hop"], result["rollouts"]
    print(f"\n{'':<34}{'not split':>11}{'split':>11}{'diff':>9}  target")
    for key, target in (("p50_ms", TARGET_P50_DIFF_MS), ("p99_ms", TARGET_P99_DIFF_MS)):
        a, b = h["plain"][key], h["split"][key]
        met = "" if b - a <= target else "  MISSED"
        print(f"{key.replace('_', ' '):<34}{a:>11.2f}{b:>11.2f}{b - a:>+9.2f}  <= {target:g}{met}")
    for key in ("sent", "counted", "failed"):
        print(f"{key:<34}{h['plain'][key]:>11}{h['split'][key]:>11}")
    print(
        f"split answers by build: {h['split']['builds']} (counted: the {h['split']['forwarded']}"
        f" forwarded to build {version(h['candidate_build'])}); client send lag p99 "
        f"{h['plain']['send_lag_p99_ms']:.2f} / {h['split']['send_lag_p99_ms']:.2f} ms"
    )
    print(f"\n{'rollout':<34}{'seconds':>9}{'sent':>8}{'failed':>8}  answers by build")
    for name in ("immediate", "canary"):
        x = r[name]
        print(f"{name:<34}{x['seconds']:>9.2f}{x['sent']:>8}{x['failed']:>8}  {x['builds']}")
        if x["failed"]:
            print(f"  {x['non_200']} non-200, {x['errors']} errors: {x['examples']}")
    print(
        f"leftover Ray processes: {result['leftover_ray_processes']}; "
        f"{result['seconds']:.0f} s in all"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0, help="paced load on each model")
    p.add_argument("--rate", type=float, default=RATE, help="requests/s to each model")
    p.add_argument("--smoke", action="store_true", help="5 s of load, a 2-step canary (minutes)")
    args = p.parse_args()
    if args.smoke:
        sizes = Sizes(args.rate, seconds=5.0, warm_s=1.0, steps=(50, 100), bake_s=1.0)
    else:
        sizes = Sizes(args.rate, seconds=args.seconds, warm_s=2.0, steps=(10, 50, 100), bake_s=2.0)
    result = run(sizes)
    result["smoke"] = args.smoke
    result["machine"] = machine()
    show(result)
    save_result("traffic", result)
    r = result["rollouts"]
    if not (
        r["immediate"]["last_answers_from_new_build"] and r["canary"]["last_answers_from_new_build"]
    ):
        raise SystemExit("after a rollout, its new build did not answer every request")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
