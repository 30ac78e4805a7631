"""Server processes: `modelctl serve` for the crash and two-server tests (the fake
backend, whose simulated cluster, a file in the data dir, outlives each process), one
`modelctl serve` a test talks to (``serve``), commands run to their end (``run``), what a
server's /metrics say (``metric``), and a free port to listen on (``free_port``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from controlplane import failpoints
from tests.helpers.api import Stub

MODELCTL = str(Path(sys.executable).with_name("modelctl"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """`modelctl serve` processes on one data dir and database (each start is a new
    process with the same ``server_id``), started and killed by the test."""

    def __init__(
        self,
        data: Path,
        db_url: str,
        server_id: str = "crash-test",
        job_lease_s: float = 15,
        backend: str = "fake",
        extra: Sequence[str] = (),
        auth: bool = False,
        prefix: Sequence[str] = (),
    ) -> None:
        """``extra``: more flags (a flag given again overrides the default above it);
        ``auth``: tokens needed (the first admin token is DATA/admin.token); ``prefix``:
        what the command runs under (``ray_nodes.sharing_no_disk``: a machine of its own)."""
        self.auth = auth
        self.prefix = list(prefix)
        self.backend = backend
        self.extra = list(extra)
        self.data = data
        self.db_url = db_url
        self.server_id = server_id
        self.job_lease_s = job_lease_s
        self.armed = data.parent / f"failpoint-{server_id}"
        self.popen: subprocess.Popen[str] | None = None
        self.address = ""
        self.metrics = ""

    def start(self) -> None:
        self.armed.write_text("")
        self.popen = subprocess.Popen(
            [
                *self.prefix,
                MODELCTL,
                "serve",
                *([] if self.auth else ["--insecure-no-auth"]),
                "--grpc-port=0",
                "--console-port=0",
                "--http-port=18998",
                f"--data-dir={self.data}",
                f"--database-url={self.db_url}",
                f"--backend={self.backend}",
                f"--server-id={self.server_id}",
                f"--job-lease={self.job_lease_s:g}",
                "--deploy-timeout=60",
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", failpoints.ENV: str(self.armed)},
        )
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline().strip()
        assert line.startswith("ready grpc="), f"unexpected first line {line!r}"
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        self.address = fields["grpc"]
        self.metrics = fields.get("metrics", "")  # with --metrics-port in ``extra``

    def arm(self, step: str) -> None:
        self.armed.write_text(step)

    async def died(self) -> int:
        assert self.popen is not None
        code = await asyncio.to_thread(self.popen.wait, 60)
        self.armed.write_text("")
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return code

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        if self.popen is not None and self.popen.stdout is not None:
            self.popen.stdout.close()

    def running_apps(self) -> dict[str, dict[str, object]]:
        path = self.data / "fake-cluster.json"
        apps: dict[str, dict[str, object]] = json.loads(path.read_text()) if path.exists() else {}
        return apps

    def unfinished_jobs(self) -> int:
        engine = create_engine(self.db_url)
        try:
            with engine.connect() as c:
                return int(
                    c.execute(
                        text("SELECT count(*) FROM jobs WHERE state IN ('pending', 'running')")
                    ).scalar_one()
                )
        finally:
            engine.dispose()


async def metric(address: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` that have these labels (and any others) at
    http://ADDRESS/metrics, as Prometheus would scrape them: 0 when there are none."""
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(f"http://{address}/metrics")
    answer.raise_for_status()
    return sum(
        sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@contextlib.asynccontextmanager
async def channel(c: Cluster) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(c.address) as ch:
        yield Stub(ch)


async def run(
    *argv: str, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, str, str]:
    """A command (``argv[0]`` a program: MODELCTL, buf) to its end, within a minute: its
    exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def serve(
    *flags: str,
    log: Path | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    ready_s: float = 60,
    stop_s: float = 30,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`modelctl serve FLAGS` (its stderr into ``log``, or dropped): the process and its
    gRPC address, once it prints its ready line. When the block ends it gets SIGTERM and
    must exit 0 within ``stop_s``; when the block raised, or it did not stop, it is
    killed."""
    with log.open("w") if log is not None else contextlib.nullcontext() as err:
        proc = await asyncio.create_subprocess_exec(
            MODELCTL,
            "serve",
            *(() if any(f.startswith("--console-port") for f in flags) else ("--console-port=0",)),
            *flags,
            cwd=cwd,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=err if err is not None else asyncio.subprocess.DEVNULL,
        )

    def tail() -> str:
        return log.read_text()[-3000:] if log is not None else ""

    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), ready_s)).decode().strip()
        assert line.startswith("ready grpc="), (line, tail())
        yield proc, line.split()[1].removeprefix("grpc=")
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), stop_s)
        assert code == 0, f"modelctl serve exited {code} on SIGTERM: {tail()}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
