"""A build on a node that does not share the control plane's disk.

The Ray backend hands the build task its source as bytes (through Ray's object store,
not a path) and the task, on a node where the spec's folders do not exist, builds into a
scratch folder of its own with ``builder.run_build``, exactly as it would in the data
dir, then returns the artifact's archive (``artifact_archive``), its build-cache entries
and its log with the outcome. Back in the driver, ``keep`` stores them where a build on
a shared disk would have left them: the artifact folder under its digest, its archive
beside it (replicas on other nodes fetch that), the cache entry, the log lines appended
to the build's log. On a node that sees the folders the task is ``run_build`` itself.

No ray here: the backend runs ``build_anywhere`` as its task.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from workers import artifact_archive, build_cache
from workers.backend import BuildOutcome, BuildSpec
from workers.builder import STAGING_DIR, disk_full, run_build


@dataclass(frozen=True)
class BuildResult:
    outcome: BuildOutcome
    # Set only when it ran away from the control plane's disk: what ``keep`` stores.
    archive: bytes = b""
    archive_sha256: str = ""
    cache_entries: dict[str, build_cache.CacheEntry] = field(default_factory=dict)  # by key
    log: str = ""


def sees(spec: BuildSpec) -> bool:
    """Whether this node sees the control plane's folders (one machine, a shared disk)."""
    return spec.artifacts_dir.is_dir() and spec.source_zip.is_file()


def build_anywhere(spec: BuildSpec, source: bytes) -> BuildResult:
    """The build task: in the data dir where this node sees it, else in a scratch folder
    of its own whose artifact, cache entries and log go back with the result."""
    if sees(spec):
        return BuildResult(run_build(spec))
    scratch = Path(tempfile.mkdtemp(prefix="modelctl-build-"))
    try:
        zip_path = scratch / "source.zip"
        zip_path.write_bytes(source)
        here = replace(
            spec,
            source_zip=zip_path,
            artifacts_dir=scratch / "artifacts",
            log_path=scratch / "build.log",
        )
        (scratch / "artifacts").mkdir()
        outcome = run_build(here)
        log = here.log_path.read_text(errors="replace") if here.log_path.exists() else ""
        if not outcome.ok:
            return BuildResult(outcome, log=log)
        digest = Path(outcome.artifact_path).name
        sha = artifact_archive.pack(here.artifacts_dir, digest)
        tar, _ = artifact_archive.archive_paths(here.artifacts_dir, digest)
        cache = here.artifacts_dir / build_cache.CACHE_DIR
        found = {
            p.stem: build_cache.lookup(here.artifacts_dir, p.stem) for p in cache.glob("*.json")
        }
        entries = {key: entry for key, entry in found.items() if entry is not None}
        return BuildResult(outcome, tar.read_bytes(), sha, entries, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def keep(spec: BuildSpec, result: BuildResult) -> BuildOutcome:
    """In the driver: what a build away from the disk returned, stored where one on it
    would be; the outcome names the artifact's folder here."""
    if result.log:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_path.open("a", encoding="utf-8") as f:
            f.write(result.log)
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
