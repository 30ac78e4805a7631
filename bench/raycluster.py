"""A local Ray cluster of a benchmark's own: `ray start --head --block` in a process group,
every port chosen free, torn down without `ray stop` (which would stop every cluster on
the machine, a test suite's included)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


# ---- the one Ray cluster of the run -------------------------------------------------------


@dataclass
class Cluster:
    proc: subprocess.Popen[bytes]
    address: str
    temp_dir: Path
    leftovers: list[int] = field(default_factory=list)


def start_cluster(temp_dir: Path, log: Path) -> Cluster:
    """A head node in a process group of its own; every port chosen here (another
    cluster on this machine keeps its defaults, 10001 and 52365 included)."""
    # Once an auth token exists in ~/.ray (an earlier `ray start` writes one), Ray 2.60
    # starts heads with token auth, and drivers without the token cannot join. This is a
    # cluster of our own on 127.0.0.1: off, for it and every process started after it
    # (the control plane, the raw Serve driver), as tests/ray does for its own head.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Stopped with SIGTERM (a test's deadline), the benchmark unwinds: its `finally`
    # stops this cluster, whose head is in a process group of its own and would outlive it.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # On SIGTERM, Ray 2.60's head drains its node for up to 30 s first (for Kubernetes);
    # nothing is left to drain when a benchmark ends: it is torn down at once.
    os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    port = free_port()
    ports = {
        "--port": port,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--num-cpus=4",
        "--num-gpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--node-ip-address={HOST}",
        f"--object-store-memory={128 * 1024 * 1024}",
        f"--temp-dir={temp_dir}",
        *(f"{k}={v}" for k, v in ports.items()),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = Cluster(proc, f"{HOST}:{port}", temp_dir)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_cluster(cluster)
            raise SystemExit(f"ray start failed:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return cluster


def ours_pids(temp_dir: Path) -> list[int]:
    """Processes of this run's cluster: each names the cluster's temp dir on its command
    line (workers, raylet, GCS, agents), or is the head's process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with suppress(OSError):
            if str(temp_dir).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def stop_cluster(cluster: Cluster) -> None:
    """SIGTERM to the head's process group, SIGKILL after 30 s; then any process still
    naming this cluster's temp dir is killed by its pid and recorded as a leftover."""
    with suppress(ProcessLookupError):
        os.killpg(cluster.proc.pid, signal.SIGTERM)
    try:
        cluster.proc.wait(30)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(cluster.proc.pid, signal.SIGKILL)
        cluster.proc.wait(10)
    deadline = time.monotonic() + 10
    while (left := ours_pids(cluster.temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    cluster.leftovers = left
