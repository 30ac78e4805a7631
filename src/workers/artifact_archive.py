"""A build's artifact as one file, and back: how a node that does not see the control
plane's disk gets a build.

The control plane keeps each artifact folder (``<artifacts_dir>/<digest>/``) and, beside
it, ``<artifacts_dir>/.archives/<digest>.tar`` (an uncompressed tar of the folder: the
installed packages are mostly compressed wheels' contents already, and a tar streams
straight from the file) with its SHA-256 in ``<digest>.tar.sha256``. A replica on a node
where the folder's path does not exist fetches the tar by that digest over HTTP
(``fetch``), checks its SHA-256, unpacks it into the node's cache once, and every later
replica of that build on the node uses the cache.

The cache is collected as builds come: each replica holds a shared lock on its build's
``.<digest>.use`` for as long as it lives (taken before it looks for the folder), and
after each fetch the node removes the folders of builds no replica holds beyond the
``CP_ARTIFACT_CACHE_KEEP`` (default 3) most recently used (kept for a quick rollback).
A folder goes only under an exclusive lock that no replica holds, so none is removed
under a replica, and a replica that starts meanwhile waits, then fetches it again.

Standard library only: it runs in replicas.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import hmac
import os
import shutil
import tarfile
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

ARCHIVES_DIR = ".archives"  # under artifacts_dir
CHUNK = 1024 * 1024
FETCH_TIMEOUT_S = 60.0  # per read: a stalled transfer fails, a long one does not
CACHE_ENV = "CP_ARTIFACT_CACHE"  # a node's cache folder (default: under the temp dir)
KEEP_ENV = "CP_ARTIFACT_CACHE_KEEP"  # builds no replica uses kept in a node's cache
KEEP_DEFAULT = 3

# This process's shared locks on the builds it loaded from the cache: held until it exits.
_in_use: dict[str, BinaryIO] = {}
_holding = threading.Lock()


@atexit.register
def _release_all() -> None:
    for use in _in_use.values():
        use.close()


class FetchFailed(Exception):
    """The artifact could not be fetched or did not match its SHA-256 (one line)."""


@dataclass(frozen=True)
class Remote:
    """Where a replica fetches an artifact it does not see on its disk."""

    digest: str  # the artifact's name (its content address)
    sha256: str  # of the archive: checked before anything is unpacked
    url: str  # GET, answered with the archive
    token: str  # sent as `Authorization: Bearer <token>`


def token(key: bytes, digest: str) -> str:
    """What a fetch of ``digest`` must present: only holders of ``key`` can make it."""
    return hmac.new(key, f"artifact:{digest}".encode(), hashlib.sha256).hexdigest()


def token_ok(key: bytes, digest: str, presented: str) -> bool:
    return hmac.compare_digest(token(key, digest), presented)


def archive_paths(artifacts_dir: Path, digest: str) -> tuple[Path, Path]:
    folder = artifacts_dir / ARCHIVES_DIR
    return folder / f"{digest}.tar", folder / f"{digest}.tar.sha256"


def archived_sha256(artifacts_dir: Path, digest: str) -> str:
    """The SHA-256 of the artifact's archive, or "" when it has none (yet)."""
    tar, sha = archive_paths(artifacts_dir, digest)
    try:
        value = sha.read_text().strip()
    except OSError:
        return ""
    return value if tar.is_file() else ""


def pack(artifacts_dir: Path, digest: str) -> str:
    """Writes the archive of ``<artifacts_dir>/<digest>/`` (once: an existing one is
    kept) and returns its SHA-256. Entries in name order, owners cleared."""
    existing = archived_sha256(artifacts_dir, digest)
    if existing:
        return existing
    tar_path, sha_path = archive_paths(artifacts_dir, digest)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{digest}-", dir=tar_path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.add(artifacts_dir / digest, arcname=".", filter=_anonymous)
            out.flush()
            os.fsync(out.fileno())
        sha = sha256_file(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, tar_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    write_sha256(sha_path, sha)
    return sha


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_sha256(path: Path, sha: str) -> None:
    """The archive's SHA-256 sidecar (written after the archive: a sidecar means a whole
    archive)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(sha + "\n")
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"modelctl-artifacts-{os.getuid()}"


def local_copy(
    path: str, digest: str, remote: Callable[[], Sequence[Remote]], cache: Path | None = None
) -> str:
    """The artifact folder to load from: ``path`` where this node sees it (one machine,
    or a shared disk); else this node's cached copy of ``digest``, fetched from the first
    of ``remote()`` that answers (asked only then: one per control-plane server) and
    unpacked first if no replica on the node did it before (one at a time: a file lock
    per digest)."""
    if path and os.path.isdir(path):
        return path
    root = cache or cache_root()
    here = root / digest
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _hold(root, digest)
    if here.is_dir():
        return str(here)
    with (root / f".{digest}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if here.is_dir():  # another replica fetched it while this one waited
            return str(here)
        sources = remote()
        if not sources:
            raise FetchFailed(
                f"the artifact {path or digest} is not on this node's disk, and the control "
                "plane serves no artifacts to nodes (modelctl serve --artifact-port)"
            )
        failures: list[str] = []
        for source in sources:
            try:
                _fetch_into(source, root, here)
                break
            except FetchFailed as e:
                failures.append(str(e))
        else:
            raise FetchFailed("; ".join(failures))
    collect(root, _keep())
    return str(here)


def _hold(root: Path, digest: str) -> None:
    """This process uses ``digest`` from the cache (a shared lock, held until it exits;
    touched: the most recently used are kept)."""
    with _holding:
        if digest in _in_use:
            return
        use: BinaryIO = (root / f".{digest}.use").open("ab")
        fcntl.flock(use, fcntl.LOCK_SH)  # waits while a collection removes the folder
        os.utime(use.fileno())
        _in_use[digest] = use


def _keep() -> int:
    try:
        return max(0, int(os.environ.get(KEEP_ENV, KEEP_DEFAULT)))
    except ValueError:
        return KEEP_DEFAULT


def collect(root: Path, keep: int) -> list[str]:
    """Removes the cached builds no replica on this node holds, beyond the ``keep`` most
    recently used; returns the digests removed."""
    unused: list[tuple[float, str, BinaryIO]] = []
    for folder in root.iterdir():
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        lock: BinaryIO = (root / f".{folder.name}.use").open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a replica uses it
            lock.close()
            continue
        unused.append((os.fstat(lock.fileno()).st_mtime, folder.name, lock))
    unused.sort(reverse=True)
    removed: list[str] = []
    for i, (_, digest, use) in enumerate(unused):
        with use:  # closing it releases the lock
            if i >= keep:  # renamed first: never a half-removed folder under its name
                gone = Path(tempfile.mkdtemp(prefix=f".{digest}-gone-", dir=root))
                os.replace(root / digest, gone / digest)
                shutil.rmtree(gone, ignore_errors=True)
                removed.append(digest)
    return removed


def _fetch_into(remote: Remote, root: Path, here: Path) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.digest}-", suffix=".tar", dir=root)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            got = _download(remote, out)
        if got != remote.sha256:
            raise FetchFailed(
                f"artifact {remote.digest[:12]} from {remote.url}: SHA-256 {got[:12]}..., "
                f"expected {remote.sha256[:12]}...: not used"
            )
        unpack(tmp, here, root)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def unpack(tar: Path, final: Path, scratch: Path) -> None:
    """Unpacks ``tar`` into a new folder in ``scratch``, then renames it to ``final``:
    nothing half-unpacked is ever at ``final``. One there already (the same content, put
    there first by another build or replica) is kept."""
    unpacked = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=scratch))
    try:
        with tarfile.open(tar) as archive:
            archive.extractall(unpacked, filter="data")
        os.chmod(unpacked, 0o755)
        try:
            os.rename(unpacked, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)


def _download(remote: Remote, out: BinaryIO) -> str:
    """Streams the archive into ``out``; returns its SHA-256."""
    request = urllib.request.Request(
        remote.url, headers={"Authorization": f"Bearer {remote.token}"}
    )
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as answer:
            while block := answer.read(CHUNK):
                digest.update(block)
                out.write(block)
    except OSError as e:  # URLError, HTTPError, timeouts, a full disk
        raise FetchFailed(
            f"cannot fetch artifact {remote.digest[:12]} from {remote.url}: {e}"
        ) from e
    return digest.hexdigest()
