"""A 1 GiB build, built and deployed through Ray on a node that shares no disk with the
server, beside copying the same bytes once.

The cluster: a head with no CPU and no GPU, and a second node (127.0.0.2) started in a
mount namespace of its own (`unshare --mount`, as root) where the server's data dir is an
empty tmpfs: it is the only node with CPUs (every build runs there) and the only one with
GPUs (every replica runs there). One `modelctl serve` (Ray backend, --artifact-port)
on this machine's disk. Measured, each through gRPC as a user does it:

- **build**: a source whose weights are --mib MiB of random bytes (generated here, stored
  uncompressed in the zip: nothing downloaded) uploaded, then built on the other node: the
  source goes there through Ray's object store, the artifact's archive comes back the same
  way, and the server stores it (``workers.remote_build``);
- **deploy**: that build deployed (one replica, one GPU) on the node that never saw it:
  its replica fetches the archive from the server by digest, checks its SHA-256, unpacks
  it into the node's cache and imports the model; from CreateDeployment to the operation
  done (the replica answers);
- beside **a small model's deploy** on the same node (what a deploy costs without the
  bytes) and the anchor: **the artifact copied once** (``shutil.copytree`` on this disk).

Writes bench/results/big_build.json. Needs root (the mount namespace); says it was
skipped otherwise (``--smoke``: 32 MiB).

    .venv/bin/python bench/big_build.py [--mib 1024] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from serverproc import MODELCTL, ROOT, Row, save_result, start_process

from controlplane.api.client import Client
from controlplane.domain.types import Resources

sys.path.insert(0, str(ROOT))
from tests.helpers import ray_nodes
from tests.helpers.servers import free_port

MODEL = (
    "from pathlib import Path\n\n"
    "SIZE = sum(p.stat().st_size for p in (Path(__file__).parent / 'weights').iterdir())\n\n"
    "def predict(body):\n    return {'weights_bytes': SIZE}\n"
)
SMALL = "def predict(body):\n    return {'small': True}\n"
PART_MIB = 64
ONE_GPU = Resources(replicas=1, cpus=0, gpus=1)


def source(mib: int) -> bytes:
    """A zip: model.py and ``mib`` MiB of random weights, stored (random bytes do not
    compress; the upload, the artifact and its archive are all ``mib`` MiB)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("model.py", MODEL)
        left, n = mib, 0
        while left > 0:
            size = min(PART_MIB, left)
            z.writestr(f"weights/part-{n:03d}.bin", os.urandom(size * 1024 * 1024))
            left -= size
            n += 1
    return buf.getvalue()


def small_source() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.py", SMALL)
    return buf.getvalue()


async def build_and_deploy(c: Client, model: str, data: bytes) -> tuple[float, float, str]:
    """(build s, deploy s, artifact folder): upload and build, then deploy on the GPU node."""
    started = time.perf_counter()
    src = await c.upload_source(model, data)
    op = await c.create_build(model, src.sha256, "model.py", "predict")
    done = await c.wait(op.name, 1800)
    if done.error is not None:
        raise SystemExit(f"the build failed: {done.error}")
    build_s = time.perf_counter() - started
    build = await c.get_build(done.target)
    started = time.perf_counter()
    op = await c.create_deployment(model, build.name, ONE_GPU)
    done = await c.wait(op.name, 1800)
    if done.error is not None:
        raise SystemExit(f"the deploy failed: {done.error}")
    return build_s, time.perf_counter() - started, build.image.removeprefix("artifact://sha256:")


async def run(address: str, artifacts: Path, mib: int) -> dict[str, Any]:
    async with Client(address) as c:
        small = await c.create_model("projects/bench", "small")
        big = await c.create_model("projects/bench", "big")
        small_build_s, small_deploy_s, _ = await build_and_deploy(c, small.name, small_source())
        data = source(mib)
        big_build_s, big_deploy_s, digest = await build_and_deploy(c, big.name, data)
        del data
    folder = artifacts / digest
    copy = folder.parent / ".copy-once"
    started = time.perf_counter()
    shutil.copytree(folder, copy)
    copy_s = time.perf_counter() - started
    shutil.rmtree(copy)
    return {
        "mib": mib,
        "small_build_s": small_build_s,
        "small_deploy_s": small_deploy_s,
        "big_build_s": big_build_s,
        "big_deploy_s": big_deploy_s,
        "copy_once_s": copy_s,
        "deploy_extra_s": big_deploy_s - small_deploy_s,
    }


def measure(mib: int) -> dict[str, Any]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    root = Path(tempfile.mkdtemp(prefix="cpbig", dir="/tmp"))  # short: Ray's sockets
    hide = root / "cp"
    data_dir = hide / "d"
    data_dir.mkdir(parents=True)
    head = str(root / "head")
    port = free_port()
    room = f"{max(1, 4 * mib // 1024 + 1)}g"  # scratch: zip, folder, archive; node cache
    server = None
    hidden = ""
    try:
        ray_nodes.start_head(port, head, cpus=0)
        hidden = ray_nodes.start_hidden_node(
            f"127.0.0.1:{port}", hide, cpus=2, gpus=2, temp_size=room
        )
        server, address = start_process(
            [
                MODELCTL,
                "serve",
                "--insecure-no-auth",
                "--backend=ray",
                f"--ray-address=127.0.0.1:{port}",
                "--console-port=0",
                "--grpc-port=0",
                f"--http-port={free_port()}",
                "--artifact-port=0",
                f"--data-dir={data_dir}",
                f"--max-source-mib={mib + 16}",
                f"--max-unpacked-mib={mib + 16}",
                "--build-timeout=1800",
                "--deploy-timeout=1800",
            ]
        )
        return asyncio.run(run(address, data_dir / "artifacts", mib))
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
        if hidden:
            ray_nodes.kill_all(hidden)
            shutil.rmtree(hidden, ignore_errors=True)
        ray_nodes.kill_all(head)
        shutil.rmtree(root, ignore_errors=True)


def summary(r: dict[str, Any]) -> list[Row]:
    if r.get("skipped"):
        return []
    return [
        Row(f"{r['mib']} MiB build on a node without the disk, through Ray s", r["big_build_s"]),
        Row(
            f"{r['mib']} MiB build deployed on a node that never saw it s (anchor: a small "
            "model's deploy there plus copying the bytes once)",
            r["big_deploy_s"],
            r["small_deploy_s"] + r["copy_once_s"],
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--smoke", action="store_true", help="32 MiB")
    args = p.parse_args()
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        why = "needs root and unshare (a node in a mount namespace of its own)"
        print(f"big_build: skipped: {why}")
        save_result("big_build", {"skipped": why})
        return
    mib = 32 if args.smoke else args.mib
    result = {"smoke": args.smoke, **measure(mib)}
    save_result("big_build", result)
    for key, value in result.items():
        print(f"{key:>16}: {value:.2f}" if isinstance(value, float) else f"{key:>16}: {value}")


if __name__ == "__main__":
    main()
