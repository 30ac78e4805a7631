"""Files in the database, for control-plane servers that share no disk.

A blob is a file under a key (``source/<sha256>``, ``artifact/<digest>``,
``log/<build name>``): its bytes in ``blob_chunks`` rows of ``CHUNK_BYTES`` each, and one
``blobs`` row (SHA-256, size, chunk count) added in the same transaction as the chunks.
So a blob with a row is whole, and a put that died left nothing behind (its transaction
rolled back). Content is immutable: a second put of a key that exists is a no-op (two
servers putting the same file at once: one commits, the other finds it there).

Reads go one chunk per query and are written to a temporary file beside the target, its
SHA-256 checked before the rename: memory stays at one chunk whatever the size (a 1 GiB
artifact), and a damaged blob never reaches the disk under its name.

Why the database: it is the one thing every server of a control plane already shares and
backs up (``modelctl backup`` copies it whole), a build's row and its artifact are in one
place, and nothing new has to be run. PostgreSQL holds each chunk as TOASTed ``bytea``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from controlplane.storage.tables import BlobChunkRow, BlobRow

CHUNK_BYTES = 4 * 1024 * 1024

_blobs = BlobRow.__table__  # type: ignore[attr-defined]
_chunks = BlobChunkRow.__table__  # type: ignore[attr-defined]


class BlobDamaged(Exception):
    """A blob's bytes do not match its recorded SHA-256 or chunk count."""


@dataclass(frozen=True)
class BlobInfo:
    key: str
    sha256: str
    size_bytes: int
    chunks: int
    create_time: datetime


class BlobStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def info(self, key: str) -> BlobInfo | None:
        with self._engine.connect() as c:
            row = c.execute(select(_blobs).where(_blobs.c.key == key)).first()
        if row is None:
            return None
        return BlobInfo(row.key, row.sha256, row.size_bytes, row.chunks, row.create_time)

    def put(self, key: str, path: Path) -> BlobInfo:
        """Stores the file at ``path`` under ``key`` (once: an existing blob is kept)."""
        found = self.info(key)
        if found is not None:
            return found
        digest = hashlib.sha256()
        size = seq = 0
        try:
            with self._engine.begin() as c, path.open("rb") as f:
                while block := f.read(CHUNK_BYTES):
                    c.execute(insert(_chunks).values(key=key, seq=seq, data=block))
                    digest.update(block)
                    size += len(block)
                    seq += 1
                c.execute(
                    insert(_blobs).values(
                        key=key,
                        sha256=digest.hexdigest(),
                        size_bytes=size,
                        chunks=seq,
                        create_time=datetime.now(UTC),
                    )
                )
        except IntegrityError:  # another server stored it first
            found = self.info(key)
            if found is None:
                raise
            return found
        stored = self.info(key)
        assert stored is not None
        return stored

    def get(self, key: str, dest: Path) -> BlobInfo | None:
        """Writes the blob to ``dest`` (atomically, its SHA-256 checked); None when there is
        no such blob. Raises BlobDamaged when its bytes are not what was stored."""
        found = self.info(key)
        if found is None:
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, self._engine.connect() as c:
                for seq in range(found.chunks):
                    data = c.execute(
                        select(_chunks.c.data).where(_chunks.c.key == key, _chunks.c.seq == seq)
                    ).scalar_one_or_none()
                    if data is None:
                        raise BlobDamaged(f"blob {key}: chunk {seq} of {found.chunks} is missing")
                    digest.update(data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != found.sha256:
                raise BlobDamaged(
                    f"blob {key}: SHA-256 {digest.hexdigest()[:12]}..., "
                    f"stored {found.sha256[:12]}...: not used"
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return found

    def append(self, key: str, seq: int, data: bytes) -> None:
        """Part ``seq`` of a file still being written (a running build's log), seen by
        readers at once. Parts have no ``blobs`` row: ``parts`` reads them, ``delete``
        removes them."""
        with self._engine.begin() as c:
            c.execute(insert(_chunks).values(key=key, seq=seq, data=data))

    def parts(self, key: str, start: int, limit: int = 16) -> list[bytes]:
        """Parts ``start``, ``start + 1``, ... written so far (at most ``limit``)."""
        with self._engine.connect() as c:
            rows = c.execute(
                select(_chunks.c.seq, _chunks.c.data)
                .where(_chunks.c.key == key, _chunks.c.seq >= start)
                .order_by(_chunks.c.seq)
                .limit(limit)
            ).all()
        found: list[bytes] = []
        for seq, row in enumerate(rows, start):
            if row.seq != seq:  # not written yet (never: one writer, in order)
                break
            found.append(row.data)
        return found

    def keys(self, prefix: str) -> list[BlobInfo]:
        with self._engine.connect() as c:
            rows = c.execute(
                select(_blobs).where(_blobs.c.key.startswith(prefix, autoescape=True))
            ).all()
        return [BlobInfo(r.key, r.sha256, r.size_bytes, r.chunks, r.create_time) for r in rows]

    def delete(self, key: str) -> None:
        """Removes the blob (its row first: a reader never sees a row without chunks)."""
        with self._engine.begin() as c:
            c.execute(delete(_blobs).where(_blobs.c.key == key))
            c.execute(delete(_chunks).where(_chunks.c.key == key))
