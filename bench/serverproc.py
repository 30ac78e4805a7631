"""What every benchmark shares: servers in processes of their own, the stub type, results."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modellifecycle.v1 import service_pb2_grpc

if TYPE_CHECKING:  # the typed view of a stub on a grpc.aio channel (mypy-protobuf)
    Stub = service_pb2_grpc.ModelLifecycleAsyncStub
else:
    Stub = service_pb2_grpc.ModelLifecycleStub

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODELCTL = str(Path(sys.executable).with_name("modelctl"))


def start_process(
    cmd: Sequence[str], log_path: Path | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Starts a server that prints ``ready grpc=ADDRESS ...``; returns it and ADDRESS.

    Its log goes to ``log_path`` (read afterwards) or a temporary file, shown if it does
    not start."""
    # Either lives as long as the process.
    log = (
        log_path.open("w+") if log_path is not None else tempfile.TemporaryFile("w+")  # noqa: SIM115
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("ready grpc="):
        proc.kill()
        proc.wait()
        log.seek(0)
        raise SystemExit(f"{cmd[0]} did not start: {line!r}\n{log.read()[-4000:]}")
    return proc, line.split()[1].removeprefix("grpc=")


def start_server(
    data: Path, http_port: int = 0, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen[str], str]:
    """`modelctl serve` (fake backend) on free ports under ``data``, as its own process."""
    return start_process(
        [
            MODELCTL,
            "serve",
            "--insecure-no-auth",
            "--console-port=0",
            "--grpc-port=0",
            f"--http-port={http_port}",
            f"--data-dir={data}",
            "--backend=fake",
            *extra,
        ]
    )


def start_on_ray(
    ray_address: str,
    data: Path,
    http_port: int,
    extra: Sequence[str] = (),
    log_path: Path | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """`modelctl serve` on the Ray cluster at ``ray_address`` (SQLite under ``data``), as
    its own process."""
    return start_process(
        [
            MODELCTL,
            "serve",
            "--insecure-no-auth",
            "--console-port=0",
            f"--ray-address={ray_address}",
            "--grpc-port=0",
            f"--http-port={http_port}",
            f"--data-dir={data}",
            *extra,
        ],
        log_path,
    )


async def serve_bare(servicer: service_pb2_grpc.ModelLifecycleServicer) -> None:
    """An anchor: ``servicer`` alone on a grpc.aio server; prints the ready line."""
    import grpc

    server = grpc.aio.server()
    service_pb2_grpc.add_ModelLifecycleServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"ready grpc=127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def back_to_back(
    address: str,
    call_of: Callable[[Stub], Callable[[int], Awaitable[object]]],
    callers: int,
    seconds: float,
) -> dict[str, float]:
    """``callers`` coroutines making calls back to back for ``seconds`` on one channel:
    calls/s and latency. ``call_of(stub)`` gives the call; its argument counts each
    caller's calls (caller k makes calls k, k + callers, ...), to vary what is asked."""
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        call = call_of(Stub(channel))
        await call(0)  # connected and warm
        latencies: list[float] = []
        end = time.perf_counter() + seconds

        async def caller(k: int) -> None:
            i = k
            while (now := time.perf_counter()) < end:
                await call(i)
                latencies.append(time.perf_counter() - now)
                i += callers

        started = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(callers)))
        elapsed = time.perf_counter() - started
    ms = sorted(x * 1000 for x in latencies)
    return {
        "calls_per_s": len(ms) / elapsed,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[max(0, int(len(ms) * 0.99) - 1)],
    }


async def start_build(stub: Stub, model: str, source: str, deploy: Any = None) -> str:
    """Uploads ``source`` as ``model``'s model.py and starts building its ``predict``
    (deploying it after with ``deploy``, a DeployOptions); the operation's name."""
    import io
    import zipfile

    from modellifecycle.v1 import service_pb2 as rpc

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.py", source)

    async def chunks() -> AsyncIterator[rpc.UploadSourceRequest]:
        yield rpc.UploadSourceRequest(parent=model, chunk=buf.getvalue())

    src = await stub.UploadSource(chunks())
    op = await stub.CreateBuild(
        rpc.CreateBuildRequest(
            parent=model,
            source_sha256=src.sha256,
            file_path="model.py",
            function_name="predict",
            deploy=deploy,
        )
    )
    return str(op.name)


async def finished(stub: Stub, name: str, deadline_s: float = 300) -> Any:
    """The operation ``name`` once done (a pb.Operation), asked with WaitOperation."""
    from google.protobuf import duration_pb2

    from modellifecycle.v1 import service_pb2 as rpc

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        op = await stub.WaitOperation(
            rpc.WaitOperationRequest(name=name, timeout=duration_pb2.Duration(seconds=10))
        )
        if op.done:
            return op
    raise SystemExit(f"{name} not done in {deadline_s:g} s")


def save_result(name: str, result: dict[str, Any]) -> None:
    """bench/results/<name>.json, read by the suite's smoke tests."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")


@dataclass(frozen=True)
class Row:
    """One line of `make bench`'s table: a figure of ours beside its anchor, if it has one.

    Every benchmark module has ``summary(result) -> list[Row]`` over the dict it saved.
    """

    figure: str  # what was measured, with its unit: "deploy to DEPLOYED s"
    ours: float
    anchor: float | None = None  # the same figure on the anchor, measured in the same run
    target: str = ""  # as the issue states it: "ratio <= 1.10", "< 5 ms", "0"
    met: bool | None = None  # None: no target for this row

    @property
    def ratio(self) -> float | None:
        return self.ours / self.anchor if self.anchor else None
