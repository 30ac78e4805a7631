"""A Ray cluster of two nodes on this machine, for tests of what claims to work on a
cluster: a head (`ray start --head`, 127.0.0.1) and a second node (`ray start
--address`, node address 127.0.0.2), each with a temp dir of its own."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.servers import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def _ray(*args: str, env: dict[str, str]) -> None:
    subprocess.run([RAY, "start", *args], check=True, env=env, capture_output=True, timeout=180)


def start_head(port: int, temp: str, cpus: int = 2, gpus: int = 0) -> None:
    """A head node on 127.0.0.1:``port`` (again at the same address after a stop);
    ``gpus``: logical GPUs."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_metrics_report_interval_ms": "1000"}
    _ray(
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={cpus}",
        f"--num-gpus={gpus}",
        "--include-dashboard=false",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        env=env,
    )


def kill_all(temp: str) -> None:
    """Every process of the node(s) with this temp dir, at once (`ray stop --force`)."""
    subprocess.run(["pkill", "-9", "-f", temp], check=False)


@contextlib.contextmanager
def two_nodes(cpus: int = 2, second_gpus: int = 0) -> Iterator[str]:
    """The head's address (``nodes``: with each node's temp dir too)."""
    with nodes(cpus, second_gpus) as (address, _):
        yield address


def kill_raylet(temp: str) -> int:
    """SIGKILL to the raylet of the node with this temp dir (the node is lost); its pid."""
    pid = raylet_pid(temp)
    os.kill(pid, signal.SIGKILL)
    return pid


def raylet_pid(temp: str) -> int:
    """The pid of the raylet of the node with this temp dir."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if comm == "raylet" and temp.encode() in cmdline:
            return int(entry.name)
    raise AssertionError(f"no raylet of {temp}")


def in_namespace_of(pid: int, *command: str) -> str:
    """Runs ``command`` in the mount namespace of process ``pid``; its output ("" when
    it failed)."""
    done = subprocess.run(
        ["nsenter", "-t", str(pid), "-m", *command],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout if done.returncode == 0 else ""


def seen_by(pid: int, path: Path) -> list[str]:
    """What the process ``pid`` sees in the folder ``path`` (its mount namespace)."""
    return in_namespace_of(pid, "ls", "-A", str(path)).split()


def seen_by_node(temp: str, path: Path) -> list[str]:
    """What the node with this temp dir sees in the folder ``path`` (its mount namespace)."""
    return seen_by(raylet_pid(temp), path)


@contextlib.contextmanager
def nodes(cpus: int = 2, second_gpus: int = 0) -> Iterator[tuple[str, list[str]]]:
    """The head's address; ``second_gpus``: logical GPUs on the second node only. Each
    node's metrics agent gets Serve's figures every second (RAY_metrics_report_interval_ms,
    as docs/metrics.md tells operators). Drivers that join it need RAY_AUTH_MODE=disabled."""
    temps = [tempfile.mkdtemp(prefix=f"cp-ray{i}-", dir="/tmp") for i in (1, 2)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_metrics_report_interval_ms": "1000"}
    port = free_port()
    try:
        start_head(port, temps[0], cpus)
        _ray(
            f"--address=127.0.0.1:{port}",
            "--node-ip-address=127.0.0.2",
            f"--num-cpus={cpus}",
            f"--num-gpus={second_gpus}",
            f"--temp-dir={temps[1]}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
            env=env,
        )
        yield f"127.0.0.1:{port}", temps
    finally:
        for temp in temps:
            subprocess.run(["pkill", "-9", "-f", temp], check=False)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def sharing_no_disk(hide: Path, temp: str, temp_size: str = "256m") -> list[str]:
    """The command prefix that runs a process as on a machine of its own: in a mount
    namespace of its own (`unshare --mount`, as root) where ``hide`` (the data dirs'
    parent) is an empty tmpfs and ``temp`` (its TMPDIR: caches, Ray's files) a tmpfs of
    ``temp_size`` nobody outside sees."""
    script = (
        f'set -e; mount -t tmpfs -o size={temp_size},mode=0700 tmpfs "$1"; '
        'mount -t tmpfs -o size=16m,mode=0700 tmpfs "$2"; '
        'export TMPDIR="$1"; shift 2; exec "$@"'
    )
    return [
        "unshare",
        "--mount",
        "--propagation=private",
        "sh",
        "-c",
        script,
        "own",
        temp,
        str(hide),
    ]


def start_hidden_node(
    address: str, hide: Path, cpus: int = 0, gpus: int = 1, temp_size: str = "256m"
) -> str:
    """A second node that shares no disk with this machine's processes: `ray start
    --address` under ``sharing_no_disk`` (``hide``: the data dirs' parent; its temp dir
    also holds its artifact cache). Node address 127.0.0.2; the only one with ``gpus``
    (logical) GPUs. Its temp dir's name: stop it with kill_all."""
    temp = tempfile.mkdtemp(prefix="cp-hidden-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_metrics_report_interval_ms": "1000"}
    subprocess.run(
        [
            *sharing_no_disk(hide, temp, temp_size),
            RAY,
            "start",
            f"--address={address}",
            "--node-ip-address=127.0.0.2",
            f"--num-cpus={cpus}",
            f"--num-gpus={gpus}",
            f"--temp-dir={temp}/ray",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    return temp
