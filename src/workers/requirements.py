"""A model's dependencies: which file names them, how pip installs them, what it resolved.

``requirements.lock`` (every line pinned with ``==``, hashes allowed) wins over
``requirements.txt`` and installs with ``--no-deps``: exactly what it lists. Either
way pip writes an installation report, from which the build records the name,
version and sha256 of every installed distribution.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.backend import ResolvedPackage

REQUIREMENTS = "requirements.txt"
LOCK = "requirements.lock"

# name[extras] == one exact version, then only whitespace, a marker (;) or options.
_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?\s*===?\s*[^\s;,*]+(?=\s|;|$)")


class LockError(ValueError):
    """The lock file pins something loosely (the message names the line)."""


@dataclass(frozen=True)
class Requirements:
    file: str  # REQUIREMENTS or LOCK, relative to the source root
    locked: bool


def find(root: Path) -> Requirements | None:
    """The file naming the model's dependencies, or None when it has none."""
    if (root / LOCK).is_file():
        return Requirements(LOCK, locked=True)
    if (root / REQUIREMENTS).is_file():
        return Requirements(REQUIREMENTS, locked=False)
    return None


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """(first line number, text) of each requirement, continuations joined, comments gone."""
    start, parts = 0, list[str]()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        joined = " ".join(p for p in parts if p).strip()
        parts = []
        if joined:
            yield start, joined


def check_lock(text: str) -> None:
    """Every requirement of a lock file is pinned to one version (``name==1.2.3``)."""
    for number, line in _logical_lines(text):
        if line.startswith("-"):
            if line.startswith(("-r", "--requirement", "-c", "--constraint", "-e", "--editable")):
                option = line.split()[0]
                raise LockError(f"{LOCK} line {number}: {option} is not allowed in a lock")
            continue  # an option: --hash, --index-url, --find-links...
        if not _PIN.match(line):
            name = line.split()[0]
            raise LockError(f"{LOCK} line {number}: {name!r} is not pinned (name==version)")


def pip_install(python: str, target: Path, req: Requirements, report: Path) -> list[str]:
    cmd = [
        python,
        "-m",
        "pip",
        "install",
        "--no-input",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--target",
        str(target),
        "--report",
        str(report),
        "-r",
        req.file,
    ]
    if req.locked:
        cmd.insert(cmd.index("--target"), "--no-deps")
    return cmd


def _sha256(download: dict[str, Any]) -> str:
    archive = download.get("archive_info") or {}
    hashes = archive.get("hashes") or {}
    if "sha256" in hashes:
        return str(hashes["sha256"])
    legacy = str(archive.get("hash") or "")
    return legacy.removeprefix("sha256=") if legacy.startswith("sha256=") else ""


def resolved(report: dict[str, Any]) -> tuple[ResolvedPackage, ...]:
    """What pip installed, from its ``--report`` JSON, sorted by name."""
    out = []
    for item in report.get("install") or ():
        meta = item.get("metadata") or {}
        out.append(
            ResolvedPackage(
                name=str(meta.get("name", "")),
                version=str(meta.get("version", "")),
                sha256=_sha256(item.get("download_info") or {}),
                requested=bool(item.get("requested")),
            )
        )
    return tuple(sorted(out, key=lambda p: p.name.lower()))


def read_report(path: Path) -> tuple[ResolvedPackage, ...]:
    return resolved(json.loads(path.read_text())) if path.is_file() else ()
