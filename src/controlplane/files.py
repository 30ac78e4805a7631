"""A server's files on its own disk, found by name, and where every other server finds them.

Each server keeps uploads, artifacts and build logs under its own ``--data-dir``, and
finds a build's artifact by its digest (``<artifacts dir>/<digest>``) and its log by the
build's name, whatever path the server that built it recorded. With the default
``--artifact-store disk`` that is all: one server, or several on one shared volume.

With ``--artifact-store database`` (several servers that share no disk), what one server
makes is also put in the database (``storage.blobs``): the upload when it arrives, the
artifact's archive and the build's log before the build is recorded BUILT or FAILED.
Another server fetches them on first use: the artifact (archive, then folder) before it
applies, exports or serves it to a node; the log when a reader asks for a finished build's.
While a build runs, its log also goes in part by part (``LiveLog``), so a reader on
another server follows it live. A build recorded BUILT therefore always has its artifact
where any server can get it, even after the server that built it is gone.
"""

from __future__ import annotations

import fcntl
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from controlplane.storage.blobs import BlobStore
from workers import artifact_archive
from workers.artifact_gc import digest_of
from workers.backend import BuildOutcome
from workers.builder import STAGING_DIR

log = logging.getLogger(__name__)

LOCKS_DIR = ".locks"  # under the artifacts dir: one fetch of an artifact at a time
PART_BYTES = 1024 * 1024  # at most this much of a running build's log per part
SHARED_RECHECK_S = 300.0  # how long "this archive is in the database" is taken as known


def artifact_key(digest: str) -> str:
    return f"artifact/{digest}"


def source_key(sha256: str) -> str:
    return f"source/{sha256}"


def log_key(build_name: str) -> str:
    return f"log/{build_name}"


def live_log_key(build_name: str) -> str:
    """The parts of a running build's log (``LiveLog``), gone once the whole log is in."""
    return f"log-live/{build_name}"


def log_path(logs_dir: Path, model: str, version: int) -> Path:
    """Where this server keeps (or fetches) the log of build ``version`` of ``model``."""
    return logs_dir / "builds" / model.replace("/", "_") / f"{version}.log"


class Files:
    def __init__(self, artifacts_dir: Path, logs_dir: Path, blobs: BlobStore | None) -> None:
        """``blobs``: the shared store (None: this server's disk is all there is)."""
        self.artifacts_dir = artifacts_dir
        self.logs_dir = logs_dir
        self.blobs = blobs
        # Digests known to be in the shared store, and since when (monotonic): known for
        # SHARED_RECHECK_S, then asked again (another server's GC may have removed one).
        self._shared: dict[str, float] = {}

    @property
    def shared(self) -> bool:
        return self.blobs is not None

    def artifact_dir(self, recorded: str) -> Path:
        """Where the artifact a build recorded (its path on the server that built it, or
        its digest) is on this server's disk."""
        return self.artifacts_dir / Path(recorded).name

    def has_artifact(self, recorded: str) -> bool:
        folder = self.artifact_dir(recorded)
        if folder.is_dir():
            return True
        return self.blobs is not None and self.blobs.info(artifact_key(folder.name)) is not None

    def artifact(self, recorded: str) -> Path | None:
        """The artifact folder on this disk, fetched from the shared store when only it
        has it; None when neither does (collected). One made here before the store was
        the database goes into it now, so that the other servers find it too."""
        folder = self.artifact_dir(recorded)
        if folder.is_dir():
            self.share(folder.name)
            return folder
        tar = self.archive(folder.name)
        if tar is None:
            return None
        with self._one_at_a_time(folder.name):
            if not folder.is_dir():
                log.info("artifact %s: unpacking the copy from the database", folder.name[:12])
                artifact_archive.unpack(tar, folder, self._scratch())
        return folder

    def archive(self, digest: str) -> Path | None:
        """The artifact's archive on this disk, its SHA-256 beside it: made from the folder,
        or fetched from the shared store when only it has it (the building server's bytes,
        so every server hands nodes the same SHA-256); None when there is neither."""
        if not digest_of(digest):
            return None
        tar, sha = artifact_archive.archive_paths(self.artifacts_dir, digest)
        if artifact_archive.archived_sha256(self.artifacts_dir, digest):
            return tar
        if (self.artifacts_dir / digest).is_dir():
            artifact_archive.pack(self.artifacts_dir, digest)
            return tar
        if self.blobs is None:
            return None
        with self._one_at_a_time(digest):
            if not artifact_archive.archived_sha256(self.artifacts_dir, digest):
                got = self.blobs.get(artifact_key(digest), tar)
                if got is None:
                    return None
                artifact_archive.write_sha256(sha, got.sha256)
                log.info(
                    "artifact %s: fetched from the database (%d B)", digest[:12], got.size_bytes
                )
        self._shared[digest] = time.monotonic()
        return tar

    def share(self, digest: str) -> None:
        """The artifact's archive in the shared store (asked once per ``SHARED_RECHECK_S``
        and digest: put again if another server's GC removed it meanwhile). Two
        servers that built the same digest each packed their own archive (other file
        times, so other bytes): the first one stored is kept, and the other server takes
        it in place of its own, so that every server pins the same SHA-256 in Serve's
        config and serves the same bytes."""
        if self.blobs is None:
            return
        known = self._shared.get(digest)
        if known is not None and time.monotonic() - known < SHARED_RECHECK_S:
            return
        tar = self.archive(digest)
        if tar is None:
            return
        stored = self.blobs.put(artifact_key(digest), tar)
        if stored.sha256 != artifact_archive.archived_sha256(self.artifacts_dir, digest):
            with self._one_at_a_time(digest):
                _, sha = artifact_archive.archive_paths(self.artifacts_dir, digest)
                sha.unlink(missing_ok=True)  # no sidecar, no archive: until the stored one is in
                self.blobs.get(artifact_key(digest), tar)
                artifact_archive.write_sha256(sha, stored.sha256)
        self._shared[digest] = time.monotonic()

    def publish_build(self, build_name: str, outcome: BuildOutcome, log_file: Path) -> None:
        """A finished build's archive and log into the shared store (nothing without one)."""
        if self.blobs is None:
            return
        if outcome.ok and outcome.artifact_path:
            self.share(Path(outcome.artifact_path).name)
        if log_file.is_file():
            self.blobs.put(log_key(build_name), log_file)
        self.blobs.delete(live_log_key(build_name))  # readers now fetch the whole log

    def live_log(self, build_name: str, log_file: Path) -> LiveLog | None:
        """What shares a running build's log with readers on other servers (None: there
        are none, this server's disk is all there is)."""
        if self.blobs is None:
            return None
        return LiveLog(self.blobs, live_log_key(build_name), log_file)

    def log_parts(self, build_name: str, start: int) -> list[bytes]:
        """Parts ``start``, ... of the log of a build running on any server."""
        return [] if self.blobs is None else self.blobs.parts(live_log_key(build_name), start)

    def put_source(self, sha256: str, path: Path) -> None:
        if self.blobs is not None:
            self.blobs.put(source_key(sha256), path)

    def get_source(self, sha256: str, path: Path) -> bool:
        return self.blobs is not None and self.blobs.get(source_key(sha256), path) is not None

    def log_here(self, recorded: str, model: str, version: int) -> Path:
        """Where the build's log is on this disk: where it was recorded if this server has
        it (it runs or ran the build), else this server's place for a fetched copy."""
        if recorded and Path(recorded).is_file():
            return Path(recorded)
        return log_path(self.logs_dir, model, version)

    def build_log(self, recorded: str, build_name: str, model: str, version: int) -> Path:
        """The build's log on this disk (``log_here``), fetched there once the build put
        it in the store."""
        here = self.log_here(recorded, model, version)
        if not here.is_file() and self.blobs is not None:
            self.blobs.get(log_key(build_name), here)
        return here

    def collect(self, keep: set[str], min_age_s: float) -> int:
        """Removes archives from the shared store that no kept build uses (older than
        ``min_age_s``: a build may be about to be recorded); how many went."""
        removed = self._collect(artifact_key(""), keep, min_age_s)
        for digest in removed:
            self._shared.pop(digest, None)
        return len(removed)

    def collect_sources(self, keep: set[str], min_age_s: float) -> int:
        """Removes uploads from the shared store that no kept or unfinished build uses."""
        return len(self._collect(source_key(""), keep, min_age_s))

    def _collect(self, prefix: str, keep: set[str], min_age_s: float) -> list[str]:
        if self.blobs is None:
            return []
        cutoff = datetime.now(UTC) - timedelta(seconds=min_age_s)
        removed: list[str] = []
        for blob in self.blobs.keys(prefix):
            created = blob.create_time
            if created.tzinfo is None:  # SQLite gives naive UTC times back
                created = created.replace(tzinfo=UTC)
            name = blob.key.removeprefix(prefix)
            if name not in keep and created < cutoff:
                self.blobs.delete(blob.key)
                removed.append(name)
        return removed

    def _scratch(self) -> Path:
        folder = self.artifacts_dir / STAGING_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _one_at_a_time(self, digest: str) -> _FileLock:
        folder = self.artifacts_dir / LOCKS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return _FileLock(folder / f"{digest}.lock")


class LiveLog:
    """A running build's log put in the shared store as it grows, part by part, so that a
    reader on another server follows it live (``build_logs.LogSource``). ``flush`` sends
    what the file gained since the last one. A build that runs again (its server died)
    starts the parts over."""

    def __init__(self, blobs: BlobStore, key: str, log_file: Path) -> None:
        self._blobs = blobs
        self._key = key
        self._file = log_file
        self._sent = 0
        self._seq = 0
        blobs.delete(key)

    def flush(self) -> None:
        try:
            with self._file.open("rb") as f:
                f.seek(self._sent)
                while data := f.read(PART_BYTES):
                    self._blobs.append(self._key, self._seq, data)
                    self._sent += len(data)
                    self._seq += 1
        except FileNotFoundError:
            return  # not started yet


class _FileLock:
    """An exclusive lock on a file: threads of this server and other processes on this
    data dir fetch an artifact one at a time."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __enter__(self) -> None:
        self._file = self._path.open("w")
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
