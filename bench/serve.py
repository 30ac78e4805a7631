"""Deploy, scale and restart on Ray Serve through the control plane, beside raw Serve, in one run.

Starts one local Ray cluster for the whole run (`ray start --head --block`, 4 logical
CPUs and 2 logical GPUs, as its own process group, torn down at the end without
`ray stop`), and `modelctl serve --ray-address=...` on it (SQLite in a temp dir). It
builds the iris example (v1, and v2 for the "new build" change) once, untimed. Then,
for each round, in phases on the one cluster (each side hands Serve a whole config,
which would delete the other's applications; the order alternates between rounds):

- ours, a client over gRPC on 127.0.0.1, each time until the operation is done and
  the model DEPLOYED: CreateDeployment with 1 replica; the same build with 3 (the first
  replica's id and pid must still be there: none restarted); RestartModel with 2
  (every replica id must be new);
- the anchor, raw Ray Serve from a driver process of its own (bench/serve_anchor.py):
  the same application (import path, args, artifact of our build) in a literal
  Serve declarative config, what `serve deploy config.yaml` submits (ServeDeploySchema
  to the controller's deploy_apps) with Serve's own rollout defaults, polling
  get_serve_details every 0.1 s until RUNNING with the expected RUNNING replicas: deploy
  1 replica, scale 1 -> 3 (the first replica must survive), a rolling replacement of 2
  (a new generation in the application's args changes the code version, as ours does on
  a restart) until every replica is new.
  Serve's defaults there: no surge (an old replica stops before its replacement
  starts, 20% at a time), graceful shutdown 20 s polled every 2 s; ours rolls with
  max_surge_percent=100 and a 0.5 s shutdown poll (src/workers/ray_backend.py).

Both sides see the end the same way, every 0.1 s: the anchor polls Serve; our
reconciler looks every 0.1 s while a model changes (0.5 s when all are settled, which
only delays its first look at a change) and the client follows WaitOperation.

Then, with 2 replicas and a steady bounded load on 127.0.0.1 (4 HTTP callers, each
POSTing the iris payload then pausing), it counts failed requests (non-200 answers and
connection errors) from just before each change until DEPLOYED again plus 1 s: ours
during scale 2 -> 3, a re-deploy with new resources, a new build, a rollback and a
restart; the anchor during its scale and its rolling replacement. Figures are medians
over rounds. Targets: deploy and scale <= 1.10x the anchor, restart <= 1.0x, 0 failed
requests during every change of ours. Writes bench/results/serve.json.

    .venv/bin/python bench/serve.py [--rounds 4] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from httpload import CALLERS, PAUSE_S, TAIL_S, changes_under_load
from procstat import cpu_s, family
from raycluster import Cluster, free_port, start_cluster, stop_cluster
from serverproc import ROOT, Row, save_result, start_on_ray
from timeline import Line, Window, server_lines, timeline
from timeline import show as show_timeline

from controlplane.api.client import Client
from controlplane.config import Settings
from controlplane.domain.states import ModelState
from controlplane.domain.types import Build, Operation, Resources
from workers.archive import zip_directory

PHASE_GAP_S = 5.0  # between one side's phase and the other's (--smoke: SMOKE_GAP_S)
SMOKE_GAP_S = 1.0
TIMED = ("deploy_s", "scale_s", "restart_s")
# Medians, then each side's worst round against the other's worst.
TARGETS = {"deploy_s": 1.05, "scale_s": 1.05, "restart_s": 1.0}
TARGETS_WORST = {"deploy_s": 1.25, "scale_s": 1.25}
OUR_CHANGES = ("scale", "resources", "new_build", "rollback", "restart")
ANCHOR_CHANGES = ("scale", "rolling")


# ---- the anchor: raw Ray Serve, from a driver process of its own (serve_anchor.py) ----


def run_driver(
    script: str, args: dict[str, Any], tmp: Path, timeout_s: float, shown: bool = False
) -> dict[str, Any]:
    """Runs an anchor's driver (``bench/<script>``, a process of its own, given ``args``
    as a JSON file) and returns the JSON object its last stdout line holds. Its stderr is
    shown as it comes (``shown``) or kept in a log whose tail a failure shows."""
    args_file, log_file = tmp / f"{script}.json", tmp / f"{script}.log"
    args_file.write_text(json.dumps(args))
    with log_file.open("ab") as log:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).with_name(script)), str(args_file)],
            stdout=subprocess.PIPE,
            stderr=None if shown else log,
            timeout=timeout_s,
            check=False,
        )
    if done.returncode != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise SystemExit(f"the raw Serve driver {script} failed ({done.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def run_anchor(args: dict[str, Any], tmp: Path) -> dict[str, Any]:
    return run_driver("serve_anchor.py", args, tmp, 900)


# ---- ours: the control plane, a client over gRPC -----------------------------------------


@dataclass
class Ours:
    c: Client
    model: str
    v1: str  # build names
    v2: str
    pids: list[int] = field(default_factory=list)  # the server's and its Ray driver's

    async def change(
        self, start: Awaitable[Operation], want: ModelState, figure: str = ""
    ) -> Window:
        """Starts a change, follows its operation to its end and checks the model's state;
        the client's marks on the way (the server's log fills in the rest) and the
        control plane's CPU meanwhile."""
        cpu = cpu_s(self.pids)
        w = Window(figure, self.model)
        op = await start
        w.mark(f"{op.kind} returned its operation")
        op = await self.c.wait(op.name, timeout_s=300)
        w.mark("WaitOperation returned: done")
        if op.error is not None:
            raise SystemExit(f"{op.kind} failed: {op.error.message}")
        m = await self.c.get_model(self.model)
        w.mark(f"GetModel returned: {m.state}")
        if m.state != want:
            raise SystemExit(f"{op.name} done, but the model is {m.state}: {m.message}")
        w.cpu_s = cpu_s(self.pids) - cpu
        return w

    async def deploy(
        self, build: str, resources: Resources | None = None, figure: str = ""
    ) -> Window:
        return await self.change(
            self.c.create_deployment(self.model, build, resources), DEPLOYED, figure
        )

    async def restart(self, figure: str = "") -> Window:
        return await self.change(self.c.restart_model(self.model), DEPLOYED, figure)

    async def stop(self) -> None:
        await self.change(self.c.stop_model(self.model), ModelState.STOPPED)

    async def replicas(self) -> dict[str, int]:
        m = await self.c.get_model(self.model)
        d = await self.c.get_deployment(m.active_deployment)
        return {r.id: r.pid for r in d.replicas}

    async def endpoint(self) -> str:
        return (await self.c.get_model(self.model)).endpoint


DEPLOYED = ModelState.DEPLOYED


def replicas(n: int, cpus: float = 0.0) -> Resources:
    return Resources(replicas=n, cpus=cpus)


async def our_trials(o: Ours) -> dict[str, Any]:
    deploy = await o.deploy(o.v1, replicas(1), "deploy_s")
    first = await o.replicas()
    scale = await o.deploy(o.v1, replicas(3), "scale_s")
    scaled = await o.replicas()
    if len(first) != 1 or not first.items() <= scaled.items():
        raise SystemExit(
            f"the control plane restarted a replica while scaling: {first} -> {scaled}"
        )
    await o.deploy(o.v1, replicas(2))
    two = await o.replicas()
    restart = await o.restart("restart_s")
    rolled = await o.replicas()
    if len(rolled) != 2 or two.keys() & rolled.keys():
        raise SystemExit(f"the restart kept a replica: {two} -> {rolled}")
    return {
        "deploy_s": deploy.seconds,
        "scale_s": scale.seconds,
        "restart_s": restart.seconds,
        "scale_kept_replica": True,
        "restart_replaced_all": True,
        "cpu_s": {w.figure: w.cpu_s for w in (deploy, scale, restart)},
        "windows": [deploy, scale, restart],
    }


async def our_failures(o: Ours, settle_s: float) -> dict[str, Any]:
    async def scale() -> None:
        await o.deploy(o.v1, replicas(3))

    async def resources() -> None:
        await o.deploy(o.v1, replicas(3, cpus=0.1))

    async def new_build() -> None:
        await o.deploy(o.v2)

    async def rollback() -> None:
        await o.deploy(o.v1)

    async def restart() -> None:
        await o.restart()

    changes = {
        "scale": scale,
        "resources": resources,
        "new_build": new_build,
        "rollback": rollback,
        "restart": restart,
    }
    return await changes_under_load(await o.endpoint(), changes, settle_s)


async def our_round(o: Ours, settle_s: float) -> dict[str, Any]:
    try:
        trials = await our_trials(o)
        trials["failures"] = await our_failures(o, settle_s)
    finally:
        await o.stop()  # the anchor's config would delete our application
    return trials


async def build(c: Client, model: str, example: Path, function: str, tmp: Path) -> Build:
    zip_path = tmp / f"{example.name}.zip"
    zip_directory(example, zip_path)
    source = await c.upload_source(model, zip_path.read_bytes())
    op = await c.wait((await c.create_build(model, source.sha256, "model.py", function)).name)
    if op.error is not None:
        raise SystemExit(f"build of {example.name} failed: {op.error.message}")
    return await c.get_build(op.target)


async def prepare(c: Client, tmp: Path) -> Ours:
    model = (await c.create_model("projects/bench", "iris")).name
    v1 = await build(c, model, ROOT / "examples" / "iris-v1", "predict", tmp)
    v2 = await build(c, model, ROOT / "examples" / "iris-v2", "classify", tmp)
    return Ours(c, model, v1.name, v2.name)


def artifact_of(data: Path, image: str) -> str:
    """Where our build's artifact lies: <data dir>/artifacts/<digest of artifact://sha256:...>."""
    path = data / "artifacts" / image.removeprefix("artifact://sha256:")
    if not path.is_dir():
        raise SystemExit(f"the artifact of {image} is not at {path}")
    return str(path)


# ---- the run ------------------------------------------------------------------------------


@dataclass
class Run:
    rounds: int
    settle_s: float
    gap_s: float = PHASE_GAP_S
    sides: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"ours": [], "anchor": []}
    )
    windows: list[list[Window]] = field(default_factory=list)  # ours, round by round


async def phases(
    run: Run, address: str, server_pid: int, anchor_args: dict[str, Any], tmp: Path
) -> None:
    async with Client(address) as c:
        o = await prepare(c, tmp)
        o.pids = family(server_pid)  # its Ray driver runs by now (it built)
        v1 = await c.get_build(o.v1)
        anchor_args["app_args"] = {
            "artifact_path": artifact_of(tmp / "data", v1.image),
            "file_path": v1.file_path,
            "function_name": v1.function_name,
            "build": v1.name,
        }
        for r in range(run.rounds):
            order = ("anchor", "ours") if r % 2 == 0 else ("ours", "anchor")
            for side in order:
                # The other side's last replicas may still be exiting: let them go first.
                await asyncio.sleep(run.gap_s)
                print(f"round {r + 1}/{run.rounds}: {side}", flush=True)
                if side == "ours":
                    got = await our_round(o, run.settle_s)
                    run.windows.append(got.pop("windows"))
                else:
                    got = await asyncio.to_thread(run_anchor, anchor_args, tmp)
                run.sides[side].append(got)


def on_cluster(run: Run, cluster: Cluster, tmp: Path) -> None:
    http_port = free_port()
    # Its debug log in JSON: each change's timeline (bench/timeline.py).
    debug = ["--log-format=json", "--log-level=debug"]
    proc, address = start_on_ray(cluster.address, tmp / "data", http_port, debug, tmp / "log")
    anchor_args = {"address": cluster.address, "http_port": http_port, "settle_s": run.settle_s}
    try:
        asyncio.run(phases(run, address, proc.pid, anchor_args, tmp))
    finally:
        proc.terminate()
        proc.wait(60)


def median_of(trials: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(trial[key] for trial in trials))


def failures_of(trials: list[dict[str, Any]], changes: tuple[str, ...]) -> dict[str, Any]:
    """Each change's counts summed over rounds, with every round's examples of errors."""
    out: dict[str, Any] = {}
    for name in changes:
        per = [trial["failures"][name] for trial in trials]
        out[name] = {k: sum(p[k] for p in per) for k in ("sent", "failed", "non_200", "errors")}
        out[name]["change_s"] = statistics.median(p["change_s"] for p in per)
        out[name]["examples"] = sorted({e for p in per for e in p["examples"]})[:5]
        out[name]["versions"] = sorted({v for p in per for v in p["versions"]})
    return out


def result_of(run: Run, cluster: Cluster, seconds: float) -> dict[str, Any]:
    ours, anchor = run.sides["ours"], run.sides["anchor"]
    medians = {side: {k: median_of(trials, k) for k in TIMED} for side, trials in run.sides.items()}
    worst = {
        side: {k: max(t[k] for t in trials) for k in TIMED} for side, trials in run.sides.items()
    }
    return {
        "rounds": run.rounds,
        "trials": run.sides,
        "medians": medians,
        "ratios": {k: medians["ours"][k] / medians["anchor"][k] for k in TIMED},
        "worst": worst,
        "worst_ratios": {k: worst["ours"][k] / worst["anchor"][k] for k in TIMED},
        # CPU of the control plane (server and driver) / of the anchor's driver, per change
        "cpu_s": {
            side: {k: statistics.median(t["cpu_s"][k] for t in trials) for k in TIMED}
            for side, trials in run.sides.items()
        },
        "scale_kept_replica": all(x["scale_kept_replica"] for x in ours + anchor),
        "restart_replaced_all": all(x["restart_replaced_all"] for x in ours + anchor),
        "failures": {
            "ours": failures_of(ours, OUR_CHANGES),
            "anchor": failures_of(anchor, ANCHOR_CHANGES),
        },
        "load": {"callers": CALLERS, "pause_s": PAUSE_S, "tail_s": TAIL_S},
        "reconcile_interval_s": Settings.reconcile_interval_s,
        "reconcile_busy_interval_s": Settings.reconcile_busy_interval_s,
        "leftover_ray_processes": len(cluster.leftovers),
        "seconds": seconds,
    }


def timelines_of(run: Run, lines: list[Line]) -> dict[str, Any]:
    """Each timed change: the timelines of its worst round and of its median one, ours
    (the client's marks and the server's log) and the anchor's (what Serve said when)."""
    out: dict[str, Any] = {}
    for figure in TIMED:
        windows = sorted(
            (w for ws in run.windows for w in ws if w.figure == figure), key=lambda w: w.seconds
        )
        anchor = sorted(run.sides["anchor"], key=lambda t: float(t[figure]))
        out[figure] = {}
        for which, at in (("median", (len(windows) - 1) // 2), ("worst", -1)):
            out[figure][which] = {
                "seconds": windows[at].seconds,
                "events": timeline(windows[at], lines),
                "anchor_seconds": anchor[at][figure],
                "anchor_events": anchor[at]["timelines"][figure],
            }
    return out


def run(rounds: int, settle_s: float, gap_s: float = PHASE_GAP_S) -> dict[str, Any]:
    started = time.perf_counter()
    this = Run(rounds, settle_s, gap_s)
    # A short temp dir: Ray's socket paths under it must stay under 107 bytes.
    with tempfile.TemporaryDirectory(prefix="bs", dir="/tmp") as name:
        tmp = Path(name)
        cluster = start_cluster(tmp / "ray", tmp / "ray.log")
        try:
            on_cluster(this, cluster, tmp)
        finally:
            stop_cluster(cluster)
        result = result_of(this, cluster, time.perf_counter() - started)
        result["timelines"] = timelines_of(this, server_lines(tmp / "log"))
        return result


# ---- the table ----------------------------------------------------------------------------

FIGURES = {
    "deploy_s": "deploy 1 replica to DEPLOYED s",
    "scale_s": "scale 1 -> 3 replicas in place s",
    "restart_s": "restart 2 replicas s",
}
ANCHOR_OF = {"scale": "scale", "resources": "rolling", "new_build": "rolling"}
ANCHOR_OF |= {"rollback": "rolling", "restart": "rolling"}


def compared(result: dict[str, Any], key: str, figure: str, worst: bool) -> Row:
    """One timed change: the medians of both sides, or each side's worst round."""
    figures, ratios = ("worst", "worst_ratios") if worst else ("medians", "ratios")
    target = (TARGETS_WORST if worst else TARGETS)[key]
    return Row(
        f"{figure}, worst round (anchor: its worst)" if worst else f"{figure}, median",
        result[figures]["ours"][key],
        result[figures]["anchor"][key],
        f"ratio <= {target:.2f}",
        result[ratios][key] <= target,
    )


def summary(result: dict[str, Any]) -> list[Row]:
    rows = []
    for key, figure in FIGURES.items():
        rows.append(compared(result, key, figure, worst=False))
        if key in TARGETS_WORST and "worst" in result:
            rows.append(compared(result, key, figure, worst=True))
    ours, anchor = result["failures"]["ours"], result["failures"]["anchor"]
    for change in OUR_CHANGES:
        rows.append(
            Row(
                f"failed requests during {change.replace('_', ' ')} (of {ours[change]['sent']})",
                ours[change]["failed"],
                anchor[ANCHOR_OF[change]]["failed"],
                "0",
                ours[change]["failed"] == 0,
            )
        )
    return rows


def show(result: dict[str, Any]) -> None:
    print(f"\n{'figure':<44}{'ours':>9}{'anchor':>9}{'ratio':>8}  target")
    for r in summary(result):
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        met = "" if r.met else "  MISSED"
        print(f"{r.figure:<44}{r.ours:>9.3g}{r.anchor or 0:>9.3g}{ratio:>8}  {r.target}{met}")
    print("\nanchor of each failure row: raw Serve scaling 2 -> 3, or its rolling replacement")
    for side, changes in result["failures"].items():
        for name, f in changes.items():
            if f["failed"]:
                print(
                    f"{side} {name}: {f['non_200']} non-200, {f['errors']} errors: {f['examples']}"
                )
    for key, picks in result.get("timelines", {}).items():
        for which, t in picks.items():
            title = f"{FIGURES[key]}, {which} round"
            show_timeline(f"ours, {title}: {t['seconds']:.2f} s", t["events"])
            show_timeline(f"anchor, {title}: {t['anchor_seconds']:.2f} s", t["anchor_events"])
    cpu = result["cpu_s"]
    print(
        "\nCPU s during each change, median (ours: server and its Ray driver; anchor: its driver)"
    )
    for key in TIMED:
        print(f"  {FIGURES[key]:<40} ours {cpu['ours'][key]:.2f}  anchor {cpu['anchor'][key]:.2f}")
    print(
        f"scale kept its replica: {result['scale_kept_replica']}; leftover Ray processes: "
        f"{result['leftover_ray_processes']}; {result['seconds']:.0f} s in all"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4, help="even: each side goes first as often")
    p.add_argument("--smoke", action="store_true", help="one round, a short load (minutes)")
    args = p.parse_args()
    result = run(1, 0.2, SMOKE_GAP_S) if args.smoke else run(args.rounds, 2.0)
    result["smoke"] = args.smoke
    show(result)
    save_result("serve", result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
