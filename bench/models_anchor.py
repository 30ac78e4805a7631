"""The anchor of bench/models.py: raw Ray Serve given N applications in one config.

Run by bench/models.py after its own phase, on the same cluster, as
``models_anchor.py ARGS.json``, from a driver process of its own: first it deletes every
application Serve runs (the control plane's, stopped by then), then for each size N, in
growing order: the same application as the control plane's (import path, args,
artifact of its build; 1 replica, 0.01 CPU each) N times in one declarative config,
what `serve deploy` submits, until every one runs (timed from handing it over: the
applications added to the last size's); then one application's scale 1 -> 2
(the whole config handed again, that application's ``num_replicas`` changed), timed
from handing it over until Serve says it runs 2 replicas, polled every 0.1 s as our
reconciler does; then back to 1. Its figures as one JSON line on stdout.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from httpload import POLL_S
from raycluster import HOST
from serve_anchor import IMPORT_PATH, _value, described, events, serve_controller

DEADLINE_S = 900.0


def app_name(i: int) -> str:
    return f"anchor.m{i:03d}"


def config(args: dict[str, Any], n: int, scaled: int = -1) -> dict[str, Any]:
    """N applications; the one numbered ``scaled`` with 2 replicas, the rest with 1."""
    return {
        "http_options": {"host": HOST, "port": args["http_port"]},
        "applications": [
            {
                "name": app_name(i),
                "route_prefix": f"/anchor/m{i:03d}",
                "import_path": IMPORT_PATH,
                "args": args["app_args"],
                "deployments": [
                    {
                        "name": "model",
                        "num_replicas": 2 if i == scaled else 1,
                        "ray_actor_options": {"num_cpus": 0.01, "num_gpus": 0.0},
                        "user_config": {"open": True, "keys": []},
                    }
                ],
            }
            for i in range(n)
        ],
    }


class Anchor:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.client = serve_controller(args)
        self.seen: list[tuple[float, str]] = []  # while a scale is timed: what Serve said

    def running(self) -> dict[str, int]:
        """Each application's RUNNING replicas, for those Serve says are RUNNING."""
        apps = self.client.get_serve_details().get("applications") or {}
        said = described(apps.get(app_name(0)))
        if self.seen and self.seen[-1][1] != said:  # while a scale is timed: its steps
            self.seen.append((time.perf_counter(), said))
        out = {}
        for name, app in apps.items():
            if _value(app.get("status")) != "RUNNING":
                continue
            replicas = [r for d in (app.get("deployments") or {}).values() for r in d["replicas"]]
            if all(_value(r.get("state")) == "RUNNING" for r in replicas):
                out[name] = len(replicas)
        return out

    def deploy(self, n: int, scaled: int = -1) -> None:
        from ray.serve.schema import ServeDeploySchema

        self.client.deploy_apps(ServeDeploySchema.model_validate(config(self.args, n, scaled)))

    def until(self, want: dict[str, int], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            got = self.running()
            if all(got.get(name) == count for name, count in want.items()):
                return
            time.sleep(POLL_S)
        raise SystemExit(f"raw Serve: {what} not seen in {DEADLINE_S:g} s")

    def scale_s(self, n: int) -> tuple[float, list[dict[str, Any]]]:
        """Seconds to the scaled application RUNNING 2 replicas, and what Serve said of
        it on the way (as bench/timeline.py shows ours)."""
        started = time.perf_counter()
        self.seen = [(started, "config handed to Serve")]
        self.deploy(n, scaled=0)
        self.until({app_name(0): 2}, "the scaled application")
        took = time.perf_counter() - started
        said = events(self.seen, started)
        self.seen = []
        self.deploy(n)
        self.until({app_name(0): 1}, "the application back at 1 replica")
        return took, said


def main(args_file: Path) -> None:
    args = json.loads(args_file.read_text())
    anchor = Anchor(args)
    apps = anchor.client.get_serve_details().get("applications") or {}
    if apps:  # the control plane's, left by its stopped server
        anchor.client.delete_apps(list(apps), blocking=True)
    points = []
    for n in args["sizes"]:
        started = time.perf_counter()
        anchor.deploy(n)
        anchor.until({app_name(i): 1 for i in range(n)}, f"{n} applications running")
        up_s = time.perf_counter() - started  # the applications added to the last size's
        print(f"anchor: {n} applications running in {up_s:.1f} s", file=sys.stderr, flush=True)
        time.sleep(2)  # as ours: the last deploy's looks settle
        trials = [anchor.scale_s(n) for _ in range(args["trials"])]
        times = [t for t, _ in trials]
        points.append(
            {
                "models": n,
                "up_s": up_s,
                "scale_s": statistics.median(times),
                "scale_all_s": times,
                "worst_events": max(trials, key=lambda t: t[0])[1],
            }
        )
    anchor.client.delete_apps([app_name(i) for i in range(args["sizes"][-1])], blocking=True)
    print(json.dumps({"points": points}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
