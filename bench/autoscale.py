"""Autoscaling on Ray Serve through the control plane, beside raw Serve with the same config.

Starts one local Ray cluster for the whole run (raycluster.py: `ray start --head --block`,
4 logical CPUs, its own process group) and `modelctl serve --ray-address=...` on it
(SQLite in a temp dir). Builds the iris example (examples/iris-v1, `predict`) once,
untimed, and serves it twice on the one cluster, behind the one Serve proxy:

- **ours**: the model `iris`, deployed through the API with Resources(replicas=1, cpus=0.1,
  autoscaling={min 1, max 3, target_ongoing_requests 1, upscale_delay_s 0,
  downscale_delay_s 2}): the control plane hands Serve its application
  (workers.ray_backend:build_app) with that autoscaling_config;
- **raw**: a plain Serve application `raw.iris` (route /raw/iris), deployed from this
  process (a driver on the cluster, `serve.run`): one deployment whose replicas load the
  same function from the same artifact of our build with the same loader
  (workers.model_app.load_function, as bench/serve_anchor.py runs the same artifact),
  call it in a thread as ours does and answer {"success", "response", "replica_id"}
  with Serve's replica id. Its autoscaling_config is the one Serve holds for ours, read
  from Serve's details after each deploy of ours (initial_replicas only while ours has
  it: the control plane sends it to a new application only); the same ray_actor_options
  (0.1 CPU), max_ongoing_requests and graceful shutdown settings. The run checks, in
  Serve's details, that both deployments hold the same autoscaling_config, CPUs, GPUs
  and max_ongoing_requests.

Two measurements, each side in turn in every repetition (the side that goes first
alternates: raw, ours, then ours, raw, ..., so drift and the other side winding down hit
both), medians over repetitions (--smoke: 1):

- **load step.** The side at 1 RUNNING replica, Serve's target 1, and the other side not
  changing (Serve's details, polled every 0.25 s, with a deadline). Then 6 clients (raw
  HTTP/1.1 keep-alive connections, traffic.py's Endpoint, to 127.0.0.1 only) send the
  iris payload back to back: ~6 requests in flight, 6x the target of 1 per replica.
  Figure: seconds from the step's start until the first answer from a replica id that
  Serve did not list before the step. Also recorded: until answers from 3 distinct
  replicas (max_replicas), and, from Serve's details polled meanwhile, when its target
  first went above 1 and a new replica was first listed RUNNING. The load stops once 3
  replicas answered (or 15 s after the first new one); before its next step, a side
  waits until it is back at 1.
- **cold start from zero.** Both re-deployed with min_replicas 0 (the rest the same).
  The side at 0 replicas (Serve's details; for ours also GetModel's
  scale.desired_replicas and running_replicas == 0), then one request, timed end to end
  (httpx, 120 s timeout): it must answer 200, or the run fails. Serve's details are
  polled meanwhile (target 1, replica RUNNING), for the record.

Serve's autoscaler hears from the proxy's handle every 10 s (autoscaling_config
metrics_interval_s, its default: neither side sets it), which records the requests in
flight every 6 s and averages them over a 30 s look-back: most of both figures is where
in that cycle the step or the request lands (a cold request's first push, at once,
carries the handle's last record, 0; Serve decides on the next one). A side that just
settled did so at one of its pushes, so each measurement starts after a random pause in
[0, 10 s) (seeded), alike for both sides (--smoke: no pause; its figures are not judged).
To see the part that is the replicas' own, the run also reports, per trial, the time
from Serve's decision (its target up, in its details) to the first answer of a new
replica. Scale-to-zero waits for the look-back to empty (~30-40 s). Targets (the
issue's): each median of ours <= 1.10x raw's.

Writes bench/results/autoscale.json (with the machine it ran on and the "smoke" flag).

    .venv/bin/python bench/autoscale.py [--repetitions 5] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpload import PAYLOAD, warm_up
from raycluster import HOST, Cluster, free_port, start_cluster, stop_cluster
from run import machine
from serverproc import MODELCTL, ROOT, Row, save_result, start_process
from signals import Failed
from traffic import Endpoint

from controlplane.api.client import Client
from controlplane.domain.scaling import Autoscaling
from controlplane.domain.states import ModelState
from controlplane.domain.types import Operation, Resources
from workers.archive import zip_directory
from workers.backend import app_name_for

PROJECT, MODEL = "bench", "iris"
EXAMPLE = ROOT / "examples" / "iris-v1"
RAW_APP, RAW_ROUTE = "raw.iris", "/raw/iris"
DEPLOYMENT = "model"  # the one deployment of each application (ours: ray_backend's)
CPUS = 0.1
MAX_REPLICAS = 3
TARGET_ONGOING = 1.0
UPSCALE_DELAY_S = 0.0
DOWNSCALE_DELAY_S = 2.0
CLIENTS = 6  # back-to-back clients of the load step: ~6 requests in flight
ALL_WAIT_S = 15.0  # after the first new replica answers, how long to wait for all 3
STEP_DEADLINE_S = 90.0  # a step without a new replica answering by then fails the run
SETTLE_DEADLINE_S = 180.0  # back to 1 (or down to 0) by then, or the run fails
COLD_TIMEOUT_S = 120.0
POLL_S = 0.25  # Serve's details, while a step runs and while waiting to settle
# Serve's handles report to its autoscaler every metrics_interval_s (10 s, its default,
# on both sides): each measurement starts after a random pause within one such cycle.
CYCLE_S = 10.0
TARGET = 1.10
STARTED = time.perf_counter()


def say(what: str) -> None:
    """A line of progress, with the seconds since this script started."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {what}", flush=True)


def autoscaling(min_replicas: int) -> Autoscaling:
    return Autoscaling(
        min_replicas=min_replicas,
        max_replicas=MAX_REPLICAS,
        target_ongoing_requests=TARGET_ONGOING,
        upscale_delay_s=UPSCALE_DELAY_S,
        downscale_delay_s=DOWNSCALE_DELAY_S,
    )


# The autoscaling_config fields the control plane sets (ray_backend._autoscaling). Raw
# Serve gets them as Serve holds them for ours (initial_replicas too, when ours has it),
# and the run checks in Serve's details that both deployments hold the same.
AUTOSCALING_KEYS = (
    "min_replicas",
    "max_replicas",
    "initial_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
)


# ---- Serve, from this process: raw Serve's application and both sides' replicas --------


def _value(v: Any) -> str:
    return str(getattr(v, "value", v))


class ServeView:
    """A driver on the cluster: deploys the raw application and reads Serve's details."""

    def __init__(self, address: str, http_port: int) -> None:
        from ray.serve._private import api as serve_api

        import ray

        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        self.client = serve_api.serve_start(http_options={"host": HOST, "port": http_port})

    def deployment(self, app: str) -> dict[str, Any] | None:
        apps = self.client.get_serve_details().get("applications") or {}
        found = apps.get(app)
        if found is None:
            return None
        d: dict[str, Any] | None = (found.get("deployments") or {}).get(DEPLOYMENT)
        return d

    def replicas(self, app: str) -> tuple[int, dict[str, str]]:
        """(Serve's target count, {replica id: state}) of the application's deployment."""
        d = self.deployment(app)
        if d is None:
            return -1, {}
        states = {str(r["replica_id"]): _value(r.get("state")) for r in d.get("replicas") or ()}
        return int(d.get("target_num_replicas") or 0), states

    def config(self, app: str) -> dict[str, Any]:
        """The deployment's autoscaling_config and ray_actor_options as Serve holds them."""
        d = self.deployment(app) or {}
        c = d.get("deployment_config") or {}
        options = c.get("ray_actor_options") or {}
        return {
            "autoscaling_config": {
                k: c.get("autoscaling_config", {}).get(k) for k in AUTOSCALING_KEYS
            },
            "num_cpus": options.get("num_cpus"),
            "num_gpus": options.get("num_gpus") or 0.0,
            "max_ongoing_requests": c.get("max_ongoing_requests"),
        }

    def deploy_raw(self, app_args: dict[str, str], autoscaling_config: dict[str, Any]) -> None:
        """The raw application with ``autoscaling_config``; returns once Serve says it is
        RUNNING."""
        from ray import serve
        from workers.ray_backend import MAX_ONGOING

        serve.run(
            raw_application(app_args, autoscaling_config, MAX_ONGOING),
            name=RAW_APP,
            route_prefix=RAW_ROUTE,
        )

    def delete_raw(self) -> None:
        from ray import serve

        serve.delete(RAW_APP)

    def close(self) -> None:
        import ray

        with suppress(Exception):
            ray.shutdown()


def raw_application(
    app_args: dict[str, str], autoscaling_config: dict[str, Any], ongoing: int
) -> Any:
    """A plain Serve deployment of the model function: the one Serve would run without
    the control plane. Defined here so that cloudpickle ships it by value."""
    from starlette.requests import Request
    from starlette.responses import Response

    from ray import serve

    @serve.deployment(
        name=DEPLOYMENT,
        max_ongoing_requests=ongoing,
        autoscaling_config=autoscaling_config,
        ray_actor_options={"num_cpus": CPUS, "num_gpus": 0.0},
        graceful_shutdown_timeout_s=10,  # as ours (ray_backend._app_config)
        graceful_shutdown_wait_loop_s=0.5,
    )
    class RawModel:
        def __init__(self, artifact_path: str, file_path: str, function_name: str) -> None:
            from workers.model_app import load_function

            self._fn = load_function(artifact_path, file_path, function_name)
            self._replica_id = serve.get_replica_context().replica_id.unique_id

        async def __call__(self, request: Request) -> Response:
            body = await request.json()
            response = await asyncio.to_thread(self._fn, body)
            answer = {"success": True, "response": response, "replica_id": self._replica_id}
            return Response(json.dumps(answer).encode(), media_type="application/json")

    return RawModel.bind(  # type: ignore[attr-defined]
        app_args["artifact_path"], app_args["file_path"], app_args["function_name"]
    )


# ---- the two sides ------------------------------------------------------------------------


@dataclass
class Side:
    name: str  # "ours" or "raw"
    app: str  # its Serve application
    url: str


@dataclass
class Ours:
    c: Client
    model: str
    build: str

    async def deploy(self, min_replicas: int) -> None:
        resources = Resources(replicas=1, cpus=CPUS, autoscaling=autoscaling(min_replicas))
        op = await self.c.create_deployment(self.model, self.build, resources)
        await done(self.c, op, f"deploy with min_replicas {min_replicas}")
        m = await self.c.get_model(self.model)
        if m.state != ModelState.DEPLOYED:
            raise SystemExit(f"{self.model} is {m.state} after deploying: {m.message}")

    async def scale(self) -> tuple[int, int, str]:
        """GetModel's scale: (desired, running, the model's state)."""
        m = await self.c.get_model(self.model)
        if m.scale is None:
            return -1, -1, str(m.state)
        return m.scale.desired, m.scale.running, str(m.state)


async def done(c: Client, op: Operation, what: str) -> Operation:
    op = await c.wait(op.name, timeout_s=300)
    if op.error is not None:
        raise SystemExit(f"{what}: {op.name} failed: {op.error.reason}: {op.error.message}")
    return op


def artifact_of(data: Path, image: str) -> str:
    """Where our build's artifact lies: <data dir>/artifacts/<digest of artifact://sha256:...>."""
    path = data / "artifacts" / image.removeprefix("artifact://sha256:")
    if not path.is_dir():
        raise SystemExit(f"the artifact of {image} is not at {path}")
    return str(path)


def _settled(target: int, states: dict[str, str], n: int | None) -> bool:
    """``n`` replicas (None: as many as Serve's target), every one RUNNING."""
    want = target if n is None else n
    return target == want and len(states) == want and all(s == "RUNNING" for s in states.values())


async def settle(view: ServeView, side: Side, other: Side, n: int, ours: Ours) -> float:
    """Until ``side``'s deployment has exactly ``n`` replicas listed, all RUNNING, and
    Serve's target is ``n`` (ours at 0: GetModel's scale also says 0 wanted and 0
    running), and ``other``'s is not changing (its target's count, all RUNNING);
    seconds waited."""
    started = time.perf_counter()
    while True:
        looks = {s.name: await asyncio.to_thread(view.replicas, s.app) for s in (side, other)}
        ok = _settled(*looks[side.name], n) and _settled(*looks[other.name], None)
        if ok and n == 0 and side.name == "ours":
            desired, running, _ = await ours.scale()
            ok = desired == 0 and running == 0
        if ok:
            return time.perf_counter() - started
        if time.perf_counter() - started > SETTLE_DEADLINE_S:
            scale = await ours.scale()
            raise SystemExit(
                f"{side.name} not settled at {n} replicas (or {other.name} still changing) "
                f"in {SETTLE_DEADLINE_S:g} s: {looks}; ours' GetModel scale (desired, "
                f"running, state): {scale}"
            )
        await asyncio.sleep(POLL_S)


def replica_of(body: bytes) -> str:
    with suppress(ValueError, AttributeError, TypeError):
        return str(json.loads(body).get("replica_id") or "")
    return ""


# ---- the load step ------------------------------------------------------------------------


async def load_step(view: ServeView, side: Side) -> dict[str, Any]:
    """From 1 idle replica, ``CLIENTS`` back-to-back clients until a replica not there
    before answers (and then all of ``MAX_REPLICAS``, or ``ALL_WAIT_S``)."""
    _, states = await asyncio.to_thread(view.replicas, side.app)
    before = set(states)
    endpoint = Endpoint(side.url)
    stop = asyncio.Event()
    seen: dict[str, float] = {}  # replica id -> when it first answered (s after the start)
    failed: list[str] = []
    sent = 0
    marks: dict[str, float] = {}  # "first_new", "all", "decided", "running"
    start = time.perf_counter()

    def since() -> float:
        return time.perf_counter() - start

    async def client() -> None:
        nonlocal sent
        while not stop.is_set():
            sent += 1
            try:
                status, body = await endpoint.post()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, Failed) as e:
                failed.append(f"{type(e).__name__}: {e}")
                continue
            if status != 200:
                failed.append(f"HTTP {status}: {body[:200]!r}")
                continue
            t, replica = since(), replica_of(body)
            if replica and replica not in seen:
                seen[replica] = t
                if replica not in before and "first_new" not in marks:
                    marks["first_new"] = t
                if len(seen) >= MAX_REPLICAS and "all" not in marks:
                    marks["all"] = t
            first_new = marks.get("first_new")
            if (
                "all" in marks
                or (first_new is not None and t > first_new + ALL_WAIT_S)
                or t > STEP_DEADLINE_S
            ):
                stop.set()

    async def watch() -> None:
        """Serve's view, for the record: its target above 1, a new replica RUNNING."""
        while not stop.is_set():
            target, now = await asyncio.to_thread(view.replicas, side.app)
            t = since()
            if target > 1 and "decided" not in marks:
                marks["decided"] = t
            new_running = any(s == "RUNNING" and r not in before for r, s in now.items())
            if new_running and "running" not in marks:
                marks["running"] = t
            await asyncio.sleep(POLL_S)

    try:
        await asyncio.gather(watch(), *(client() for _ in range(CLIENTS)))
    finally:
        endpoint.close()
    if "first_new" not in marks:
        raise SystemExit(
            f"{side.name}: no new replica answered in {STEP_DEADLINE_S:g} s of "
            f"{CLIENTS} clients back to back ({sent} sent, {len(failed)} failed: "
            f"{failed[:3]}); replicas answering: {sorted(seen)}"
        )
    return {
        "first_new_replica_s": marks["first_new"],
        "all_replicas_s": marks.get("all"),
        "serve_target_up_s": marks.get("decided"),
        "serve_new_running_s": marks.get("running"),
        "replicas_before": sorted(before),
        "replicas_answered": len(seen),
        "new_replicas_answered": len(set(seen) - before),
        "sent": sent,
        "failed": len(failed),
        "failed_examples": sorted(set(failed))[:3],
        "seconds": since(),
    }


# ---- the cold start -----------------------------------------------------------------------


async def cold_start(view: ServeView, side: Side) -> dict[str, Any]:
    """One request to a side at 0 replicas, end to end; it must answer 200. Serve's
    details are polled meanwhile, for the record: when its target went to 1 and when the
    replica was listed RUNNING."""
    target, states = await asyncio.to_thread(view.replicas, side.app)
    if states or target != 0:
        raise SystemExit(f"{side.name}: not at zero before its cold start: {target} {states}")
    marks: dict[str, float] = {}
    answered = asyncio.Event()
    started = time.perf_counter()

    async def watch() -> None:
        while not answered.is_set():
            target, now = await asyncio.to_thread(view.replicas, side.app)
            t = time.perf_counter() - started
            if target > 0 and "decided" not in marks:
                marks["decided"] = t
            if "RUNNING" in now.values() and "running" not in marks:
                marks["running"] = t
            await asyncio.sleep(POLL_S)

    async def request() -> httpx.Response:
        try:
            async with httpx.AsyncClient(timeout=COLD_TIMEOUT_S) as http:
                return await http.post(side.url, json=PAYLOAD)
        except httpx.HTTPError as e:
            raise SystemExit(f"{side.name}: the cold-start request failed: {e!r}") from e
        finally:
            marks["answered"] = time.perf_counter() - started
            answered.set()

    r, _ = await asyncio.gather(request(), watch())
    if r.status_code != 200:
        raise SystemExit(f"{side.name}: the cold start answered {r.status_code}: {r.text[:300]}")
    return {
        "seconds": marks["answered"],
        "status": r.status_code,
        "replica": replica_of(r.content),
        "serve_target_up_s": marks.get("decided"),
        "serve_running_s": marks.get("running"),
    }


# ---- the run ------------------------------------------------------------------------------


def order(rep: int) -> tuple[str, str]:
    return ("raw", "ours") if rep % 2 == 0 else ("ours", "raw")


async def prepare(c: Client, tmp: Path) -> tuple[Ours, dict[str, str]]:
    zip_path = tmp / "iris-v1.zip"
    zip_directory(EXAMPLE, zip_path)
    model = (await c.create_model(f"projects/{PROJECT}", MODEL)).name
    source = await c.upload_source(model, zip_path.read_bytes())
    op = await c.create_build(model, source.sha256, "model.py", "predict")
    build = await c.get_build((await done(c, op, "the build")).target)
    app_args = {
        "artifact_path": artifact_of(tmp / "data", build.image),
        "file_path": build.file_path,
        "function_name": build.function_name,
    }
    return Ours(c, model, build.name), app_args


def same_config(view: ServeView, sides: Sequence[Side], min_replicas: int) -> dict[str, Any]:
    configs = {s.name: view.config(s.app) for s in sides}
    ours, raw = configs["ours"], configs["raw"]
    if ours != raw:
        raise SystemExit(f"the two deployments' configs differ: ours {ours}, raw {raw}")
    if ours["autoscaling_config"]["min_replicas"] != min_replicas:
        raise SystemExit(f"Serve holds min_replicas {ours['autoscaling_config']}")
    return ours


async def mirror(
    view: ServeView, app_args: dict[str, str], sides: Sequence[Side], min_: int
) -> dict[str, Any]:
    """Raw Serve deployed with the autoscaling config Serve holds for ours (deployed
    just before), then both checked equal and warmed up."""
    (ours,) = [s for s in sides if s.name == "ours"]
    held = await asyncio.to_thread(view.config, ours.app)
    given = {k: v for k, v in held["autoscaling_config"].items() if v is not None}
    await asyncio.to_thread(view.deploy_raw, app_args, given)
    for s in sides:
        await warm_up(s.url)
    config = await asyncio.to_thread(same_config, view, sides, min_)
    say(f"both deployed with min_replicas {min_}: {config}")
    return config


async def phases(
    address: str, cluster_address: str, http_port: int, tmp: Path, reps: int, cycle_s: float
) -> dict[str, Any]:
    async with Client(address) as c:
        started = time.perf_counter()
        ours, app_args = await prepare(c, tmp)
        say(f"built {ours.build} in {time.perf_counter() - started:.1f} s")
        await ours.deploy(1)  # a new application: Serve gets initial_replicas 1 too
        endpoint = (await c.get_model(ours.model)).endpoint
        view = await asyncio.to_thread(ServeView, cluster_address, http_port)
        try:
            raw_url = f"http://{HOST}:{http_port}{RAW_ROUTE}"
            sides = [
                Side("ours", app_name_for(PROJECT, MODEL), endpoint),
                Side("raw", RAW_APP, raw_url),
            ]
            by_name = {s.name: s for s in sides}

            def pair(name: str) -> tuple[Side, Side]:
                return by_name[name], by_name["raw" if name == "ours" else "ours"]

            rng = random.Random(reps)  # the pauses: the same sequence in every run of a size

            async def pause() -> float:
                """Where the measurement lands in Serve's metrics cycle, left to chance
                alike for both sides (a side that settled just now settled at a push)."""
                seconds = rng.uniform(0, cycle_s)
                await asyncio.sleep(seconds)
                return seconds

            configs = {"load_step": await mirror(view, app_args, sides, 1)}
            steps: dict[str, list[dict[str, Any]]] = {"ours": [], "raw": []}
            for rep in range(reps):
                for name in order(rep):
                    waited = await settle(view, *pair(name), 1, ours)
                    paused = await pause()
                    say(
                        f"step {rep + 1}/{reps}: {name} (at 1 after {waited:.1f} s, "
                        f"then {paused:.1f} s)"
                    )
                    got = await load_step(view, by_name[name])
                    got["settle_wait_s"] = waited
                    got["pause_s"] = paused
                    steps[name].append(got)
                    say(
                        f"  a new replica answered after {got['first_new_replica_s']:.2f} s; "
                        f"{got['replicas_answered']} replicas after "
                        f"{_s(got['all_replicas_s'])} s; {got['sent']} sent, "
                        f"{got['failed']} failed"
                    )
            # Raw Serve's application was made through Serve's Python API, which the
            # control plane's applies refuse to delete: gone first, deployed again after.
            await asyncio.to_thread(view.delete_raw)
            await ours.deploy(0)  # in place: the same replica, the new bounds
            configs["cold_start"] = await mirror(view, app_args, sides, 0)
            colds: dict[str, list[dict[str, Any]]] = {"ours": [], "raw": []}
            for rep in range(reps):
                for name in order(rep):
                    waited = await settle(view, *pair(name), 0, ours)
                    # ours: GetModel says 0 replicas; the model's state then
                    state = (await ours.scale())[2] if name == "ours" else None
                    paused = await pause()
                    say(
                        f"cold {rep + 1}/{reps}: {name} (at 0 after {waited:.1f} s, "
                        f"then {paused:.1f} s)"
                    )
                    got = await cold_start(view, by_name[name])
                    got["zero_wait_s"] = waited
                    got["pause_s"] = paused
                    if state is not None:
                        got["model_state_at_zero"] = state
                    colds[name].append(got)
                    say(f"  answered {got['status']} after {got['seconds']:.2f} s")
        finally:
            await asyncio.to_thread(view.close)
        return {
            "model": ours.model,
            "build": ours.build,
            "configs": configs,
            "load_step": steps,
            "cold_start": colds,
        }


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def median(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return float(statistics.median(got)) if got else None


def _after(trial: dict[str, Any], key: str) -> float | None:
    """From Serve's decision (its target up, in its details) until ``key``: the replica's
    start and the first answer it gives, without Serve's metrics cycle."""
    decided = trial["serve_target_up_s"]
    return None if decided is None else float(trial[key]) - float(decided)


def figures(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per figure: each side's median, the ratio of medians, whether it meets the target."""
    # figure: (measurement, has the target, its value in one trial)
    pick: dict[str, tuple[str, bool, Callable[[dict[str, Any]], float | None]]] = {
        "load_step_s": ("load_step", True, lambda t: t["first_new_replica_s"]),
        "all_replicas_s": ("load_step", False, lambda t: t["all_replicas_s"]),
        "serve_target_up_s": ("load_step", False, lambda t: t["serve_target_up_s"]),
        "serve_new_running_s": ("load_step", False, lambda t: t["serve_new_running_s"]),
        "step_start_s": ("load_step", False, lambda t: _after(t, "first_new_replica_s")),
        "cold_start_s": ("cold_start", True, lambda t: t["seconds"]),
        "cold_target_up_s": ("cold_start", False, lambda t: t["serve_target_up_s"]),
        "cold_replica_s": ("cold_start", False, lambda t: _after(t, "seconds")),
    }
    out: dict[str, dict[str, Any]] = {}
    for key, (phase, targeted, get) in pick.items():
        ours = median([get(t) for t in result[phase]["ours"]])
        raw = median([get(t) for t in result[phase]["raw"]])
        ratio = ours / raw if ours is not None and raw else None
        out[key] = {
            "ours": ours,
            "raw": raw,
            "ratio": ratio,
            "target": TARGET if targeted else None,
            "met": (ratio is not None and ratio <= TARGET) if targeted else None,
            "ours_each": [get(t) for t in result[phase]["ours"]],
            "raw_each": [get(t) for t in result[phase]["raw"]],
        }
    return out


def run(reps: int, cycle_s: float = CYCLE_S) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()
    # A short temp dir: Ray's socket paths under it must stay under 107 bytes.
    with tempfile.TemporaryDirectory(prefix="ba", dir="/tmp") as name:
        tmp = Path(name)
        cluster: Cluster = start_cluster(tmp / "ray", tmp / "ray.log")
        say(f"Ray cluster at {cluster.address}")
        try:
            http_port = free_port()
            proc, address = start_process(
                [
                    MODELCTL,
                    "serve",
                    "--insecure-no-auth",
                    "--console-port=-1",
                    f"--ray-address={cluster.address}",
                    "--grpc-port=0",
                    f"--http-port={http_port}",
                    f"--data-dir={tmp / 'data'}",
                ]
            )
            try:
                result = asyncio.run(
                    phases(address, cluster.address, http_port, tmp, reps, cycle_s)
                )
            finally:
                proc.terminate()
                proc.wait(60)
        finally:
            say("stopping the cluster")
            stop_cluster(cluster)
    result["repetitions"] = reps
    result["clients"] = CLIENTS
    result["cpus"] = CPUS
    result["figures"] = figures(result)
    result["leftover_ray_processes"] = len(cluster.leftovers)
    result["load_average_before"] = list(load_before)
    result["load_average_after"] = list(os.getloadavg())
    result["seconds"] = time.perf_counter() - started
    return result


# ---- the table ----------------------------------------------------------------------------

TITLES = {
    "load_step_s": "load step (1 -> up to 3) -> first answer from a new replica s",
    "cold_start_s": "cold start from zero: one request end to end s",
    "all_replicas_s": "load step -> answers from all 3 replicas s",
    "serve_target_up_s": "load step -> Serve's target above 1 s (its details)",
    "serve_new_running_s": "load step -> a new replica RUNNING s (its details)",
    "step_start_s": "load step: Serve's target up -> a new replica answers s",
    "cold_target_up_s": "cold request -> Serve's target 1 s (its details)",
    "cold_replica_s": "cold request: Serve's target 1 -> the answer s",
}


def summary(result: dict[str, Any]) -> list[Row]:
    """The rows of `make bench`'s table; the anchor is raw Serve with the same config."""
    n = result["repetitions"]
    rows = []
    for key in ("load_step_s", "cold_start_s", "step_start_s", "cold_replica_s"):
        f = result["figures"][key]
        if f["ours"] is None:
            continue
        rows.append(
            Row(
                f"{TITLES[key]} (median of {n})",
                f["ours"],
                f["raw"],
                f"ratio <= {TARGET:.2f}" if f["target"] else "",
                f["met"],
            )
        )
    failed = {s: sum(t["failed"] for t in result["load_step"][s]) for s in ("ours", "raw")}
    sent = {s: sum(t["sent"] for t in result["load_step"][s]) for s in ("ours", "raw")}
    rows.append(
        Row(
            f"failed requests during the load steps (of {sent['ours']} / {sent['raw']})",
            failed["ours"],
            failed["raw"],
        )
    )
    return rows


def show(result: dict[str, Any]) -> None:
    print(
        f"\n{'figure (medians; raw: raw Serve, same config)':<64}{'ours':>8}{'raw':>8}"
        f"{'ratio':>8}  target"
    )
    for key, title in TITLES.items():
        f = result["figures"][key]
        ratio = "" if f["ratio"] is None else f"{f['ratio']:.2f}"
        verdict = "" if f["target"] is None else ("  PASS" if f["met"] else "  MISS")
        target = f"<= {f['target']:.2f}{verdict}" if f["target"] else ""
        print(f"{title:<64}{_s(f['ours']):>8}{_s(f['raw']):>8}{ratio:>8}  {target}")
    for key in ("load_step_s", "cold_start_s"):
        f = result["figures"][key]
        each = ", ".join(
            f"{_s(o)}/{_s(r)}" for o, r in zip(f["ours_each"], f["raw_each"], strict=True)
        )
        print(f"{key} each repetition (ours/raw): {each}")
    for side in ("ours", "raw"):
        steps = result["load_step"][side]
        examples = [t["failed_examples"] for t in steps if t["failed"]]
        print(
            f"{side}: load steps sent {sum(t['sent'] for t in steps)}, failed "
            f"{sum(t['failed'] for t in steps)} {examples}"
        )
    states = {c["model_state_at_zero"] for c in result["cold_start"]["ours"]}
    print(
        f"our model's state at zero replicas: {sorted(states)}; leftover Ray processes: "
        f"{result['leftover_ray_processes']}; {result['seconds']:.0f} s in all"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repetitions", type=int, default=5, help="of each measurement, each side")
    p.add_argument("--smoke", action="store_true", help="one repetition (minutes)")
    args = p.parse_args()
    result = run(1, 0.0) if args.smoke else run(args.repetitions)
    result["smoke"] = args.smoke
    result["machine"] = machine()
    show(result)
    save_result("autoscale", result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
