"""The artifact collector on a real folder: what it keeps, what it removes, and how."""

from __future__ import annotations

import os
import time
from pathlib import Path

from workers import build_cache
from workers.artifact_gc import collect, digest_of
from workers.backend import ResolvedPackage

HOUR = 3600.0


def artifact(root: Path, n: int, age_s: float) -> str:
    digest = f"{n:064x}"
    folder = root / digest
    (folder / ".cp_site" / "pkg").mkdir(parents=True)
    (folder / "model.py").write_text("x = 1\n" * 100)
    (folder / ".cp_site" / "pkg" / "ro.py").write_text("y = 2\n")
    (folder / ".cp_site" / "pkg" / "ro.py").chmod(0o444)
    old = time.time() - age_s
    os.utime(folder, (old, old))
    return digest


def test_keeps_what_is_named_or_recent_and_removes_the_rest(tmp_path: Path) -> None:
    kept_old = artifact(tmp_path, 1, 2 * HOUR)
    unused_old = artifact(tmp_path, 2, 2 * HOUR)
    unused_recent = artifact(tmp_path, 3, 60)
    (tmp_path / "not-an-artifact").mkdir()
    entry = build_cache.CacheEntry(unused_old, "rt", (ResolvedPackage("six", "1"),), 1, "b/1")
    build_cache.remember(tmp_path, "k1", entry)
    build_cache.remember(tmp_path, "k2", build_cache.CacheEntry(kept_old, "rt", (), 1, "b/2"))

    done = collect(tmp_path, {kept_old}, min_age_s=HOUR, staging_max_age_s=HOUR)
    assert done.removed == [unused_old]
    assert done.kept == 2 and done.freed_bytes > 600
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([".cache", kept_old, unused_recent, "not-an-artifact"])
    assert done.cache_entries == 1, "the entry naming the removed artifact is gone"
    assert build_cache.lookup(tmp_path, "k1") is None
    assert build_cache.lookup(tmp_path, "k2") is not None


def test_a_cache_hit_makes_an_artifact_recent(tmp_path: Path) -> None:
    digest = artifact(tmp_path, 4, 2 * HOUR)
    build_cache.remember(tmp_path, "k", build_cache.CacheEntry(digest, "rt", (), 1, "b/1"))
    assert build_cache.lookup(tmp_path, "k") is not None  # touches it
    assert collect(tmp_path, set(), min_age_s=HOUR, staging_max_age_s=HOUR).removed == []


def test_stale_staging_folders_and_leftover_trash_go(tmp_path: Path) -> None:
    staging = tmp_path / ".staging"
    for name, age in (("build-old", 3 * HOUR), ("build-now", 10)):
        (staging / name).mkdir(parents=True)
        (staging / name / "f").write_text("partial")
        old = time.time() - age
        os.utime(staging / name, (old, old))
    (tmp_path / ".trash" / "x").mkdir(parents=True)
    done = collect(tmp_path, set(), min_age_s=HOUR, staging_max_age_s=2 * HOUR)
    assert done.stale_staging == 1
    assert [p.name for p in staging.iterdir()] == ["build-now"]
    assert not (tmp_path / ".trash").exists()


def test_digest_of() -> None:
    assert digest_of(f"/data/artifacts/{'a' * 64}") == "a" * 64
    assert digest_of("") == digest_of("/data/artifacts/.staging/build-1") == ""
