"""Uploaded sources: streamed to disk, hashed, checked, stored content-addressed (and, for
servers that share no disk, put where the others fetch them: ``Shared``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from controlplane.domain.errors import FailedPrecondition, InvalidArgument, invalid_field
from workers.archive import UnsafeArchive, inspect_zip


class Shared(Protocol):
    """Where every server of the database finds an upload (``files.Files``)."""

    def put_source(self, sha256: str, path: Path) -> None: ...

    def get_source(self, sha256: str, path: Path) -> bool: ...

    def collect_sources(self, keep: set[str], min_age_s: float) -> int: ...


class SourceStore:
    def __init__(
        self,
        root: Path,
        max_bytes: int,
        max_entries: int,
        max_unpacked: int,
        shared: Shared | None = None,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.max_unpacked = max_unpacked
        self.shared = shared
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def local(self, sha256: str) -> Path:
        """Where the upload is (or goes) on this server's disk."""
        return self.root / f"{sha256}.zip"

    def collect(self, keep: set[str], min_age_s: float) -> int:
        """Removes the uploads not in ``keep`` older than ``min_age_s`` from this disk and
        the shared store; how many went (from either)."""
        cutoff = time.time() - min_age_s
        gone: set[str] = set()
        for path in self.root.glob("*.zip"):
            try:
                if path.stem not in keep and path.stat().st_mtime < cutoff:
                    path.unlink()
                    gone.add(path.stem)
            except FileNotFoundError:
                continue
        shared = self.shared.collect_sources(keep, min_age_s) if self.shared is not None else 0
        return max(len(gone), shared)

    def path(self, sha256: str) -> Path:
        """Where the upload is on this disk, fetched first when another server took it."""
        path = self.local(sha256)
        if not path.is_file() and self.shared is not None:
            self.shared.get_source(sha256, path)
        return path

    async def receive(self, chunks: AsyncIterator[bytes]) -> tuple[str, int, list[str]]:
        """Streams chunks to a temp file; returns (sha256, size, files) once checked and stored."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp", suffix=".zip")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise InvalidArgument(
                            message=f"source is larger than the limit of {self.max_bytes} bytes",
                            reason="SOURCE_TOO_LARGE",
                            metadata={"limit_bytes": str(self.max_bytes)},
                        )
                    digest.update(chunk)
                    out.write(chunk)
            if size == 0:
                raise invalid_field("chunk", "the upload is empty", reason="EMPTY_SOURCE")
            sha = digest.hexdigest()
            files = await asyncio.to_thread(self._store, tmp, sha)
            return sha, size, files
        finally:
            await asyncio.to_thread(tmp.unlink, True)

    def _store(self, tmp: Path, sha: str) -> list[str]:
        files = self.check(tmp)
        path = self.local(sha)
        os.replace(tmp, path)  # same content, same name: atomic and idempotent
        if self.shared is not None:  # before the upload is answered: any server builds it
            self.shared.put_source(sha, path)
        return files

    def check(self, path: Path) -> list[str]:
        try:
            return inspect_zip(path, self.max_entries, self.max_unpacked)
        except UnsafeArchive as e:
            raise InvalidArgument(
                message=f"rejected source archive: {e}", reason="UNSAFE_ARCHIVE"
            ) from None

    def files(self, sha256: str) -> list[str]:
        path = self.path(sha256)
        if not path.is_file():
            raise FailedPrecondition(
                message=f"the upload {sha256} was removed as unused (garbage collection: no "
                "kept or unfinished build was made from it); upload it again",
                reason="SOURCE_COLLECTED",
                metadata={"source_sha256": sha256},
            )
        return self.check(path)
