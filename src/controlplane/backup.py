"""``modelctl backup`` and ``modelctl restore``: the server's database and files, copied
while it runs, and put back onto a fresh data dir.

A backup folder holds the database (``controlplane.db``, a SQLite snapshot taken with
SQLite's online backup API; or ``database.dump``, ``pg_dump --format=custom``), then, in
the data dir's own layout under ``data/``: the sources, the artifact of every build the
snapshot names, the build logs, ``secrets.key`` and ``admin.token`` (mode 0600), and last
``manifest.json`` (a folder without one is not a backup). The garbage collector's lock is
held throughout, so no artifact the snapshot names is removed before it is copied (on
PostgreSQL; a SQLite server collects without that lock: an artifact it removes meanwhile
is reported as collected, as one already gone is).

``restore`` refuses anything but a fresh data dir and an empty database; the database's
absolute paths into the original data dir are rewritten to the new one. The server,
started on it, applies every model again (its start-up sync).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from controlplane.config import ADMIN_TOKEN_FILE, DATABASE, Settings
from controlplane.gc import GC_LOCK
from controlplane.storage.db import Database
from controlplane.storage.secretbox import KEY_FILE
from workers.artifact_gc import digest_of
from workers.build_cache import CACHE_DIR

FORMAT = 1
MANIFEST = "manifest.json"
SQLITE_SNAPSHOT = "controlplane.db"
PG_DUMP_FILE = "database.dump"
DUMP_COMMAND_FILE = "DUMP_COMMAND.txt"
FILES_DIR = "data"  # the data dir's files, in its layout
PRIVATE_FILES = (KEY_FILE, ADMIN_TOKEN_FILE)  # copied with mode 0600
LOCK_WAIT_S = 30.0  # garbage collection holds its lock for one collection
COMMAND_TIMEOUT_S = 3600.0  # pg_dump, pg_restore

_ARTIFACT_PATHS = "SELECT DISTINCT artifact_path FROM builds WHERE artifact_path <> ''"
_REVISION = "SELECT version_num FROM alembic_version"


class BackupError(Exception):
    """A backup or restore refused (exit code 2) or failed (1); the message says why."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Counts:
    files: int = 0
    bytes: int = 0

    def add(self, other: Counts) -> None:
        self.files += other.files
        self.bytes += other.bytes


@dataclass(frozen=True)
class BackupSummary:
    directory: Path
    data_dir: Path
    database: str  # "sqlite" or "postgresql"
    alembic_revision: str
    database_bytes: int  # 0 while the dump is still to be made (dump_command)
    # Set when pg_dump was not on PATH: the database is not in the backup until this runs.
    dump_command: str
    files: Mapping[str, Counts]  # sources, artifacts, logs, keys
    artifacts: int  # artifact folders copied
    collected: tuple[str, ...]  # artifacts the snapshot names, removed as unused before
    outside: tuple[str, ...]  # artifacts outside the data dir: not copied
    private_files: tuple[str, ...]  # secrets.key, admin.token: those present

    @property
    def total(self) -> Counts:
        total = Counts(1 if self.database_bytes else 0, self.database_bytes)
        for c in self.files.values():
            total.add(c)
        return total


@dataclass(frozen=True)
class RestoreSummary:
    directory: Path
    data_dir: Path
    original_data_dir: Path
    database: str
    alembic_revision: str
    models: int
    builds: int
    paths_moved: int  # database values rewritten from the original data dir to this one
    files: Counts  # with the database
    private_files: tuple[str, ...]
    collected: tuple[str, ...] = field(default=())  # from the backup: not restored either


# ---- backup ------------------------------------------------------------------------------


def backup(
    settings: Settings,
    directory: Path,
    *,
    lock_wait_s: float = LOCK_WAIT_S,
    timeout_s: float = COMMAND_TIMEOUT_S,
) -> BackupSummary:
    """Copies the database of ``settings`` and its data dir's files into ``directory``
    (new, or empty) while the server runs."""
    data_dir = settings.data_dir.resolve()
    url = settings.db_url
    kind = database_kind(url)
    if kind == "sqlite" and not sqlite_path(url).is_file():
        raise BackupError(f"no server database at {sqlite_path(url)}")
    directory = directory.resolve()
    _make_private_empty(directory)
    db = Database(url)
    try:
        release = _gc_lock(db, lock_wait_s)
        try:
            key_before = _read_or_none(data_dir / KEY_FILE)
            if kind == "sqlite":
                snap = _snapshot_sqlite(sqlite_path(url), directory / SQLITE_SNAPSHOT)
            else:
                snap = _snapshot_postgres(db, url, directory, timeout_s)
            if _read_or_none(data_dir / KEY_FILE) != key_before:
                raise BackupError(
                    f"the secret key in {data_dir / KEY_FILE} changed during the backup "
                    "(modelctl secrets rotate): run the backup again into an empty folder",
                    exit_code=1,
                )
            copied = _copy_files(settings, data_dir, snap.artifact_paths, directory / FILES_DIR)
        finally:
            release()
    except (DBAPIError, sqlite3.Error) as e:
        raise BackupError(f"the database cannot be read: {e}", exit_code=1) from e
    finally:
        db.close()
    summary = BackupSummary(
        directory=directory,
        data_dir=data_dir,
        database=kind,
        alembic_revision=snap.revision,
        database_bytes=snap.size,
        dump_command=snap.dump_command,
        files=copied.counts,
        artifacts=copied.artifacts,
        collected=tuple(copied.collected),
        outside=tuple(copied.outside),
        private_files=tuple(copied.private),
    )
    _write_manifest(directory, summary, snap.file)
    return summary


def database_kind(url: str) -> str:
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError as e:
        raise BackupError(f"not a database URL: {e}") from e
    if backend not in ("sqlite", "postgresql"):
        raise BackupError(f"{backend}: only SQLite and PostgreSQL databases are supported")
    return backend


def sqlite_path(url: str) -> Path:
    name = make_url(url).database
    if not name or name == ":memory:":
        raise BackupError("an in-memory SQLite database has nothing to back up or restore to")
    return Path(name).resolve()


def libpq_url(url: str) -> tuple[str, dict[str, str]]:
    """The URL as pg_dump and pg_restore take it (no SQLAlchemy driver, e.g. ``+psycopg``),
    without its password, and the environment that gives them the password."""
    u = make_url(url)
    env = {"PGPASSWORD": str(u.password)} if u.password else {}
    bare = URL.create("postgresql", u.username, None, u.host, u.port, u.database, u.query)
    return bare.render_as_string(hide_password=False), env


def _make_private_empty(directory: Path) -> None:
    if directory.exists():
        if not directory.is_dir():
            raise BackupError(f"{directory} is not a folder")
        if any(directory.iterdir()):
            raise BackupError(f"{directory} is not empty: back up into a new or empty folder")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def _gc_lock(db: Database, wait_s: float) -> Callable[[], None]:
    """Garbage collection's lock: no artifact is removed while it is held."""
    deadline = time.monotonic() + wait_s
    while True:
        release = db.try_lock(GC_LOCK)
        if release is not None:
            return release
        if time.monotonic() >= deadline:
            raise BackupError(
                f"garbage collection has held its lock for {wait_s:.0f} s: try again later",
                exit_code=1,
            )
        time.sleep(0.5)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class _Snapshot:
    revision: str
    artifact_paths: list[str]
    file: str  # its file in the backup ("": still to be dumped)
    size: int
    dump_command: str = ""


def _snapshot_sqlite(src: Path, dst: Path) -> _Snapshot:
    """A consistent copy with SQLite's online backup API (never a file copy, which may
    miss pages still in the write-ahead log or catch a write half done)."""
    source = sqlite3.connect(src, timeout=30)
    try:
        target = sqlite3.connect(dst)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            target.close()
    finally:
        source.close()
    os.chmod(dst, 0o600)
    with contextlib.closing(sqlite3.connect(dst)) as snap:
        if not snap.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'"
        ).fetchone():
            raise BackupError(f"{src} is not a control plane database (no schema)")
        revision = str(snap.execute(_REVISION).fetchone()[0])
        paths = [str(r[0]) for r in snap.execute(_ARTIFACT_PATHS)]
    return _Snapshot(revision, paths, SQLITE_SNAPSHOT, dst.stat().st_size)


def _snapshot_postgres(db: Database, url: str, directory: Path, timeout_s: float) -> _Snapshot:
    """pg_dump of the very snapshot whose builds are read here (``--snapshot``)."""
    dump = directory / PG_DUMP_FILE
    libpq, env = libpq_url(url)
    pg_dump = shutil.which("pg_dump")
    args = [pg_dump or "pg_dump", "--format=custom", "--no-owner", f"--file={dump}"]
    args.append(f"--dbname={libpq}")
    with db.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            snapshot_id = str(conn.execute(text("SELECT pg_export_snapshot()")).scalar_one())
            revision, paths = _read_postgres(conn)
            if pg_dump is None:
                command = shlex.join(args)
                (directory / DUMP_COMMAND_FILE).write_text(
                    "# pg_dump was not on PATH: the database is NOT in this backup yet. Run\n"
                    "# this (PGPASSWORD set if the database wants a password) and keep the\n"
                    f"# dump in this folder as {PG_DUMP_FILE}; artifacts of builds made since\n"
                    "# the backup are not in it.\n"
                    f"{command}\n"
                )
                return _Snapshot(revision, paths, "", 0, dump_command=command)
            _run([*args, f"--snapshot={snapshot_id}"], env, timeout_s)
    os.chmod(dump, 0o600)
    return _Snapshot(revision, paths, PG_DUMP_FILE, dump.stat().st_size)


def _read_postgres(conn: Connection) -> tuple[str, list[str]]:
    if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is None:
        raise BackupError("the database has no control plane schema (no alembic_version)")
    revision = str(conn.execute(text(_REVISION)).scalar_one())
    return revision, [str(p) for p in conn.execute(text(_ARTIFACT_PATHS)).scalars()]


def _run(args: Sequence[str], env: Mapping[str, str], timeout_s: float) -> None:
    name = Path(args[0]).name
    try:
        done = subprocess.run(
            list(args),
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise BackupError(f"{name} ran for more than {timeout_s:.0f} s", exit_code=1) from e
    except OSError as e:
        raise BackupError(f"{name} could not run: {e}", exit_code=1) from e
    if done.returncode != 0:
        said = done.stderr.strip()[-2000:] or done.stdout.strip()[-2000:]
        raise BackupError(f"{name} failed (exit {done.returncode}): {said}", exit_code=1)


@dataclass
class _Copied:
    counts: dict[str, Counts]
    artifacts: int = 0
    collected: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    private: list[str] = field(default_factory=list)


def _copy_files(
    settings: Settings, data_dir: Path, artifact_paths: Iterable[str], out: Path
) -> _Copied:
    done = _Copied(counts={"sources": Counts(), "artifacts": Counts(), "logs": Counts()})
    out.mkdir(mode=0o700)
    done.counts["sources"] = _copy_tree(
        settings.sources_dir, out / "sources", skip=frozenset({"tmp"})
    )
    artifacts = done.counts["artifacts"]
    digests: set[str] = set()
    for raw in sorted(set(artifact_paths)):
        path = Path(raw)
        rel = _inside(path, data_dir)
        if rel is None and digest_of(raw) and settings.artifact_store == DATABASE:
            # Recorded by another server (no shared disk): this server keeps it under its
            # digest if it has it; the database dump holds it either way.
            path = settings.artifacts_dir / path.name
            if not path.is_dir():
                continue
            rel = _inside(path, data_dir)
        if rel is None:
            done.outside.append(raw)
            continue
        if not path.is_dir():
            done.collected.append(raw)
            continue
        copied = _copy_tree(path, out / rel)
        if not path.is_dir():  # removed while it was copied: collected, not half kept
            shutil.rmtree(out / rel, ignore_errors=True)
            done.collected.append(raw)
            continue
        artifacts.add(copied)
        done.artifacts += 1
        digests.add(path.name)
    artifacts.add(_copy_cache_entries(settings.artifacts_dir, out / "artifacts", digests))
    done.counts["logs"] = _copy_tree(settings.logs_dir, out / "logs")
    keys = done.counts["keys"] = Counts()
    for name in PRIVATE_FILES:
        size = _copy_private(data_dir / name, out / name)
        if size is not None:
            keys.add(Counts(1, size))
            done.private.append(name)
    return done


def _inside(path: Path, root: Path) -> Path | None:
    """``path`` relative to ``root``, or None when it is elsewhere."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    return rel if rel.parts and ".." not in rel.parts else None


def _copy_tree(src: Path, dst: Path, skip: frozenset[str] = frozenset()) -> Counts:
    """Copies ``src`` to ``dst`` (modes and times kept; links as links), skipping the
    top-level entries named in ``skip``; a file removed meanwhile is left out."""
    counts = Counts()
    if not src.is_dir():
        return counts
    for top, dirs, files in os.walk(src):
        here = Path(top)
        rel = here.relative_to(src)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        target = dst / rel
        target.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            shutil.copymode(here, target)
        for d in dirs:  # links to folders: os.walk does not enter them
            if (here / d).is_symlink():
                counts.add(_copy_file(here / d, target / d))
        for f in files:
            counts.add(_copy_file(here / f, target / f))
    return counts


def _copy_file(src: Path, dst: Path) -> Counts:
    try:
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
            return Counts(1, 0)
        shutil.copy2(src, dst)
    except FileNotFoundError:  # removed since it was listed
        return Counts()
    return Counts(1, dst.stat().st_size)


def _copy_cache_entries(artifacts_dir: Path, out: Path, digests: set[str]) -> Counts:
    """The build cache's entries for the artifacts copied: same builds stay cache hits."""
    counts = Counts()
    folder = artifacts_dir / CACHE_DIR
    for entry in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            digest = json.loads(entry.read_text()).get("digest")
        except (OSError, ValueError, AttributeError):
            continue
        if digest in digests:
            (out / CACHE_DIR).mkdir(parents=True, exist_ok=True)
            counts.add(_copy_file(entry, out / CACHE_DIR / entry.name))
    return counts


def _copy_private(src: Path, dst: Path) -> int | None:
    """Copies a file only its owner may read (mode 0600 from the start); its size, or
    None when there is none."""
    data = _read_or_none(src)
    if data is None:
        return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(dst, 0o600)
    return len(data)


def _write_manifest(directory: Path, s: BackupSummary, database_file: str) -> None:
    total = s.total
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "time": datetime.now(UTC).isoformat(),
        "data_dir": str(s.data_dir),
        "database": {
            "kind": s.database,
            "file": database_file,
            "alembic_revision": s.alembic_revision,
            "bytes": s.database_bytes,
            "dump_command": s.dump_command,
        },
        "files": {k: {"files": c.files, "bytes": c.bytes} for k, c in s.files.items()},
        "artifacts": {
            "copied": s.artifacts,
            "collected": list(s.collected),
            "outside_data_dir": list(s.outside),
        },
        "private_files": list(s.private_files),
        "total": {"files": total.files, "bytes": total.bytes},
    }
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, directory / MANIFEST)  # last: a folder without one is no backup


# ---- restore -----------------------------------------------------------------------------


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise BackupError(
            f"{directory} is not a complete backup (no {MANIFEST}: the backup did not finish)"
        ) from e
    except (OSError, ValueError) as e:
        raise BackupError(f"{path} cannot be read: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise BackupError(f"{path}: format {got!r}; this modelctl reads format {FORMAT}")
    return manifest


def restore(
    directory: Path, settings: Settings, *, timeout_s: float = COMMAND_TIMEOUT_S
) -> RestoreSummary:
    """Puts the backup in ``directory`` onto the fresh data dir and empty database of
    ``settings``, with the database's paths moved to the new data dir."""
    directory = directory.resolve()
    manifest = read_manifest(directory)
    data_dir = settings.data_dir.resolve()
    original = Path(manifest["data_dir"])
    backed_up: dict[str, Any] = manifest["database"]
    url = settings.db_url
    kind = database_kind(url)
    if kind != backed_up["kind"]:
        hint = "give --database-url" if backed_up["kind"] == "postgresql" else "no --database-url"
        raise BackupError(f"the backup holds a {backed_up['kind']} database, not {kind} ({hint})")
    _check_fresh_data_dir(data_dir, sqlite_path(url) if kind == "sqlite" else None)
    if kind == "sqlite" and not (directory / SQLITE_SNAPSHOT).is_file():
        raise BackupError(f"the backup has no {SQLITE_SNAPSHOT}")
    pg = _check_postgres_target(directory, url, backed_up) if kind == "postgresql" else None
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)

    files = Counts()
    if pg is None:
        target = sqlite_path(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_sqlite(directory / SQLITE_SNAPSHOT, target)
        files.add(Counts(1, target.stat().st_size))
    else:
        dump, args, env = pg
        _run(args, env, timeout_s)
        files.add(Counts(1, dump.stat().st_size))
    private: list[str] = []
    source = directory / FILES_DIR
    for entry in sorted(source.iterdir()) if source.is_dir() else ():
        if entry.name in PRIVATE_FILES:
            size = _copy_private(entry, data_dir / entry.name)
            if size is not None:
                files.add(Counts(1, size))
                private.append(entry.name)
        elif entry.is_dir():
            files.add(_copy_tree(entry, data_dir / entry.name))
    try:
        models, builds, moved = _move_paths(url, original, data_dir)
    except DBAPIError as e:
        raise BackupError(f"the paths in the restored database were not moved: {e}", 1) from e
    return RestoreSummary(
        directory=directory,
        data_dir=data_dir,
        original_data_dir=original,
        database=kind,
        alembic_revision=str(backed_up.get("alembic_revision", "")),
        models=models,
        builds=builds,
        paths_moved=moved,
        files=files,
        private_files=tuple(private),
        collected=tuple(manifest.get("artifacts", {}).get("collected", ())),
    )


def _check_fresh_data_dir(data_dir: Path, sqlite_db: Path | None) -> None:
    if sqlite_db is not None and sqlite_db.exists():
        raise BackupError(
            f"{data_dir} already has a database ({sqlite_db}): restore only onto a fresh data dir"
        )
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise BackupError(
            f"{data_dir} is not a fresh data dir (not empty): restore only onto a new or empty one"
        )


def _check_postgres_target(
    directory: Path, url: str, backed_up: Mapping[str, Any]
) -> tuple[Path, list[str], dict[str, str]]:
    dump = directory / PG_DUMP_FILE
    if not dump.is_file():
        command = backed_up.get("dump_command") or ""
        raise BackupError(
            f"the backup has no {PG_DUMP_FILE}: pg_dump was not on PATH when it was taken"
            + (f"; its command is in {directory / DUMP_COMMAND_FILE}" if command else "")
        )
    libpq, env = libpq_url(url)
    pg_restore = shutil.which("pg_restore")
    args = [pg_restore or "pg_restore", "--no-owner", "--exit-on-error", "--single-transaction"]
    args += [f"--dbname={libpq}", str(dump)]
    if pg_restore is None:
        raise BackupError(
            f"pg_restore is not on PATH: install it (PostgreSQL's client tools), or run "
            f"`{shlex.join(args)}` and restore the files without --database-url"
        )
    db = Database(url)
    try:
        has_models = inspect(db.engine).has_table("models")
    except Exception as e:
        raise BackupError(f"the target database cannot be reached: {e}") from e
    finally:
        db.close()
    if has_models:
        raise BackupError(
            "the target database already has a control plane (a models table): restore "
            "only into an empty database"
        )
    return dump, args, env


def _copy_sqlite(src: Path, dst: Path) -> None:
    with (
        contextlib.closing(sqlite3.connect(src)) as source,
        contextlib.closing(sqlite3.connect(dst)) as target,
    ):
        source.backup(target)
    os.chmod(dst, 0o600)


def moved_path(path: str, old: Path, new: Path) -> str:
    """``path`` under ``new`` when it was under ``old``; else as it was."""
    rel = _inside(Path(path), old) if path else None
    if rel is None:
        return str(new) if path and Path(path) == old else path
    return str(new / rel)


def _move_paths(url: str, old: Path, new: Path) -> tuple[int, int, int]:
    """Rewrites the database's absolute paths into ``old`` to ``new``, in one
    transaction; (models, builds, values rewritten)."""
    db = Database(url)
    try:
        with db.write() as tx:
            s = tx.session
            rows = s.execute(text("SELECT id, artifact_path, log_path FROM builds")).all()
            changes: list[dict[str, Any]] = []
            moved = 0
            for id_, artifact, log in rows:
                a, lg = moved_path(artifact, old, new), moved_path(log, old, new)
                if (a, lg) != (artifact, log):
                    moved += (a != artifact) + (lg != log)
                    changes.append({"id": id_, "a": a, "l": lg})
            if changes:
                s.execute(
                    text("UPDATE builds SET artifact_path = :a, log_path = :l WHERE id = :id"),
                    changes,
                )
            models = int(s.execute(text("SELECT count(*) FROM models")).scalar_one())
            builds = len(rows)
        return models, builds, moved
    finally:
        db.close()
