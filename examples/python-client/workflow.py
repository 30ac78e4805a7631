"""The active-model workflow from Python, with the client library `modelctl` itself uses.

    .venv/bin/python examples/python-client/workflow.py --server 127.0.0.1:50051 \
        --token-file .modelctl/admin.token

Against a running `modelctl serve`: creates a model, uploads and builds examples/iris-v1
and deploys it with 2 replicas (progress printed as it goes), follows the model's
events in the background, calls the endpoint, scales to 3 in place, restarts, stops, and
shows how a bad request comes back as a ClientError carrying its reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from pathlib import Path

import httpx

from controlplane.api.client import Client, ClientError
from controlplane.domain.types import DeployOptions, Operation, Resources
from workers.archive import zip_directory

IRIS = Path(__file__).resolve().parent.parent / "iris-v1"


def progress(op: Operation) -> None:
    print(f"  {op.kind.value.lower()}: {op.progress}{' (done)' if op.done else ''}", flush=True)


async def follow(c: Client, model: str) -> None:
    """Every change of the model, live: the current state first, then each event."""
    async for event in c.watch_model(model):
        if event.resource is not None:
            kind = type(event.resource).__name__
            state = getattr(event.resource, "state", "")
            print(f"  event {event.revision}: {event.type.value} {kind} {state}", flush=True)


async def done(c: Client, op: Operation) -> Operation:
    op = await c.wait(op.name, timeout_s=600, on_progress=progress)
    if op.error is not None:
        raise SystemExit(f"{op.kind.value} failed: {op.error.code} {op.error.message}")
    return op


async def call(endpoint: str, key: str) -> httpx.Response:
    """POSTs one flower with the model's invocation key (live within seconds)."""
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(100):
            answer = await http.post(
                endpoint,
                json={"features": [[5.1, 3.5, 1.4, 0.2]]},
                headers={"authorization": f"Bearer {key}"},
            )
            if answer.status_code != 401:
                break
            await asyncio.sleep(0.1)
    return answer


async def workflow(server: str, project: str, model_id: str, token: str) -> None:
    async with Client(server, token=token) as c:
        try:  # a bad request: the error carries the gRPC code, the reason and the field
            await c.create_model(project, "Not A Valid Id")
        except ClientError as e:
            print(f"bad request -> {e.code} {e.violations}")
        model = (await c.create_model(project, model_id)).name
        print(f"created {model}")
        watcher = asyncio.create_task(follow(c, model))
        with tempfile.TemporaryDirectory() as tmp:
            zip_directory(IRIS, Path(tmp) / "iris.zip")
            source = await c.upload_source(model, (Path(tmp) / "iris.zip").read_bytes())
        deploy = DeployOptions(Resources(replicas=2))
        op = await c.create_build(model, source.sha256, "model.py", "predict", deploy=deploy)
        build = (await done(c, op)).target
        endpoint = (await c.get_model(model)).endpoint
        key_info, key = await c.create_invocation_key(model, "python example")
        print(f"invocation key {key_info.name}")
        answer = await call(endpoint, key)
        print(f"POST {endpoint} -> {answer.status_code} {answer.json()['response']}")
        await done(c, await c.create_deployment(model, build, Resources(replicas=3)))
        print(f"scaled: {(await c.get_model(model)).state.value} with 3 replicas")
        await done(c, await c.restart_model(model))
        await done(c, await c.stop_model(model))
        print(f"stopped: {(await c.get_model(model)).state.value}")
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="127.0.0.1:50051", help="modelctl serve's gRPC address")
    p.add_argument("--project", default="projects/default")
    p.add_argument("--model-id", default="iris-from-python")
    p.add_argument(
        "--token-file",
        type=Path,
        default=Path(".modelctl/admin.token"),
        help="the API token (default: the admin token `modelctl serve` wrote in ./.modelctl)",
    )
    args = p.parse_args()
    token = args.token_file.read_text().strip() if args.token_file.is_file() else ""
    asyncio.run(workflow(args.server, args.project, args.model_id, token))


if __name__ == "__main__":
    main()
