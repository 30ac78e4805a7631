"""Commands run on the server's machine, on its data dir and database, not through the API:
``modelctl secrets rotate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from controlplane.config import DEFAULT_DATA_DIR, Settings
from controlplane.storage import repo
from controlplane.storage.db import Database
from controlplane.storage.secretbox import SecretBox, SecretKeyError, rotate


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
