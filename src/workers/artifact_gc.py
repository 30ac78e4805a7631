"""Garbage collection of build artifacts on the shared disk.

An artifact (``<artifacts_dir>/<hex>/``) is removed only when the control plane
does not name it as kept (a deployment uses it, or it is among a model's last
builds) *and* nothing used it for ``min_age_s`` (its folder's mtime, which the
cache touches on every hit): a build that is about to record a cached artifact
is never left pointing at nothing. Removal renames the folder away first, so a
reader never sees half an artifact. Staging folders of builds that died without
cleaning up go too, once older than ``staging_max_age_s``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from workers import artifact_archive, build_cache
from workers.builder import STAGING_DIR, tree_size

_DIGEST = re.compile(r"[0-9a-f]{64}")
TRASH_DIR = ".trash"


@dataclass
class Collected:
    removed: list[str] = field(default_factory=list)  # digests
    freed_bytes: int = 0
    kept: int = 0
    stale_staging: int = 0
    cache_entries: int = 0
    shared_removed: int = 0  # archives removed from the control plane's shared store
    sources_removed: int = 0  # uploads no kept build uses (on disk, and shared)


def digest_of(artifact_path: str) -> str:
    """The digest an artifact path names, or "" (e.g. a build that never finished)."""
    name = Path(artifact_path).name if artifact_path else ""
    return name if _DIGEST.fullmatch(name) else ""


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def _collect_archives(artifacts_dir: Path, kept: set[str], min_age_s: float, now: float) -> int:
    """Archives (``artifact_archive``: what nodes fetch) of artifacts not kept, whether or
    not their folder is here (a server may hold only the archive it served); bytes freed."""
    freed = 0
    folder = artifacts_dir / artifact_archive.ARCHIVES_DIR
    for tar in sorted(folder.glob("*.tar")) if folder.is_dir() else ():
        digest = tar.stem
        if not _DIGEST.fullmatch(digest) or digest in kept or _age(tar, now) < min_age_s:
            continue
        tar_path, sha_path = artifact_archive.archive_paths(artifacts_dir, digest)
        for path in (sha_path, tar_path):  # the sidecar first: no sidecar, no archive
            with contextlib.suppress(FileNotFoundError):
                freed += path.stat().st_size
                path.unlink()
    return freed


def _remove(path: Path, trash: Path) -> int:
    """Renames ``path`` into the trash (atomic), then deletes it; returns the bytes freed."""
    size = tree_size(path)
    trash.mkdir(exist_ok=True)
    doomed = trash / f"{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    return size


def collect(
    artifacts_dir: Path,
    keep: Iterable[str],
    min_age_s: float,
    staging_max_age_s: float,
    now: float | None = None,
) -> Collected:
    now = time.time() if now is None else now
    kept = set(keep)
    out = Collected()
    trash = artifacts_dir / TRASH_DIR
    if not artifacts_dir.is_dir():
        return out
    for entry in sorted(artifacts_dir.iterdir()):
        if not (entry.is_dir() and _DIGEST.fullmatch(entry.name)):
            continue
        if entry.name in kept or _age(entry, now) < min_age_s:
            out.kept += 1
            continue
        out.freed_bytes += _remove(entry, trash)
        out.removed.append(entry.name)
    out.freed_bytes += _collect_archives(artifacts_dir, kept, min_age_s, now)
    staging = artifacts_dir / STAGING_DIR
    for entry in sorted(staging.iterdir()) if staging.is_dir() else ():
        if _age(entry, now) >= staging_max_age_s:
            out.freed_bytes += _remove(entry, trash)
            out.stale_staging += 1
    if trash.is_dir():  # what an earlier, interrupted collection left
        shutil.rmtree(trash, ignore_errors=True)
    out.cache_entries = build_cache.forget_missing(artifacts_dir)
    return out
