"""The anchor of bench/serve.py: raw Ray Serve, driven from a driver process of its own.

The same application as the control plane's (import path, args, artifact of our build)
in a literal Serve declarative config, what `serve deploy config.yaml` submits
(ServeDeploySchema to the controller's deploy_apps), with Serve's own rollout defaults.
Run by bench/serve.py as ``serve_anchor.py ARGS.json``: one round, its figures as one
JSON line on stdout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from httpload import POLL_S, changes_under_load
from raycluster import HOST

APP, ROUTE = "anchor.iris", "/anchor/iris"  # ours is bench.iris
IMPORT_PATH = "workers.ray_backend:build_app"


def anchor_config(args: dict[str, Any], replicas: int, generation: int) -> dict[str, Any]:
    """What `serve deploy config.yaml` submits: one application, Serve's rollout defaults."""
    return {
        "http_options": {"host": HOST, "port": args["http_port"]},
        "applications": [
            {
                "name": APP,
                "route_prefix": ROUTE,
                "import_path": IMPORT_PATH,
                # A new generation is a new code version (Serve hashes the args): every
                # replica is replaced, as ours are on a restart.
                "args": {**args["app_args"], "restart_generation": generation},
                "deployments": [
                    {
                        "name": "model",
                        "num_replicas": replicas,
                        "ray_actor_options": {"num_cpus": 0.0, "num_gpus": 0.0},
                        # Endpoint open to all, as ours is under --insecure-no-auth (the
                        # replicas turn requests away until told who may call).
                        "user_config": {"open": True, "keys": []},
                    }
                ],
            }
        ],
    }


def _value(v: Any) -> str:
    return str(getattr(v, "value", v))


def described(app: dict[str, Any] | None) -> str:
    """What Serve says of the application, in the words of our reconciler's debug log."""
    if app is None:
        return "no application"
    counts: dict[str, int] = {}
    target = None
    for d in (app.get("deployments") or {}).values():
        target = d.get("target_num_replicas")
        for r in d["replicas"]:
            state = _value(r.get("state"))
            counts[state] = counts.get(state, 0) + 1
    replicas = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"
    wants = f", wants {target}" if target is not None else ""
    return f"{_value(app.get('status'))}, replicas {replicas}{wants}"


def serve_controller(args: dict[str, Any]) -> Any:
    """This driver on the cluster at ``args["address"]``, and Serve's controller client."""
    from ray.serve._private import api as serve_api

    import ray

    ray.init(address=args["address"], logging_level=logging.WARNING, log_to_driver=False)
    return serve_api.serve_start(http_options={"host": HOST, "port": args["http_port"]})


def events(seen: list[tuple[float, str]], started: float) -> list[dict[str, Any]]:
    """What Serve said and when (``time.perf_counter()``), from ``started``, as
    bench/timeline.py shows ours."""
    return [
        {"ms": round((at - started) * 1000), "side": "anchor", "what": what} for at, what in seen
    ]


class RawServe:
    """Serve's controller, driven as `serve deploy` does: a whole config, then looks."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.client = serve_controller(args)
        self.generation = 0
        self.seen: list[tuple[float, str]] = []  # each new thing Serve said, and when
        self.events: list[dict[str, Any]] = []  # the last timed change's, from its start
        self.cpu_s = 0.0  # the last timed change's: this driver's CPU

    def deploy(self, replicas: int, roll: bool) -> None:
        from ray.serve.schema import ServeDeploySchema

        if roll:  # new args: a new code version, so Serve replaces every replica
            self.generation += 1
        config = anchor_config(self.args, replicas, self.generation)
        self.client.deploy_apps(ServeDeploySchema.model_validate(config))

    def replicas(self) -> dict[str, int] | None:
        """{replica id: pid} while RUNNING with only RUNNING replicas listed, else None."""
        app = (self.client.get_serve_details().get("applications") or {}).get(APP)
        said = described(app)
        if not self.seen or self.seen[-1][1] != said:  # what it says, when it first said it
            self.seen.append((time.perf_counter(), said))
        if app is None or _value(app.get("status")) != "RUNNING":
            return None
        found = [r for d in (app.get("deployments") or {}).values() for r in d["replicas"]]
        if any(_value(r.get("state")) != "RUNNING" for r in found):
            return None
        return {str(r["replica_id"]): int(r.get("pid") or 0) for r in found}

    def wait(self, n: int, old: frozenset[str] = frozenset()) -> dict[str, int]:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            got = self.replicas()
            if got is not None and len(got) == n and not old & got.keys():
                return got
            time.sleep(POLL_S)
        raise SystemExit(f"raw Serve: {n} new RUNNING replicas not seen in 300 s")

    def timed(self, n: int, old: frozenset[str] = frozenset()) -> tuple[float, dict[str, int]]:
        """Seconds from handing Serve the config until ``n`` replicas run; with ``old``
        (the replicas running now), a rolling replacement until none of them is left.
        What Serve said on the way is in ``events`` (as bench/timeline.py shows ours)."""
        started, cpu = time.perf_counter(), time.process_time()
        self.seen = []
        self.deploy(n, roll=bool(old))
        self.seen.append((time.perf_counter(), "config handed to Serve"))
        got = self.wait(n, old)
        self.cpu_s = time.process_time() - cpu
        self.events = events(self.seen, started)
        return time.perf_counter() - started, got

    def delete(self) -> None:
        self.client.delete_apps([APP], blocking=True)


def anchor_trials(raw: RawServe) -> dict[str, Any]:
    deploy_s, first = raw.timed(1)
    timelines, cpu = {"deploy_s": raw.events}, {"deploy_s": raw.cpu_s}
    scale_s, scaled = raw.timed(3)
    timelines["scale_s"], cpu["scale_s"] = raw.events, raw.cpu_s
    if not first.items() <= scaled.items():
        raise SystemExit(f"raw Serve restarted a replica while scaling: {first} -> {scaled}")
    _, two = raw.timed(2)
    restart_s, rolled = raw.timed(2, frozenset(two))
    timelines["restart_s"], cpu["restart_s"] = raw.events, raw.cpu_s
    return {
        "deploy_s": deploy_s,
        "scale_s": scale_s,
        "restart_s": restart_s,
        "scale_kept_replica": True,
        "restart_replaced_all": not two.keys() & rolled.keys(),
        "timelines": timelines,
        "cpu_s": cpu,
    }


async def anchor_failures(raw: RawServe, settle_s: float) -> dict[str, Any]:
    async def scale() -> None:
        await asyncio.to_thread(raw.timed, 3)

    async def rolling() -> None:
        running = await asyncio.to_thread(raw.wait, 3)
        await asyncio.to_thread(raw.timed, 3, frozenset(running))

    url = f"http://{HOST}:{raw.args['http_port']}{ROUTE}"
    return await changes_under_load(url, {"scale": scale, "rolling": rolling}, settle_s)


def anchor_main(args_file: Path) -> None:
    """The hidden --anchor mode: one round on raw Serve; its figures as JSON on stdout."""
    args = json.loads(args_file.read_text())
    raw = RawServe(args)
    try:
        trials = anchor_trials(raw)
        trials["failures"] = asyncio.run(anchor_failures(raw, args["settle_s"]))
    finally:
        raw.delete()
    print(json.dumps(trials), flush=True)


if __name__ == "__main__":
    anchor_main(Path(sys.argv[1]))
