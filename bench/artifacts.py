"""A big build reaching a node that never saw it, beside copying the same bytes once.

Makes an artifact folder of --mib MiB (generated: a model.py and random weights files,
nothing downloaded) in a temp data dir, serves it with the control plane's own artifact
endpoint (``controlplane.artifact_endpoint``, HTTP on 127.0.0.1) and measures, each in a
fresh node cache:

- **first fetch**: what a replica on a new node does before it loads the model
  (``workers.artifact_archive.local_copy``: GET by digest with its token, SHA-256 checked
  while streaming, unpacked into the node's cache), with the archive already made (the
  apply makes it; its own time is reported too, once);
- **anchor**: the same bytes copied once (``shutil.copytree`` of the folder to another
  folder on the same disk), what a shared disk or `rsync` would at best cost;
- **again**: a second replica of the build on that node (the cache answers);
- **through the database** (``--artifact-store database``: servers that share no disk):
  the building server putting the archive into the database (``storage.blobs``, SQLite
  in the temp dir, or ``--database-url``), and another server's first use of the build
  (``controlplane.files.Files.artifact``: the archive read back in chunks, its SHA-256
  checked, unpacked into its data dir), again beside one copy.

The ratio first fetch / copy is the price of sharing no disk. Writes
bench/results/artifacts.json.

    .venv/bin/python bench/artifacts.py [--mib 1024] [--rounds 3] [--smoke]
        [--database-url postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from serverproc import Row, save_result

from controlplane.artifact_endpoint import ArtifactEndpoint, artifact_key
from controlplane.files import Files
from controlplane.storage.blobs import BlobStore
from controlplane.storage.db import Database
from workers import artifact_archive

DIGEST = "b1" * 32
FILE_MIB = 64


def make_artifact(artifacts: Path, mib: int) -> Path:
    folder = artifacts / DIGEST
    (folder / "weights").mkdir(parents=True)
    (folder / "model.py").write_text("def predict(body):\n    return body\n")
    left = mib
    n = 0
    while left > 0:
        size = min(FILE_MIB, left)
        (folder / "weights" / f"part-{n:03d}.bin").write_bytes(os.urandom(size * 1024 * 1024))
        left -= size
        n += 1
    return folder


def through_database(root: Path, artifacts: Path, db_url: str, rounds: int) -> dict[str, Any]:
    """The archive into the database once, then each round a fresh server's first use."""
    db = Database(db_url or Database.sqlite_url(root))
    db.migrate()
    try:
        store = BlobStore(db.engine)
        store.delete(f"artifact/{DIGEST}")  # a database kept from an earlier run
        started = time.perf_counter()
        Files(artifacts, root / "logs", store).share(DIGEST)
        put_s = time.perf_counter() - started
        first: list[float] = []
        for i in range(rounds):
            other = Files(root / f"server-{i}" / "artifacts", root / "logs", store)
            started = time.perf_counter()
            folder = other.artifact(DIGEST)
            first.append(time.perf_counter() - started)
            if folder is None or not (folder / "weights" / "part-000.bin").is_file():
                raise SystemExit("the artifact from the database is incomplete")
            shutil.rmtree(root / f"server-{i}")
        store.delete(f"artifact/{DIGEST}")
    finally:
        db.close()
    return {
        "database": "postgresql" if db_url.startswith("postgresql") else "sqlite",
        "db_put_s": put_s,
        "db_first_use_s": statistics.median(first),
        "db_first_use_all_s": first,
    }


def measure(mib: int, rounds: int, db_url: str = "") -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-artifacts-"))
    try:
        artifacts = root / "data" / "artifacts"
        folder = make_artifact(artifacts, mib)
        started = time.perf_counter()
        sha = artifact_archive.pack(artifacts, DIGEST)
        pack_s = time.perf_counter() - started
        key = artifact_key(root / "data")
        endpoint = ArtifactEndpoint(Files(artifacts, root, None).archive, key, "127.0.0.1", 0)
        endpoint.start()
        remote = artifact_archive.Remote(
            DIGEST,
            sha,
            f"{endpoint.url}/artifacts/{DIGEST}.tar",
            artifact_archive.token(key, DIGEST),
        )
        fetch, copy, again = [], [], []
        try:
            for i in range(rounds):
                cache = root / f"node-{i}"
                started = time.perf_counter()
                here = artifact_archive.local_copy(
                    str(root / "elsewhere" / DIGEST), DIGEST, lambda: [remote], cache
                )
                fetch.append(time.perf_counter() - started)
                started = time.perf_counter()
                artifact_archive.local_copy(
                    str(root / "elsewhere" / DIGEST), DIGEST, lambda: [remote], cache
                )
                again.append(time.perf_counter() - started)
                if not (Path(here) / "weights" / "part-000.bin").is_file():
                    raise SystemExit("the fetched artifact is incomplete")
                shutil.rmtree(cache)
                started = time.perf_counter()
                shutil.copytree(folder, root / f"copy-{i}")
                copy.append(time.perf_counter() - started)
                shutil.rmtree(root / f"copy-{i}")
        finally:
            endpoint.stop()
        db = through_database(root, artifacts, db_url, rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "mib": mib,
        "rounds": rounds,
        "pack_s": pack_s,
        "first_fetch_s": statistics.median(fetch),
        "copy_s": statistics.median(copy),
        "again_s": statistics.median(again),
        "fetch_all_s": fetch,
        "copy_all_s": copy,
        **db,
    }


def summary(r: dict[str, Any]) -> list[Row]:
    return [
        Row(
            f"{r['mib']} MiB build on a new node: first fetch s (anchor: one copy), median "
            f"of {r['rounds']}",
            r["first_fetch_s"],
            r["copy_s"],
        ),
        Row(f"{r['mib']} MiB: the archive made once (at the first apply) s", r["pack_s"]),
        Row(f"{r['mib']} MiB: a second replica on that node s (cache)", r["again_s"]),
        Row(
            f"{r['mib']} MiB build on another server ({r['database']}): first use s (anchor: "
            "one copy)",
            r["db_first_use_s"],
            r["copy_s"],
        ),
        Row(f"{r['mib']} MiB: put into {r['database']} once, after the build s", r["db_put_s"]),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="32 MiB, one round")
    p.add_argument("--database-url", default="", help="default: SQLite in the temp dir")
    args = p.parse_args()
    mib, rounds = (32, 1) if args.smoke else (args.mib, args.rounds)
    result = measure(mib, rounds, args.database_url)
    for row in summary(result):
        anchor = f"  anchor {row.anchor:.2f} s  ratio {row.ratio:.2f}" if row.anchor else ""
        print(f"{row.figure}: {row.ours:.3f} s{anchor}")
    save_result("artifacts", {**result, "smoke": args.smoke})


if __name__ == "__main__":
    main()
