"""Files in the database for servers that share no disk (``--artifact-store database``):
the blob store on SQLite and PostgreSQL, and two servers' ``Files`` on two data dirs and
one database: what one built, the other applies, exports and serves to nodes."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import text

from controlplane import files as files_module
from controlplane.artifact_endpoint import ArtifactEndpoint, artifact_key
from controlplane.build_logs import CHUNK, LogSource
from controlplane.files import PART_BYTES, Files, log_key
from controlplane.files import artifact_key as blob_key
from controlplane.storage.blobs import CHUNK_BYTES, BlobDamaged, BlobStore
from controlplane.storage.db import Database
from workers import artifact_archive
from workers.backend import BuildOutcome

DIGEST = "ab" * 32


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def test_a_blob_goes_in_chunks_and_comes_back_whole_or_not_at_all(
    db: Database, tmp_path: Path
) -> None:
    store = BlobStore(db.engine)
    data = random_file(tmp_path / "in.bin", 2 * CHUNK_BYTES + 123)
    info = store.put("artifact/x", tmp_path / "in.bin")
    assert (info.size_bytes, info.chunks) == (len(data), 3)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert store.put("artifact/x", tmp_path / "in.bin") == info, "a second put keeps the first"
    out = tmp_path / "out" / "x.bin"
    assert store.get("artifact/x", out) == info and out.read_bytes() == data
    assert store.get("artifact/none", tmp_path / "none.bin") is None
    assert not (tmp_path / "none.bin").exists()
    assert [b.key for b in store.keys("artifact/")] == ["artifact/x"]
    assert store.keys("artifact_") == [], "a prefix is a prefix, not a pattern"

    # A chunk changed behind the store's back: the read says so and writes nothing.
    with db.engine.begin() as c:
        c.execute(
            text("UPDATE blob_chunks SET data = :d WHERE key = 'artifact/x' AND seq = 1"),
            {"d": b"\0" * CHUNK_BYTES},
        )
    damaged = tmp_path / "damaged.bin"
    with pytest.raises(BlobDamaged, match="SHA-256"):
        store.get("artifact/x", damaged)
    assert not damaged.exists() and list(tmp_path.glob(".damaged*")) == []
    store.delete("artifact/x")
    assert store.info("artifact/x") is None and store.keys("") == []
    with db.engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM blob_chunks")).scalar_one() == 0


def test_a_running_builds_log_reaches_another_servers_reader_part_by_part(
    db: Database, tmp_path: Path
) -> None:
    here = Files(tmp_path / "a" / "artifacts", tmp_path / "a" / "logs", BlobStore(db.engine))
    there = Files(tmp_path / "b" / "artifacts", tmp_path / "b" / "logs", BlobStore(db.engine))
    name = "projects/p/models/m/builds/1"
    log_file = tmp_path / "a" / "logs" / "1.log"
    live = here.live_log(name, log_file)
    assert live is not None
    live.flush()  # the build has not written a line yet
    recorded = "/on/the/other/server/1.log"  # the path A recorded: not on B's disk
    source = LogSource(
        lambda: there.log_here(recorded, "projects/p/models/m", 1),
        functools.partial(there.log_parts, name),
    )
    assert source.read(0) == b""
    log_file.parent.mkdir(parents=True)
    with log_file.open("ab") as f:
        f.write(b"line 1\n")
        f.flush()
        live.flush()
        f.write(b"line 2\nline")
        f.flush()
        live.flush()
    got = source.read(0)
    assert got == b"line 1\nline 2\nline"
    assert source.read(len(got)) == b"", "each part is read once"
    with log_file.open("ab") as f:
        f.write(b" 3\n" + os.urandom(PART_BYTES + 10).hex().encode() + b"\n")
    live.flush()
    got += source.read(len(got))
    assert got == log_file.read_bytes(), "a big write goes in parts of PART_BYTES"
    # The build ends: the whole log goes in, the parts go; the reader switches to the
    # fetched file at the offset it reached (the parts were its prefix).
    here.publish_build(name, BuildOutcome(ok=False, error="x"), log_file)
    assert there.log_parts(name, 0) == []
    fetched = there.build_log(recorded, name, "projects/p/models/m", 1)
    assert fetched.read_bytes() == log_file.read_bytes()
    assert source.read(len(got)) == b""
    assert source.read(0) == log_file.read_bytes()[:CHUNK]


def build_here(files: Files) -> BuildOutcome:
    """An artifact as a build leaves it on the building server's disk, with its log."""
    folder = files.artifacts_dir / DIGEST
    (folder / "pkg").mkdir(parents=True)
    (folder / "model.py").write_text("def predict(body):\n    return body\n")
    (folder / "pkg" / "weights.bin").write_bytes(os.urandom(300_000))
    (folder / "pkg" / "link").symlink_to("weights.bin")
    return BuildOutcome(ok=True, artifact_path=str(folder), image=f"artifact://sha256:{DIGEST}")


def files_of(root: Path, store: BlobStore) -> Files:
    return Files(root / "artifacts", root / "logs", store)


def test_what_one_server_built_another_applies_exports_and_serves(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(db.engine)
    a, b = files_of(tmp_path / "a", store), files_of(tmp_path / "b", store)
    outcome = build_here(a)
    log_a = tmp_path / "a" / "logs" / "builds" / "p_m" / "1.log"
    log_a.parent.mkdir(parents=True)
    log_a.write_text("2026-12-06T10:00:00+00:00 build succeeded\n")
    upload = tmp_path / "a" / "src.zip"
    random_file(upload, 1000)
    a.put_source("cd" * 32, upload)
    a.publish_build("projects/p/models/m/builds/1", outcome, log_a)
    sha_a = artifact_archive.archived_sha256(a.artifacts_dir, DIGEST)
    built = {
        rel: (a.artifacts_dir / DIGEST / rel).read_bytes()
        for rel in ("model.py", "pkg/weights.bin")
    }
    uploaded = upload.read_bytes()
    shutil.rmtree(tmp_path / "a")

    # The building server's disk is gone; the other one has nothing yet.
    recorded = outcome.artifact_path
    assert not (b.artifacts_dir / DIGEST).exists() and b.has_artifact(recorded)
    folder = b.artifact(recorded)
    assert folder == b.artifacts_dir / DIGEST
    assert {rel: (folder / rel).read_bytes() for rel in built} == built
    assert (folder / "pkg" / "link").readlink() == Path("weights.bin")
    assert artifact_archive.archived_sha256(b.artifacts_dir, DIGEST) == sha_a, (
        "every server hands nodes the same archive, so Serve's config is the same whoever applies"
    )
    log_b = b.build_log(str(log_a), "projects/p/models/m/builds/1", "projects/p/models/m", 1)
    assert log_b.parent.is_relative_to(tmp_path / "b") and "build succeeded" in log_b.read_text()
    assert b.get_source("cd" * 32, tmp_path / "b" / "sources" / "x.zip")
    assert (tmp_path / "b" / "sources" / "x.zip").read_bytes() == uploaded

    # A third server's artifact port serves it to a node without having unpacked it.
    c = files_of(tmp_path / "c", store)
    key = artifact_key(tmp_path / "c")
    endpoint = ArtifactEndpoint(c.archive, key, "127.0.0.1", 0)
    endpoint.start()
    try:
        remote = artifact_archive.Remote(
            DIGEST,
            sha_a,
            f"{endpoint.url}/artifacts/{DIGEST}.tar",
            artifact_archive.token(key, DIGEST),
        )
        dead = artifact_archive.Remote(DIGEST, sha_a, "http://127.0.0.1:9/artifacts/x.tar", "t")
        here = artifact_archive.local_copy("", DIGEST, lambda: [dead, remote], tmp_path / "node")
    finally:
        endpoint.stop()
    assert (Path(here) / "model.py").read_text().startswith("def predict")
    assert not (c.artifacts_dir / DIGEST).exists(), "served from the archive alone"

    # Collected from the store once no build keeps it (and old enough).
    assert a.collect({DIGEST}, 0) == 0 and store.info(blob_key(DIGEST)) is not None
    assert a.collect(set(), 3600) == 0
    assert a.collect(set(), 0) == 1 and store.info(blob_key(DIGEST)) is None
    assert store.info(log_key("projects/p/models/m/builds/1")) is not None, "logs stay"
    # B still has the build on its disk: its next use puts it back (not at once: B took it
    # as stored a moment ago; once that is old, B asks again).
    b.share(DIGEST)
    assert store.info(blob_key(DIGEST)) is None
    monkeypatch.setattr(files_module, "SHARED_RECHECK_S", 0.0)
    b.share(DIGEST)
    assert store.info(blob_key(DIGEST)) is not None
    assert a.collect(set(), 0) == 1
    assert a.collect_sources({"cd" * 32}, 0) == 0, "an upload a kept build uses stays"
    assert a.collect_sources(set(), 0) == 1 and not b.get_source("cd" * 32, tmp_path / "y.zip")
    d = files_of(tmp_path / "d", store)
    assert not d.has_artifact(recorded) and d.artifact(recorded) is None


def test_without_the_database_store_nothing_is_put_there(db: Database, tmp_path: Path) -> None:
    alone = Files(tmp_path / "artifacts", tmp_path / "logs", None)
    outcome = build_here(alone)
    alone.publish_build("projects/p/models/m/builds/1", outcome, tmp_path / "none.log")
    assert alone.artifact(outcome.artifact_path) == alone.artifacts_dir / DIGEST
    assert not alone.shared and BlobStore(db.engine).keys("") == []
    other = Files(tmp_path / "b" / "artifacts", tmp_path / "b" / "logs", None)
    assert not other.has_artifact(outcome.artifact_path)


def test_two_servers_that_built_the_same_digest_end_with_one_archive(
    db: Database, tmp_path: Path
) -> None:
    store = BlobStore(db.engine)
    a, b = files_of(tmp_path / "a", store), files_of(tmp_path / "b", store)
    first = build_here(a)
    second = build_here(b)
    os.utime(b.artifacts_dir / DIGEST / "model.py", (1, 1))  # packed apart: other bytes
    a.publish_build("projects/p/models/m/builds/1", first, tmp_path / "none.log")
    b.publish_build("projects/p/models/n/builds/1", second, tmp_path / "none.log")
    stored = store.info(blob_key(DIGEST))
    assert stored is not None
    assert artifact_archive.archived_sha256(a.artifacts_dir, DIGEST) == stored.sha256
    assert artifact_archive.archived_sha256(b.artifacts_dir, DIGEST) == stored.sha256
    tar, _ = artifact_archive.archive_paths(b.artifacts_dir, DIGEST)
    assert artifact_archive.sha256_file(tar) == stored.sha256, "B serves the stored bytes"
