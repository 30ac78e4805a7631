"""The build cache: the same inputs give the same artifact, found without building.

A build's *inputs* are its source zip (code and requirements), its entry point and
the runtime (Python major.minor and platform). Their hash keys an index entry,
``<artifacts_dir>/.cache/<key>.json``, written once a build of those inputs stored
its artifact. A later build with the same key takes the entry (and the artifact it
names) as its own result: no pip, no import, a fraction of a second.

Requirements that are not pinned resolve the first time and are then reused like the
rest: that is what makes a rebuild reproducible. ``no_cache`` builds again (and, when
the resolution moved, gives a new digest).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workers.backend import ResolvedPackage

CACHE_DIR = ".cache"  # under artifacts_dir
_FORMAT = 1


@dataclass(frozen=True)
class CacheEntry:
    digest: str  # the artifact's hex name under artifacts_dir
    runtime: str
    packages: tuple[ResolvedPackage, ...]
    size_bytes: int
    first_build: str  # the build that made it


def cache_key(source_sha256: str, file_path: str, function_name: str, abi: str) -> str:
    inputs = [_FORMAT, source_sha256, file_path, function_name, abi]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()


def _entry_path(artifacts_dir: Path, key: str) -> Path:
    return artifacts_dir / CACHE_DIR / f"{key}.json"


def remember(artifacts_dir: Path, key: str, entry: CacheEntry) -> None:
    """Writes the entry atomically (a reader sees the old one or the new one, whole)."""
    folder = artifacts_dir / CACHE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(entry), f, sort_keys=True)
    os.replace(tmp, _entry_path(artifacts_dir, key))


def lookup(artifacts_dir: Path, key: str) -> CacheEntry | None:
    """The entry for ``key`` whose artifact is still there, or None (a miss)."""
    try:
        raw: dict[str, Any] = json.loads(_entry_path(artifacts_dir, key).read_text())
        entry = CacheEntry(
            digest=str(raw["digest"]),
            runtime=str(raw["runtime"]),
            packages=tuple(ResolvedPackage(**p) for p in raw["packages"]),
            size_bytes=int(raw["size_bytes"]),
            first_build=str(raw["first_build"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no entry, or one from another format: build
    artifact = artifacts_dir / entry.digest
    if not artifact.is_dir():
        return None  # garbage-collected since
    touch(artifact)
    return entry


def touch(artifact: Path) -> None:
    """Marks the artifact used now: the garbage collector spares recently used ones."""
    with contextlib.suppress(OSError):
        os.utime(artifact)


def forget_missing(artifacts_dir: Path) -> int:
    """Removes the entries whose artifact is gone; returns how many."""
    folder = artifacts_dir / CACHE_DIR
    removed = 0
    for path in folder.glob("*.json") if folder.is_dir() else ():
        try:
            digest = str(json.loads(path.read_text())["digest"])
        except (OSError, ValueError, KeyError, TypeError):
            digest = ""
        if not digest or not (artifacts_dir / digest).is_dir():
            path.unlink(missing_ok=True)
            removed += 1
    return removed
