"""A build on a node that does not share the control plane's disk.

The Ray backend hands the build task its source as bytes (through Ray's object store,
not a path) and the task, on a node where the spec's folders do not exist, builds into a
scratch folder of its own with ``builder.run_build``, exactly as it would in the data
dir. The task is a generator (Ray streams what it yields): while the build runs it yields
the log's new bytes every ``POLL_S``, which the driver appends to the build's log at
once (``append_log``), so a reader follows a build on any node live; last it yields the
outcome with the artifact's archive (``artifact_archive``) and build-cache entries. Back
in the driver, ``keep`` stores them where a build on a shared disk would have left them:
the artifact folder under its digest, its archive beside it (replicas on other nodes
fetch that), the cache entry. On a node that sees the folders the task is ``run_build``
itself, which writes the log there.

No ray here: the backend runs ``build_streamed`` as its task.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from pathlib import Path

from workers import artifact_archive, build_cache
from workers.backend import BuildOutcome, BuildSpec
from workers.builder import STAGING_DIR, disk_full, run_build

POLL_S = 0.25  # how often a build away from the disk sends its new log bytes
CHUNK = 1024 * 1024  # at most this much log per message


@dataclass(frozen=True)
class BuildResult:
    outcome: BuildOutcome
    # Set only when it ran away from the control plane's disk: what ``keep`` stores.
    archive: bytes = b""
    archive_sha256: str = ""
    cache_entries: dict[str, build_cache.CacheEntry] = field(default_factory=dict)  # by key


def sees(spec: BuildSpec) -> bool:
    """Whether this node sees the control plane's folders (one machine, a shared disk)."""
    return spec.artifacts_dir.is_dir() and spec.source_zip.is_file()


def build_streamed(spec: BuildSpec, source: bytes) -> Generator[bytes | BuildResult, None, None]:
    """The build task: in the data dir where this node sees it (the log is written there),
    else in a scratch folder of its own, yielding the log's new bytes as the build writes
    them; the ``BuildResult`` comes last. Closing the generator (Ray cancels the task)
    stops the build cleanly."""
    if sees(spec):
        yield BuildResult(run_build(spec))
        return
    scratch = Path(tempfile.mkdtemp(prefix="modelctl-build-"))
    cancel = threading.Event()
    done: list[BuildResult] = []
    here = replace(
        spec,
        source_zip=scratch / "source.zip",
        artifacts_dir=scratch / "artifacts",
        log_path=scratch / "build.log",
    )
    worker = threading.Thread(
        target=lambda: done.append(_build_here(here, source, cancel)),
        name=f"build {spec.build_name}",
        daemon=True,
    )
    try:
        worker.start()
        sent = 0
        while True:
            finished = not worker.is_alive()  # before the read: its last lines are in
            data = _read_from(here.log_path, sent)
            if data:
                sent += len(data)
                yield data
                continue
            if finished:
                break
            worker.join(POLL_S)
    except BaseException:  # interrupted (Ray cancels) or closed: the build stops too
        cancel.set()
        worker.join()
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not done:  # the thread died with a bug, never the model's
        yield BuildResult(BuildOutcome(ok=False, error="internal build error: the build died"))
        return
    yield done[0]


def _build_here(here: BuildSpec, source: bytes, cancel: threading.Event) -> BuildResult:
    """The build in the scratch folder ``here`` names; its archive and cache entries."""
    here.artifacts_dir.mkdir(parents=True)
    here.source_zip.write_bytes(source)
    outcome = run_build(here, cancel)
    if not outcome.ok:
        return BuildResult(outcome)
    digest = Path(outcome.artifact_path).name
    sha = artifact_archive.pack(here.artifacts_dir, digest)
    tar, _ = artifact_archive.archive_paths(here.artifacts_dir, digest)
    cache = here.artifacts_dir / build_cache.CACHE_DIR
    found = {p.stem: build_cache.lookup(here.artifacts_dir, p.stem) for p in cache.glob("*.json")}
    entries = {key: entry for key, entry in found.items() if entry is not None}
    return BuildResult(outcome, tar.read_bytes(), sha, entries)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(CHUNK)
    except FileNotFoundError:
        return b""


def append_log(spec: BuildSpec, data: bytes) -> None:
    """In the driver: log bytes a build away from the disk sent, added to its log here."""
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    with spec.log_path.open("ab") as f:
        f.write(data)


def keep(spec: BuildSpec, result: BuildResult) -> BuildOutcome:
    """In the driver: what a build away from the disk returned, stored where one on it
    would be; the outcome names the artifact's folder here."""
    outcome = result.outcome
    if not result.archive:
        return outcome
    digest = Path(outcome.artifact_path).name
    final = spec.artifacts_dir / digest
    tar_path, sha_path = artifact_archive.archive_paths(spec.artifacts_dir, digest)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{digest}-", dir=tar_path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(result.archive)
        if artifact_archive.sha256_file(Path(tmp)) != result.archive_sha256:
            return replace(outcome, ok=False, error="the build's artifact arrived damaged")
        if not final.is_dir():
            artifact_archive.unpack(Path(tmp), final, _staging(spec.artifacts_dir))
        os.chmod(tmp, 0o644)
        os.replace(tmp, tar_path)
        sha_path.write_text(result.archive_sha256 + "\n")
    except OSError as e:
        error = f"cannot store the build's artifact: {e}"
        return replace(outcome, ok=False, error=error, disk_full=disk_full(e))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    for key, entry in result.cache_entries.items():
        build_cache.remember(spec.artifacts_dir, key, entry)
    return replace(outcome, artifact_path=str(final.resolve()))


def _staging(artifacts_dir: Path) -> Path:
    folder = artifacts_dir / STAGING_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder
