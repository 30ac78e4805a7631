"""Zip archives of model code: inspected before anything is extracted, extracted safely.

A source zip is rejected (``UnsafeArchive``) when it is not a zip, when an entry
would land outside the extraction folder (absolute, drive letter, backslash,
``..``), when an entry is a symlink or another special file, or when it is a zip
bomb (too many entries, or too many bytes once unpacked). ``safe_extract`` checks
first, then writes each file itself, never through an existing path and never
more bytes than the archive declared.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_UNCOMPRESSED_BYTES = 1024 * 1024 * 1024

# What zip_directory leaves out: caches, VCS metadata, virtual environments, bytecode.
EXCLUDED_DIRS = frozenset(
    {"__pycache__", ".git", ".hg", ".svn", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
)
EXCLUDED_SUFFIXES = (".pyc", ".pyo")
EXCLUDED_FILES = frozenset({".DS_Store"})

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
_DRIVE = re.compile(r"^[A-Za-z]:")
_COPY_CHUNK = 1024 * 1024


class UnsafeArchive(ValueError):
    """The archive must not be extracted; the message names the offending entry."""


def inspect_zip(path: Path, max_entries: int, max_uncompressed_bytes: int) -> list[str]:
    """Checks a zip without extracting it; returns its regular files' normalised names, sorted."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
        raise UnsafeArchive(f"not a valid zip archive: {e}") from None
    if len(infos) > max_entries:
        raise UnsafeArchive(f"too many entries: {len(infos)} (the limit is {max_entries})")
    return _check_entries(infos, max_uncompressed_bytes)


def _check_entries(infos: list[zipfile.ZipInfo], max_uncompressed_bytes: int) -> list[str]:
    files: set[str] = set()
    total = 0
    for info in infos:
        name = _check_entry(info)
        if info.is_dir():
            continue
        if name in files:
            raise UnsafeArchive(f"entry {info.filename!r} appears more than once")
        files.add(name)
        total += info.file_size
        if total > max_uncompressed_bytes:
            raise UnsafeArchive(
                f"unpacks to more than {max_uncompressed_bytes} bytes "
                f"(limit reached at entry {info.filename!r})"
            )
    _check_no_file_folder_clash(files, infos)
    return sorted(files)


def _check_no_file_folder_clash(files: set[str], infos: list[zipfile.ZipInfo]) -> None:
    folders = {posixpath.normpath(i.filename) for i in infos if i.is_dir()}
    for name in files:
        parts = name.split("/")
        folders.update("/".join(parts[:n]) for n in range(1, len(parts)))
    clash = sorted(files & folders)
    if clash:
        raise UnsafeArchive(f"entry {clash[0]!r} is both a file and a folder")


def _check_entry(info: zipfile.ZipInfo) -> str:
    """The entry's normalised name, if it is safe to extract."""
    name = info.filename
    problem = _path_problem(name)
    if problem:
        raise UnsafeArchive(f"entry {name!r} {problem}")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise UnsafeArchive(f"entry {name!r} is a symlink")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchive(f"entry {name!r} is not a regular file or folder")
    if info.flag_bits & 0x1:
        raise UnsafeArchive(f"entry {name!r} is encrypted")
    return posixpath.normpath(name)


def _path_problem(name: str) -> str:
    """Why ``name`` is not a safe relative path, or '' when it is."""
    if not name or name in (".", "./"):
        return "has an empty name"
    if "\0" in name:
        return "contains a NUL character"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/") or _DRIVE.match(name):
        return "is an absolute path"
    if ".." in name.split("/"):
        return "contains a '..' component"
    return ""


def check_member_path(file_path: str) -> str:
    """Validates a build's ``file_path``: a relative path to a .py file; returns it normalised."""
    problem = _path_problem(file_path)
    if problem:
        raise ValueError(f"file_path {file_path!r} {problem}")
    normalised = posixpath.normpath(file_path)
    if not normalised.endswith(".py") or posixpath.basename(normalised) == ".py":
        raise ValueError(f"file_path {file_path!r} must name a .py file")
    return normalised


def safe_extract(
    path: Path,
    dest: Path,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES,
) -> list[str]:
    """Inspects ``path``, then extracts its regular files under ``dest``; returns their names."""
    files = inspect_zip(path, max_entries, max_uncompressed_bytes)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    budget = [max_uncompressed_bytes]
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.is_dir():
                _extract_one(zf, info, root, budget)
    return files


def _extract_one(zf: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path, budget: list[int]) -> None:
    name = posixpath.normpath(info.filename)
    target = root.joinpath(*name.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.parent.resolve().is_relative_to(root):
        raise UnsafeArchive(f"entry {info.filename!r} would be written outside the destination")
    # O_EXCL: never overwrite, never follow a link that is already there.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with zf.open(info) as src, os.fdopen(fd, "wb") as out:
            _copy_limited(src, out, info, budget)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise UnsafeArchive(f"entry {info.filename!r} is corrupt: {e}") from None


def _copy_limited(src: IO[bytes], out: IO[bytes], info: zipfile.ZipInfo, budget: list[int]) -> None:
    """Copies at most the entry's declared size (and the remaining budget), whatever it holds."""
    left = info.file_size
    while chunk := src.read(_COPY_CHUNK):
        left -= len(chunk)
        budget[0] -= len(chunk)
        if left < 0 or budget[0] < 0:
            raise UnsafeArchive(f"entry {info.filename!r} unpacks to more than it declares")
        out.write(chunk)


def zip_directory(src_dir: Path, out: Path) -> list[str]:
    """Zips ``src_dir`` deterministically (same files, same bytes); returns the names stored.

    Entries are sorted, timestamps and permissions fixed; caches, VCS folders,
    virtual environments and bytecode are left out, and so are symlinked folders.
    """
    if not src_dir.is_dir():
        raise ValueError(f"{src_dir} is not a folder")
    out_resolved = out.resolve()
    files = [p for p in _walk(src_dir) if p.resolve() != out_resolved]
    if not files:
        raise ValueError(f"{src_dir} holds no files to zip")
    tmp = out.with_name(out.name + ".tmp")
    names: list[str] = []
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for file in files:
                name = file.relative_to(src_dir).as_posix()
                zf.writestr(_fixed_info(name), file.read_bytes())
                names.append(name)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return names


def _walk(folder: Path) -> Iterator[Path]:
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.is_dir():
            if entry.name not in EXCLUDED_DIRS and not entry.is_symlink():
                yield from _walk(entry)
        elif entry.is_file() and _included_file(entry.name):
            yield entry


def _included_file(name: str) -> bool:
    return name not in EXCLUDED_FILES and not name.endswith(EXCLUDED_SUFFIXES)


def _fixed_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # unix, wherever it runs
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info
