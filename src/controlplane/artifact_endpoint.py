"""Builds for nodes that do not share the server's disk: each artifact, by its digest.

``GET /artifacts/<digest>.tar`` answers the artifact's archive (``workers.artifact_archive``,
made on first use and kept beside it), streamed from the file, to a caller presenting
``Authorization: Bearer <token>``, the HMAC of the digest under this control plane's
artifact key: the Ray backend hands a replica its token through the secret broker, which
answers only a live replica of an application running that build. Nothing else is
served; anything else is 404, a wrong token 401.

The key: ``MODELCTL_ARTIFACT_KEY`` (hex; every server of one database needs the same), or
``DATA/artifacts.key`` (0600, made at first start). Off unless ``--artifact-port`` is set:
on one machine (or with a shared disk) replicas read the artifact folder itself.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from workers import artifact_archive

log = logging.getLogger(__name__)

KEY_ENV = "MODELCTL_ARTIFACT_KEY"
KEY_FILE = "artifacts.key"
_PATH = re.compile(r"^/artifacts/([0-9a-f]{64})\.tar$")


def artifact_key(data_dir: Path, env: Mapping[str, str] | None = None) -> bytes:
    """The key that makes and checks fetch tokens (the env's, else the data dir's file)."""
    env = os.environ if env is None else env
    if env.get(KEY_ENV):
        try:
            return bytes.fromhex(env[KEY_ENV])
        except ValueError:
            raise ValueError(f"{KEY_ENV} must be hex (e.g. openssl rand -hex 32)") from None
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another server on this data dir made it a moment ago
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    return bytes.fromhex(path.read_text().strip())


class ArtifactEndpoint:
    """Artifacts' archives, over HTTP from a thread of its own (``port`` 0: any free one;
    it is bound here, served from ``start``)."""

    def __init__(
        self, archive: Callable[[str], Path | None], key: bytes, host: str, port: int
    ) -> None:
        """``archive(digest)``: the artifact's archive on this disk, made or fetched first
        if need be, or None (``files.Files.archive``)."""
        self._archive = archive
        self._key = key
        self._host = host
        self._thread: threading.Thread | None = None
        self.served = 0  # archives sent whole
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint._answer(self)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("artifacts: " + format, *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Where this endpoint answers, as seen from this machine."""
        return f"http://{self._host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="artifacts", daemon=True
        )
        self._thread.start()
        log.info("artifacts for nodes at http://%s:%d/artifacts/", self._host, self.port)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        found = _PATH.match(h.path)
        if found is None:
            h.send_error(404, "no such artifact")
            return
        digest = found[1]
        presented = h.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not artifact_archive.token_ok(self._key, digest, presented):
            h.send_error(401, "a token for this artifact is needed")
            return
        try:
            tar = self._archive(digest)
        except Exception:
            log.exception("artifacts: %s could not be made ready", digest[:12])
            h.send_error(503, "the artifact cannot be read now")
            return
        if tar is None:
            h.send_error(404, "no such artifact")
            return
        with tar.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.send_response(200)
            h.send_header("Content-Type", "application/x-tar")
            h.send_header("Content-Length", str(size))
            h.end_headers()
            h.wfile.flush()
            h.connection.sendfile(f)
        self.served += 1
