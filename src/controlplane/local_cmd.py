"""Commands run on the server's machine, on its data dir and database, not through the API:
``modelctl secrets rotate``, ``modelctl backup``, ``modelctl restore``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from controlplane import backup as backups
from controlplane.config import DEFAULT_DATA_DIR, Settings
from controlplane.storage import repo
from controlplane.storage.db import Database
from controlplane.storage.secretbox import ENV, KEY_FILE, SecretBox, SecretKeyError, rotate


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    """Where the server keeps its records: as `modelctl serve` was given them."""
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="the server's data dir (default: %(default)s)",
    )
    p.add_argument(
        "--database-url", default="", help="the server's database (default: SQLite in DIR)"
    )


def settings_of(args: argparse.Namespace) -> Settings:
    return Settings(data_dir=args.data_dir.resolve(), database_url=args.database_url)


def add_secrets(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    text = "the key that seals secret values at rest"
    group = sub.add_parser("secrets", help=text, description=text)
    verbs = group.add_subparsers(dest="verb", required=True, metavar="{rotate}")
    rot = verbs.add_parser(
        "rotate",
        help="seal every stored secret value under a new key",
        description="Makes a new key first in DIR/secrets.key, seals every stored secret "
        "value under it, then drops the old keys (running servers read the file again when "
        "they meet the new key). With MODELCTL_SECRET_KEYS set, put the new key first on "
        "every server instead; this then seals every value under it. Replicas keep running.",
    )
    add_store_arguments(rot)


def secrets_rotate(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if not settings.database_url and not (settings.data_dir / "controlplane.db").exists():
        print(
            f"modelctl secrets rotate: no server database in {settings.data_dir}", file=sys.stderr
        )
        return 2
    db = Database(settings.db_url)

    def reseal_all(box: SecretBox) -> int:
        with db.write() as tx:
            return repo.reseal_secrets(tx.session, box)

    try:
        print(rotate(settings.data_dir, reseal_all))
    except SecretKeyError as e:
        print(f"modelctl secrets rotate: {e}", file=sys.stderr)
        return 1
    finally:
        db.close()
    return 0


# ---- modelctl backup / restore (controlplane/backup.py) -----------------------------------


def add_backup(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    text = "copy the server's database and files into DIR, while it runs"
    b = sub.add_parser(
        "backup",
        help=text,
        description="A consistent copy, taken while the server runs: the database (SQLite's "
        "online backup API, or pg_dump), then the sources, the artifact of every build it "
        "names, the build logs, secrets.key and admin.token, and DIR/manifest.json. "
        "Garbage collection waits meanwhile. DIR must be new or empty; it is made 0700.",
    )
    b.add_argument("dir", type=Path, metavar="DIR", help="where the backup goes (new or empty)")
    add_store_arguments(b)
    text = "put a backup onto a fresh data dir (and empty database)"
    r = sub.add_parser(
        "restore",
        help=text,
        description="Copies the backup in DIR into --data-dir, which must be new or empty, "
        "and its database into --database-url (an empty PostgreSQL database) or else SQLite "
        "in the new data dir; paths into the original data dir are moved to the new one. "
        "`modelctl serve --data-dir NEW` then applies every model again.",
    )
    r.add_argument("dir", type=Path, metavar="DIR", help="a folder `modelctl backup` wrote")
    r.add_argument("--data-dir", type=Path, required=True, help="the new data dir")
    r.add_argument(
        "--database-url", default="", help="an empty database (default: SQLite in the data dir)"
    )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def run_backup(args: argparse.Namespace) -> int:
    try:
        s = backups.backup(settings_of(args), args.dir)
    except backups.BackupError as e:
        print(f"modelctl backup: {e}", file=sys.stderr)
        return e.exit_code
    total = s.total
    print(f"backup of {s.data_dir} in {s.directory}")
    if s.dump_command:
        print(f"  database   {s.database} (schema {s.alembic_revision}): NOT dumped yet")
    else:
        print(f"  database   {s.database} (schema {s.alembic_revision}), {_size(s.database_bytes)}")
    for name, c in s.files.items():
        what = f"{s.artifacts} folders, " if name == "artifacts" else ""
        print(f"  {name:<10} {what}{c.files} files, {_size(c.bytes)}")
    print(f"  total      {total.files} files, {_size(total.bytes)}")
    for path in s.collected:
        print(f"  not copied (already collected as unused): {path}")
    for path in s.outside:
        print(f"  not copied (outside the data dir): {path}")
    if KEY_FILE not in s.private_files:
        print(f"  no {KEY_FILE}: the server takes its keys from {ENV}; keep them with the backup")
    if s.dump_command:
        print(
            f"pg_dump is not on PATH: the database is NOT in the backup. Run this (also in "
            f"{s.directory / backups.DUMP_COMMAND_FILE}) where pg_dump is:\n  {s.dump_command}"
        )
    return 0


def run_restore(args: argparse.Namespace) -> int:
    try:
        s = backups.restore(args.dir, settings_of(args))
    except backups.BackupError as e:
        print(f"modelctl restore: {e}", file=sys.stderr)
        return e.exit_code
    print(
        f"restored {s.directory} into {s.data_dir}: {s.models} models, {s.builds} builds, "
        f"{s.files.files} files, {_size(s.files.bytes)} ({s.database}, schema "
        f"{s.alembic_revision}); {s.paths_moved} paths moved from {s.original_data_dir}"
    )
    for path in s.collected:
        print(f"  not in the backup (collected as unused before it): {path}")
    if KEY_FILE not in s.private_files:
        print(f"  no {KEY_FILE} in the backup: give the server the same {ENV} as before")
    url = " --database-url URL" if args.database_url else ""
    print(f"start it with: modelctl serve --data-dir {s.data_dir}{url}")
    return 0
