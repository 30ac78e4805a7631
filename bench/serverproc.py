"""A `modelctl serve` of the benchmarks' own: a separate process, fake backend, SQLite."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

MODELCTL = str(Path(sys.executable).with_name("modelctl"))


def start_server(
    data: Path, http_port: int = 0, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen[str], str]:
    """Starts the server on free ports under ``data``; returns it and its gRPC address."""
    proc = subprocess.Popen(
        [
            MODELCTL,
            "serve",
            "--grpc-port=0",
            f"--http-port={http_port}",
            f"--data-dir={data}",
            "--backend=fake",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("ready grpc="):
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split()[1].removeprefix("grpc=")
