"""The whole active-model workflow on a local Ray Serve, step by step (`make demo`).

It starts `modelctl serve` (SQLite and a local Ray in .demo/), then drives it with
the `modelctl` CLI exactly as a person would, calling the model's endpoint over
HTTP after each step and printing what changed: which replicas were kept (same id
and pid), which are new, which build answers.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from controlplane.api.client import Client
from controlplane.domain.types import Deployment

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".demo"
MODELCTL = str(Path(sys.executable).with_name("modelctl"))
MODEL = "projects/demo/models/iris"
FLOWERS = {"features": [[5.1, 3.5, 1.4, 0.2], [6.0, 2.7, 5.1, 1.6], [6.7, 3.0, 5.2, 2.3]]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def step(title: str) -> None:
    print(f"\n\033[1m=== {title}\033[0m", flush=True)


def modelctl(server: str, *args: str) -> None:
    """Runs the CLI as a user would, showing the command and everything it prints."""
    print(f"$ modelctl {' '.join(args)}", flush=True)
    code = subprocess.call([MODELCTL, "--server", server, "--project", "demo", *args])
    if code != 0:
        raise SystemExit(f"demo: `modelctl {' '.join(args)}` exited {code}")


def start_server() -> tuple[subprocess.Popen[str], str, str]:
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir()
    log = (DATA / "server.log").open("w")
    cmd = [
        MODELCTL, "serve", "--data-dir", str(DATA), "--grpc-port", str(free_port()),
        "--http-port", str(free_port()), "--num-cpus", "4", "--num-gpus", "2",
        "--console-port", str(free_port()),
    ]  # fmt: skip
    print("$ " + " ".join(["modelctl", *cmd[1:]]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("ready "):
        raise SystemExit(f"demo: the server did not start; see {DATA / 'server.log'}")
    print(line, flush=True)
    # Its first start wrote an admin token; the CLI reads it from MODELCTL_TOKEN_FILE.
    token_file = DATA / "admin.token"
    os.environ["MODELCTL_TOKEN_FILE"] = str(token_file)
    print(f"$ export MODELCTL_TOKEN_FILE={token_file}   # the admin token serve wrote", flush=True)
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    print(
        f"  the web console: http://{fields['console']}/projects/demo/models "
        f"(sign in with the token in {token_file})",
        flush=True,
    )
    return proc, fields["grpc"], fields["console"]


async def replicas(c: Client) -> tuple[Deployment, dict[str, int]]:
    model = await c.get_model(MODEL)
    dep = await c.get_deployment(model.active_deployment)
    return dep, {r.id: r.pid for r in dep.replicas}


def changes(before: dict[str, int], after: dict[str, int]) -> str:
    kept = [f"{i} (pid {p})" for i, p in after.items() if before.get(i) == p]
    new = [f"{i} (pid {p})" for i, p in after.items() if before.get(i) != p]
    gone = [i for i in before if i not in after]
    return (
        f"  kept replicas: {', '.join(kept) or 'none'}\n"
        f"  new replicas:  {', '.join(new) or 'none'}\n"
        f"  gone:          {', '.join(gone) or 'none'}"
    )


def key_header(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def call(endpoint: str, key: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(endpoint, json=FLOWERS, headers=key_header(key))
    body: dict[str, Any] = r.json()
    print(f"  POST {endpoint} -> {r.status_code}")
    print(f"  build {body['build']}, replica {body['replica_id']}: {body['response']}")
    return body


async def show(c: Client, before: dict[str, int], endpoint: str, key: str) -> dict[str, int]:
    dep, now = await replicas(c)
    r = dep.resources
    print(
        f"  {dep.name}: {dep.state.value}, build {dep.build.rsplit('/', 1)[-1]}, "
        f"{r.replicas} replicas x (cpu {r.cpus:g}, gpu {r.gpus:g})"
    )
    print(changes(before, now))
    await call(endpoint, key)
    return now


async def scaled_to_zero(c: Client, seconds: float = 60) -> None:
    """Waits until the model shows no replica running (its autoscaler's decision)."""
    deadline = time.monotonic() + seconds
    while True:
        scale = (await c.get_model(MODEL)).scale
        if scale is not None and scale.running == 0 and scale.desired == 0:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the model did not scale to zero within {seconds:g} s: {scale}")
        await asyncio.sleep(0.2)


async def requests_counted(c: Client) -> int:
    return (await c.get_model_metrics(MODEL, 3600, 3600)).series.model.totals.requests


async def counted(c: Client, requests: int, seconds: float = 30) -> None:
    """Waits until the replicas' reports of ``requests`` reached the server (about 1 s)."""
    deadline = time.monotonic() + seconds
    while await requests_counted(c) < requests:
        if time.monotonic() > deadline:
            raise SystemExit(f"the replicas' reports did not arrive within {seconds:g} s")
        await asyncio.sleep(0.2)


async def console_view(console: str, token: str) -> None:
    """Signs in to the web console as a person would (the sign-in form, then the Models
    page) and prints the model's row as the page shows it."""
    async with httpx.AsyncClient(base_url=f"http://{console}", timeout=30) as http:
        form = (await http.get("/sign-in")).text
        nonce = re.search(r'name="sign_in_token" value="([^"]+)"', form)
        assert nonce is not None, "no sign-in form"
        signed = await http.post(
            "/sign-in", data={"sign_in_token": nonce.group(1), "token": token, "project": "demo"}
        )
        page = await http.get(signed.headers["location"])
    row = re.search(r'<tr id="model-iris">(.*?)</tr>', page.text, re.S)
    assert row is not None, "iris is not on the Models page"
    cells = [
        re.sub(r"<[^>]+>|\s+", " ", c).strip()
        for c in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
    ]
    print(f"  GET http://{console}/projects/demo/models -> {page.status_code}")
    print(f"  the console's row: {' | '.join(cells)}")
    print("  (open that address in a browser and sign in with the admin token to click through)")


async def workflow(server: str, console: str) -> None:
    examples = ROOT / "examples"
    token = (DATA / "admin.token").read_text().strip()
    async with Client(server, token=token) as c:
        step("1. Create a model")
        modelctl(server, "models", "create", "iris", "--display-name", "Iris classifier")
        endpoint = (await c.get_model(MODEL)).endpoint
        # The endpoint takes only requests with one of the model's invocation keys.
        made, key = await c.create_invocation_key(MODEL, "demo")
        print(f"  invocation key {made.name}: requests send 'Authorization: Bearer mlk_…'")

        step("2. Build examples/iris-v1 (function `predict`) and deploy it: 2 replicas")
        modelctl(server, "build", str(examples / "iris-v1"), "--model", "iris",
                 "--file", "model.py", "--function", "predict", "--deploy",
                 "--replicas", "2", "--cpus", "0.5", "--gpus", "0.5")  # fmt: skip
        seen = await show(c, {}, endpoint, key)
        async with httpx.AsyncClient(timeout=30) as http:
            refused = (await http.post(endpoint, json=FLOWERS)).status_code
        print(f"  POST {endpoint} without a key -> {refused}")

        step("3. Re-deploy the same build with 3 replicas: first the plan, then in place")
        modelctl(server, "deploy", "iris", "--build", "1", "--replicas", "3", "--dry-run")
        modelctl(server, "deploy", "iris", "--build", "1", "--replicas", "3")
        seen = await show(c, seen, endpoint, key)

        step("4. Deploy a new build: examples/iris-v2, entry function renamed to `classify`")
        modelctl(server, "build", str(examples / "iris-v2"), "--model", "iris",
                 "--file", "model.py", "--function", "classify", "--deploy",
                 "--replicas", "2", "--gpus", "0")  # fmt: skip
        seen = await show(c, seen, endpoint, key)

        step("5. Roll back to build 1")
        modelctl(server, "deploy", "iris", "--build", "1")
        seen = await show(c, seen, endpoint, key)

        step("6. Restart: every replica re-initialized, same build and resources")
        modelctl(server, "restart", "iris", "--yes")
        seen = await show(c, seen, endpoint, key)

        step("7. Scale with the load: 0 to 2 replicas, switched in place; idle for 2 s, it")
        print("  scales to zero and stays DEPLOYED, and its next request starts a replica")
        modelctl(server, "deploy", "iris", "--build", "1", "--min-replicas", "0",
                 "--max-replicas", "2", "--downscale-delay", "2s")  # fmt: skip
        seen = await show(c, seen, endpoint, key)
        await scaled_to_zero(c)
        modelctl(server, "models", "get", "iris")
        started = time.monotonic()
        await call(endpoint, key)
        print(f"  the first request after zero was answered in {time.monotonic() - started:.1f}s")
        modelctl(server, "deploy", "iris", "--build", "1", "--replicas", "2", "--no-autoscaling")
        seen = await show(c, seen, endpoint, key)

        step("8. A canary of build 2: 50%, then 100% of requests, each step judged on its")
        print("  own errors and p99 under a steady load, then promoted by itself")
        answered: dict[str, int] = {}
        load_done = asyncio.Event()

        async def load() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                for _ in range(3000):  # bounded
                    if load_done.is_set():
                        return
                    r = await http.post(endpoint, json=FLOWERS, headers=key_header(key))
                    who = f"{r.status_code} build {r.json().get('build', '?').rsplit('/', 1)[-1]}"
                    answered[who] = answered.get(who, 0) + 1
                    await asyncio.sleep(0.05)

        loading = asyncio.create_task(load())
        await asyncio.to_thread(
            modelctl, server, "deploy", "iris", "--build", "2", "--canary", "50,100",
            "--bake", "3s", "--max-error-rate", "1%", "--max-p99", "2s", "--min-requests", "5",
        )  # fmt: skip
        load_done.set()
        await loading
        print(f"  answers during the canary: {dict(sorted(answered.items()))}")
        seen = await show(c, seen, endpoint, key)

        step("9. See what it does: requests, latency, CPU per build and replica; its logs")
        before = await requests_counted(c)
        async with httpx.AsyncClient(timeout=30) as http:
            for _ in range(20):
                await http.post(endpoint, json=FLOWERS, headers=key_header(key))
        await counted(c, before + 20)
        modelctl(server, "metrics", "iris", "--window", "5m", "--step", "1m")
        modelctl(server, "logs", "iris", "--tail", "4")

        step("10. The web console shows the same, live (the seed's pages and buttons)")
        await console_view(console, token)

        step("11. Stop: no replica left, the endpoint stops answering; history stays")
        modelctl(server, "stop", "iris", "--yes")
        async with httpx.AsyncClient(timeout=10) as http:
            try:
                answer = await http.post(endpoint, json=FLOWERS, headers=key_header(key))
                status = str(answer.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
        print(f"  POST {endpoint} -> {status}")
        modelctl(server, "deployments", "list", "iris")
        modelctl(server, "builds", "list", "iris")


def main() -> int:
    os.chdir(ROOT)
    started = time.monotonic()
    proc, server, console = start_server()
    try:
        asyncio.run(workflow(server, console))
    finally:
        step("Shutting down (SIGTERM: in-flight RPCs drain, the local Ray stops)")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        assert proc.stdout is not None
        proc.stdout.close()
        print(f"  server exited {code}; records and logs are in {DATA}")
    print(f"\nDemo finished in {time.monotonic() - started:.0f}s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
