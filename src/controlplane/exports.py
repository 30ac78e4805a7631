"""ExportBuild: a BUILT build as an OCI image layout, streamed as a tar archive.

The image is built on this server (it shares the artifacts' disk) by ``workers.oci``
with buildah, into a scratch folder under ``<data_dir>/exports`` that is removed
once streamed, whether the client read it all or went away.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from controlplane.domain.errors import FailedPrecondition
from workers.oci import ExportFailed, OciExport, export_oci

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
EXPORT_TIMEOUT_S = 900.0


class Exporter:
    def __init__(self, work_dir: Path, at_once: int = 2) -> None:
        self.work_dir = work_dir
        self._slots = asyncio.Semaphore(at_once)  # buildah copies every file: bound the disk

    async def layout_tar(self, export: OciExport) -> AsyncIterator[tuple[bytes, str]]:
        """(piece of the tar archive, "") pairs, then (b"", manifest digest) at the end."""
        async with self._slots:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, dir=self.work_dir))
            try:
                digest = await asyncio.to_thread(self._build, export, scratch)
                with (scratch / "layout.tar").open("rb") as tar:
                    while chunk := await asyncio.to_thread(tar.read, CHUNK):
                        yield chunk, ""
                yield b"", digest
            finally:
                await asyncio.to_thread(shutil.rmtree, scratch, True)

    @staticmethod
    def _build(export: OciExport, scratch: Path) -> str:
        layout = scratch / "layout"

        def to_log(line: str) -> None:
            log.info("export %s: %s", export.build_name, line)

        try:
            digest = export_oci(
                export, layout, work_dir=scratch / "work", log=to_log, timeout_s=EXPORT_TIMEOUT_S
            )
        except ExportFailed as e:
            raise FailedPrecondition(
                message=f"exporting {export.build_name} failed: {e}",
                reason="EXPORT_FAILED",
                metadata={"build": export.build_name},
            ) from None
        with tarfile.open(scratch / "layout.tar", "w") as tar:
            for path in sorted(layout.rglob("*")):
                tar.add(path, arcname=path.relative_to(layout).as_posix(), recursive=False)
        return digest
