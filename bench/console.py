"""The web console at scale: its pages with 1,000 models, and what 100 open live pages cost.

Starts `modelctl serve` (fake backend, SQLite in a temp dir, the console on a free port) as
its own process and creates 1,000 models through the API, the first 10 built and deployed
(2 replicas), so that the first page shows builds and replicas. Then, from one signed-in
HTTP client on 127.0.0.1, one request at a time:

- the Models page (/projects/bench/models: 50 rows) and a deployed model's Overview page
  (/projects/bench/models/m0000), ~200 GETs each: p50/p95 of the whole response (an upper
  bound on the server's time). Anchor: the API reads the page makes, over gRPC from this
  process (ListModels of 50 and GetDeployment of each deployed row; GetModel and
  GetDeployment for the Overview). Target: p95 < 100 ms. The Overview page is being
  written: until it exists the server answers 404, and the row says so.
- 100 open live pages (/projects/bench/models/-live, each its own signed-in session, as 100
  people), each kept reading: the server's RSS before them, once every page has its first
  update, and after a change (StopModel of a model on the first page) has reached all 100;
  and the time from the change to the last page. Anchor: a second server with the same
  models and 100 WatchModels streams straight over gRPC (one channel each, as the
  console's sessions have), the same change. Target: RSS growth < 100 MB.

Writes bench/results/console.json.

    .venv/bin/python bench/console.py [--models 1000] [--pages 100] [--requests 200] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from serverproc import MODELCTL, Row, save_result

from controlplane.api.client import Client
from controlplane.domain.states import EventType, ModelState
from controlplane.domain.types import DeployOptions, Model, Resources

PROJECT = "projects/bench"
TARGET_P95_MS = 100.0
TARGET_GROWTH_MB = 100.0
TARGET_DELIVERY_S = 2.0  # a change on an open page within 2 s (the browser tests' bound)
SOURCE = "def predict(body):\n    return body\n"
CHANGED = "m0000"  # deployed, on the first page: the change stops it


@dataclass
class Proc:
    proc: subprocess.Popen[str]
    grpc: str
    console: str  # http://HOST:PORT

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def start(data: Path) -> Proc:
    """`modelctl serve` with its console, on free ports; its log in a temporary file."""
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the process)
    cmd = [
        MODELCTL,
        "serve",
        "--insecure-no-auth",
        "--backend=fake",
        "--grpc-port=0",
        "--http-port=0",
        "--console-port=0",
        f"--data-dir={data}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
    if not line.startswith("ready grpc=") or "console" not in fields:
        proc.kill()
        proc.wait()
        log.seek(0)
        raise SystemExit(f"modelctl serve did not start with a console: {line!r}\n{log.read()}")
    return Proc(proc, fields["grpc"], f"http://{fields['console']}")


def name(i: int) -> str:
    return f"m{i:04d}"


async def fill(grpc: str, models: int, deployed: int) -> None:
    """``models`` models, the first ``deployed`` of them built and deployed (2 replicas)."""
    import io
    import zipfile

    async with Client(grpc) as c:
        for first in range(0, models, 50):
            await asyncio.gather(
                *(
                    c.create_model(PROJECT, name(i), display_name=f"Model {i}")
                    for i in range(first, min(first + 50, models))
                )
            )
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(zipfile.ZipInfo("model.py", (2020, 1, 1, 0, 0, 0)), SOURCE)

        async def deploy(i: int) -> None:
            model = f"{PROJECT}/models/{name(i)}"
            src = await c.upload_source(model, buf.getvalue())
            options = DeployOptions(Resources(replicas=2))
            op = await c.create_build(model, src.sha256, "model.py", "predict", deploy=options)
            done = await c.wait(op.name, timeout_s=120)
            if done.error is not None:
                raise SystemExit(f"deploying {model} failed: {done.error}")

        await asyncio.gather(*(deploy(i) for i in range(deployed)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


async def timed(n: int, call: Callable[[], Awaitable[object]]) -> dict[str, float]:
    """p50/p95 ms of ``n`` calls one after another (after a few not counted)."""
    for _ in range(min(10, n)):
        await call()
    ms = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        ms.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": statistics.median(ms), "p95_ms": percentile(ms, 0.95), "n": n}


async def signed_in(console: str) -> httpx.AsyncClient:
    """An HTTP client with a console session of its own (an empty token: --insecure-no-auth),
    on the bench project."""
    http = httpx.AsyncClient(base_url=console, timeout=60)
    form = await http.get("/sign-in")
    found = re.search(r'name="sign_in_token" value="([^"]*)"', form.text)
    if found is None:
        raise SystemExit(f"no sign-in form at {console}/sign-in: {form.status_code}")
    r = await http.post(
        "/sign-in",
        data={"sign_in_token": found.group(1), "token": "", "project": "bench"},
    )
    if r.status_code != 303:
        raise SystemExit(f"sign-in refused: {r.status_code} {r.text[:500]}")
    return http


async def renders(server: Proc, requests: int) -> dict[str, Any]:
    """The Models page and an Overview, each beside the API reads it makes."""
    models_path = f"/{PROJECT}/models"
    overview_path = f"/{PROJECT}/models/{CHANGED}"
    http = await signed_in(server.console)
    statuses: dict[str, int] = {}

    def page(path: str) -> Callable[[], Awaitable[object]]:
        async def get() -> object:
            r = await http.get(path)
            statuses[path] = r.status_code
            return r

        return get

    async with Client(server.grpc) as c:

        async def models_reads() -> object:
            listed = await c.list_models(PROJECT, 50)
            active = [m.active_deployment for m in listed.items if m.active_deployment]
            return await asyncio.gather(*(c.get_deployment(d) for d in active))

        async def overview_reads() -> object:
            model: Model = await c.get_model(f"{PROJECT}/models/{CHANGED}")
            return await c.get_deployment(model.active_deployment)

        result: dict[str, Any] = {
            "models_page": await timed(requests, page(models_path)),
            "models_reads": await timed(requests, models_reads),
            "overview_page": await timed(requests, page(overview_path)),
            "overview_reads": await timed(requests, overview_reads),
        }
    first = await http.get(models_path)
    result["models_rows"] = first.text.count('<tr id="model-')
    result["models_status"] = statuses[models_path]
    result["overview_status"] = statuses[overview_path]
    await http.aclose()
    return result


async def stopped(grpc: str) -> float:
    """Stops the changed model; returns when (perf_counter) the call was made."""
    async with Client(grpc) as c:
        made = time.perf_counter()
        op = await c.stop_model(f"{PROJECT}/models/{CHANGED}")
        await c.wait(op.name, timeout_s=60)
    return made


def row_of(html: str, model_id: str) -> str:
    start = html.find(f'<tr id="model-{model_id}"')
    return html[start : html.find("</tr>", start)] if start >= 0 else ""


async def live_pages(server: Proc, pages: int) -> dict[str, Any]:
    """``pages`` sessions each following the Models page's live stream; RSS and delivery."""
    rss_before = server.rss_mb()
    clients = [await signed_in(server.console) for _ in range(pages)]
    rss_signed_in = server.rss_mb()
    first = [asyncio.Event() for _ in range(pages)]
    changed_at: list[float | None] = [None] * pages
    swaps = [0] * pages  # updates each page got
    all_changed = asyncio.Event()

    async def follow(i: int) -> None:
        async with clients[i].stream("GET", f"/{PROJECT}/models/-live", timeout=None) as r:
            if r.status_code != 200:
                raise SystemExit(f"live page {i}: {r.status_code}")
            event = ""
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                if not line.startswith("data: ") or event != "swap":
                    continue
                html = json.loads(line.removeprefix("data: "))["html"]
                swaps[i] += 1
                first[i].set()
                if changed_at[i] is None and "state-stopped" in row_of(html, CHANGED):
                    changed_at[i] = time.perf_counter()
                    if all(t is not None for t in changed_at):
                        all_changed.set()

    tasks = [asyncio.create_task(follow(i)) for i in range(pages)]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first)), 120)
        rss_open = server.rss_mb()
        swaps_before, cpu = sum(swaps), server.cpu_s()
        made = await stopped(server.grpc)
        await asyncio.wait_for(all_changed.wait(), 60)
        cpu = server.cpu_s() - cpu
        swaps_after = sum(swaps) - swaps_before
        rss_after = server.rss_mb()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for http in clients:
            await http.aclose()
    delays = [t - made for t in changed_at if t is not None]
    return {
        "pages": pages,
        "rss_before_mb": rss_before,
        "rss_signed_in_mb": rss_signed_in,
        "rss_open_mb": rss_open,
        "rss_after_change_mb": rss_after,
        "growth_mb": max(rss_open, rss_after) - rss_before,
        "reached": len(delays),
        "delivery_p50_s": statistics.median(delays),
        "delivery_max_s": max(delays),
        "delivery_server_cpu_s": cpu,
        "updates_per_page": swaps_after / pages,
    }


async def grpc_watchers(server: Proc, watchers: int) -> dict[str, Any]:
    """The anchor: ``watchers`` WatchModels streams over gRPC, each on a channel of its own."""
    rss_before = server.rss_mb()
    clients = [Client(server.grpc) for _ in range(watchers)]
    first = [asyncio.Event() for _ in range(watchers)]
    changed_at: list[float | None] = [None] * watchers
    all_changed = asyncio.Event()
    changed_model = f"{PROJECT}/models/{CHANGED}"

    async def follow(i: int) -> None:
        async for event in clients[i].watch_models(PROJECT):
            if event.type == EventType.BOOKMARK:
                first[i].set()  # after the current state of every model
                continue
            m = event.resource
            if (
                changed_at[i] is None
                and isinstance(m, Model)
                and m.name == changed_model
                and m.state == ModelState.STOPPED
            ):
                changed_at[i] = time.perf_counter()
                if all(t is not None for t in changed_at):
                    all_changed.set()

    tasks = [asyncio.create_task(follow(i)) for i in range(watchers)]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first)), 120)
        rss_open = server.rss_mb()
        cpu = server.cpu_s()
        made = await stopped(server.grpc)
        await asyncio.wait_for(all_changed.wait(), 60)
        cpu = server.cpu_s() - cpu
        rss_after = server.rss_mb()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.close()
    delays = [t - made for t in changed_at if t is not None]
    return {
        "watchers": watchers,
        "rss_before_mb": rss_before,
        "rss_open_mb": rss_open,
        "rss_after_change_mb": rss_after,
        "growth_mb": max(rss_open, rss_after) - rss_before,
        "reached": len(delays),
        "delivery_p50_s": statistics.median(delays),
        "delivery_max_s": max(delays),
        "delivery_server_cpu_s": cpu,
    }


async def run(models: int, deployed: int, pages: int, requests: int) -> dict[str, Any]:
    result: dict[str, Any] = {
        "models": models,
        "deployed": deployed,
        "pages": pages,
        "requests": requests,
    }
    with tempfile.TemporaryDirectory() as tmp:
        server = start(Path(tmp) / "ours")
        try:
            started = time.perf_counter()
            await fill(server.grpc, models, deployed)
            result["fill_s"] = time.perf_counter() - started
            result["render"] = await renders(server, requests)
            result["live"] = await live_pages(server, pages)
        finally:
            server.stop()
        anchor = start(Path(tmp) / "anchor")
        try:
            await fill(anchor.grpc, models, deployed)
            result["anchor_live"] = await grpc_watchers(anchor, pages)
        finally:
            anchor.stop()
    return result


def summary(result: dict[str, Any]) -> list[Row]:
    render, live, anchor = result["render"], result["live"], result["anchor_live"]
    n, pages = result["models"], result["pages"]
    overview_ok = render["overview_status"] == 200
    overview = "" if overview_ok else f" (HTTP {render['overview_status']}: not written yet)"
    return [
        Row(
            f"Models page p95 ms ({n:,} models, 50 rows)",
            render["models_page"]["p95_ms"],
            render["models_reads"]["p95_ms"],
            f"< {TARGET_P95_MS:g}",
            render["models_page"]["p95_ms"] < TARGET_P95_MS,
        ),
        Row(
            f"model Overview page p95 ms{overview}",
            render["overview_page"]["p95_ms"],
            render["overview_reads"]["p95_ms"],
            f"< {TARGET_P95_MS:g}",
            render["overview_page"]["p95_ms"] < TARGET_P95_MS if overview_ok else None,
        ),
        Row(
            f"{pages} open live pages: server RSS growth MB",
            live["growth_mb"],
            anchor["growth_mb"],
            f"< {TARGET_GROWTH_MB:g}",
            live["growth_mb"] < TARGET_GROWTH_MB,
        ),
        Row(
            f"{pages} open live pages: change -> last page s",
            live["delivery_max_s"],
            anchor["delivery_max_s"],
            f"< {TARGET_DELIVERY_S:g}",
            live["delivery_max_s"] < TARGET_DELIVERY_S,
        ),
    ]


def show(result: dict[str, Any]) -> None:
    render, live, anchor = result["render"], result["live"], result["anchor_live"]
    print(
        f"{result['models']} models ({result['deployed']} deployed, made in "
        f"{result['fill_s']:.1f} s), {result['requests']} requests per page, "
        f"{result['pages']} live pages"
    )
    print(f"{'figure':<44}{'ours':>10}{'anchor':>10}{'ratio':>8}{'target':>9}")

    def line(label: str, ours: float, anchor: float | None, target: str = "") -> None:
        ratio = f"{ours / anchor:.2f}" if anchor else ""
        other = f"{anchor:.1f}" if anchor is not None else ""
        print(f"{label:<44}{ours:>10.1f}{other:>10}{ratio:>8}{target:>9}")

    target = f"< {TARGET_P95_MS:g}"
    line("Models page p50 ms", render["models_page"]["p50_ms"], render["models_reads"]["p50_ms"])
    line(
        "Models page p95 ms",
        render["models_page"]["p95_ms"],
        render["models_reads"]["p95_ms"],
        target,
    )
    status = render["overview_status"]
    line(
        f"Overview page p50 ms (HTTP {status})",
        render["overview_page"]["p50_ms"],
        render["overview_reads"]["p50_ms"],
    )
    line(
        f"Overview page p95 ms (HTTP {status})",
        render["overview_page"]["p95_ms"],
        render["overview_reads"]["p95_ms"],
        target,
    )
    line("server RSS MB before live pages", live["rss_before_mb"], anchor["rss_before_mb"])
    line("server RSS MB, signed in (no stream yet)", live["rss_signed_in_mb"], None)
    line("server RSS MB, every page live", live["rss_open_mb"], anchor["rss_open_mb"])
    line(
        "server RSS MB, after the change",
        live["rss_after_change_mb"],
        anchor["rss_after_change_mb"],
    )
    line(
        "server RSS growth MB",
        live["growth_mb"],
        anchor["growth_mb"],
        f"< {TARGET_GROWTH_MB:g}",
    )
    line("change -> page p50 s", live["delivery_p50_s"], anchor["delivery_p50_s"])
    line(
        "server CPU s, change -> last page",
        live["delivery_server_cpu_s"],
        anchor["delivery_server_cpu_s"],
    )
    line("updates per page, change -> last page", live["updates_per_page"], None)
    line(
        "change -> last page s",
        live["delivery_max_s"],
        anchor["delivery_max_s"],
        f"< {TARGET_DELIVERY_S:g}",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=1000)
    p.add_argument("--deployed", type=int, default=10)
    p.add_argument("--pages", type=int, default=100)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--smoke", action="store_true", help="50 models, 10 pages, 40 requests")
    args = p.parse_args()
    if args.smoke:
        args.models, args.deployed, args.pages, args.requests = 50, 2, 10, 40
    result = asyncio.run(run(args.models, args.deployed, args.pages, args.requests))
    result["smoke"] = args.smoke
    show(result)
    save_result("console", result)
    if result["render"]["models_status"] != 200:
        raise SystemExit(f"the Models page answered {result['render']['models_status']}")
    for side in ("live", "anchor_live"):
        if result[side]["reached"] != args.pages:
            raise SystemExit(f"{side}: the change reached {result[side]['reached']} pages")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
