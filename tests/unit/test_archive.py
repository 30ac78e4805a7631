"""Zip safety: every rejection, the happy path, file_path checks, deterministic zips."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest

from workers.archive import (
    UnsafeArchive,
    check_member_path,
    inspect_zip,
    safe_extract,
    zip_directory,
)

LIMITS = (100, 1024 * 1024)


def make_zip(path: Path, entries: dict[str, bytes], modes: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if modes and name in modes:
                info.external_attr = modes[name] << 16
            zf.writestr(info, data)
    return path


def test_happy_path_lists_regular_files_and_extracts(tmp_path: Path) -> None:
    src = make_zip(
        tmp_path / "ok.zip",
        {"model.py": b"x = 1\n", "pkg/": b"", "pkg/util.py": b"y = 2\n", "./data/a.txt": b"a"},
    )
    assert inspect_zip(src, *LIMITS) == ["data/a.txt", "model.py", "pkg/util.py"]
    dest = tmp_path / "out"
    assert safe_extract(src, dest) == ["data/a.txt", "model.py", "pkg/util.py"]
    assert (dest / "model.py").read_bytes() == b"x = 1\n"
    assert (dest / "pkg" / "util.py").read_bytes() == b"y = 2\n"
    assert (dest / "data" / "a.txt").read_bytes() == b"a"


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("/etc/evil.py", "absolute"),
        ("C:/evil.py", "absolute"),
        ("c:evil.py", "absolute"),
        ("..\\evil.py", "backslash"),
        ("\\\\server\\share\\evil.py", "backslash"),
        ("../evil.py", "'..'"),
        ("a/../../evil.py", "'..'"),
        ("a/b/..", "'..'"),
    ],
)
def test_rejects_paths_outside(tmp_path: Path, name: str, words: str) -> None:
    src = make_zip(tmp_path / "bad.zip", {"model.py": b"", name: b"evil"})
    with pytest.raises(UnsafeArchive, match=words) as caught:
        inspect_zip(src, *LIMITS)
    assert repr(name) in str(caught.value), "the message names the entry"
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchive):
        safe_extract(src, dest)
    assert not dest.exists(), "nothing was extracted"
    assert not (tmp_path / "evil.py").exists()


def test_rejects_symlinks(tmp_path: Path) -> None:
    src = make_zip(
        tmp_path / "link.zip",
        {"model.py": b"", "link": b"/etc/passwd"},
        modes={"link": stat.S_IFLNK | 0o777},
    )
    with pytest.raises(UnsafeArchive, match="'link' is a symlink"):
        inspect_zip(src, *LIMITS)
    with pytest.raises(UnsafeArchive):
        safe_extract(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rejects_special_files(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "fifo.zip", {"pipe": b""}, modes={"pipe": stat.S_IFIFO | 0o644})
    with pytest.raises(UnsafeArchive, match="'pipe' is not a regular file"):
        inspect_zip(src, *LIMITS)


@pytest.mark.parametrize("data", [b"this is not a zip file", b"", b"PK\x03\x04 truncated"])
def test_rejects_what_is_not_a_zip(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.zip"
    path.write_bytes(data)
    with pytest.raises(UnsafeArchive, match="not a valid zip"):
        inspect_zip(path, *LIMITS)


def test_rejects_too_many_entries(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "many.zip", {f"f{i}.py": b"" for i in range(11)})
    assert len(inspect_zip(src, 11, 1024)) == 11
    with pytest.raises(UnsafeArchive, match=r"too many entries: 11 \(the limit is 10\)"):
        inspect_zip(src, 10, 1024)


def test_rejects_zip_bombs(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "bomb.zip", {"a.py": b"", "zeros.bin": b"\0" * 200_000})
    assert src.stat().st_size < 2_000, "it compresses well"
    assert inspect_zip(src, 10, 200_000) == ["a.py", "zeros.bin"]
    with pytest.raises(UnsafeArchive, match=r"more than 199999 bytes.*'zeros\.bin'"):
        inspect_zip(src, 10, 199_999)
    with pytest.raises(UnsafeArchive):
        safe_extract(src, tmp_path / "out", 10, 199_999)
    assert not (tmp_path / "out").exists()


def test_extraction_stops_at_the_declared_size(tmp_path: Path) -> None:
    """An entry whose header understates its size never writes more than it declares."""
    src = make_zip(tmp_path / "liar.zip", {"big.bin": b"x" * 5000})
    data = bytearray(src.read_bytes())
    for offset in _size_fields(bytes(data), "big.bin"):
        data[offset : offset + 4] = (100).to_bytes(4, "little")
    src.write_bytes(bytes(data))
    assert inspect_zip(src, *LIMITS) == ["big.bin"]
    with pytest.raises(UnsafeArchive, match=r"'big\.bin'"):
        safe_extract(src, tmp_path / "out")
    written = tmp_path / "out" / "big.bin"
    assert not written.exists() or written.stat().st_size <= 100


def _size_fields(data: bytes, name: str) -> list[int]:
    """Offsets of the uncompressed-size fields of ``name`` (local and central headers)."""
    encoded = name.encode()
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    assert data[local + 30 : local + 30 + len(encoded)] == encoded
    assert data[central + 46 : central + 46 + len(encoded)] == encoded
    return [local + 22, central + 24]


def test_rejects_duplicates_and_file_folder_clashes(tmp_path: Path) -> None:
    dup = tmp_path / "dup.zip"
    with zipfile.ZipFile(dup, "w") as zf:
        zf.writestr("model.py", "a")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("model.py", "b")
    with pytest.raises(UnsafeArchive, match=r"'model\.py' appears more than once"):
        inspect_zip(dup, *LIMITS)
    clash = make_zip(tmp_path / "clash.zip", {"pkg": b"file", "pkg/x.py": b""})
    with pytest.raises(UnsafeArchive, match="'pkg' is both a file and a folder"):
        inspect_zip(clash, *LIMITS)


def test_extract_never_overwrites(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "ok.zip", {"model.py": b"new"})
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "model.py").symlink_to(tmp_path / "elsewhere.py")
    with pytest.raises(FileExistsError):
        safe_extract(src, dest)
    assert not (tmp_path / "elsewhere.py").exists()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("model.py", "model.py"),
        ("./model.py", "model.py"),
        ("pkg/model.py", "pkg/model.py"),
        ("pkg//sub/./model.py", "pkg/sub/model.py"),
    ],
)
def test_member_path_accepts_and_normalises(given: str, expected: str) -> None:
    assert check_member_path(given) == expected


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ("", "empty"),
        ("../model.py", r"'\.\.'"),
        ("pkg/../../model.py", r"'\.\.'"),
        ("pkg/../model.py", r"'\.\.'"),
        ("/model.py", "absolute"),
        ("C:/model.py", "absolute"),
        ("pkg\\model.py", "backslash"),
        ("model.txt", r"\.py file"),
        ("model", r"\.py file"),
        ("pkg/", r"\.py file"),
        (".py", r"\.py file"),
        ("a\0.py", "NUL"),
    ],
)
def test_member_path_rejects(given: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as caught:
        check_member_path(given)
    assert str(caught.value).startswith("file_path ")


def _tree(root: Path) -> None:
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / "model.py").write_text("def predict(body):\n    return body\n")
    (root / "requirements.txt").write_text("six\n")
    (root / "pkg" / "util.py").write_text("X = 1\n")
    (root / "pkg" / "util.pyc").write_bytes(b"\0")
    (root / "pkg" / "__pycache__" / "util.cpython-311.pyc").write_bytes(b"\0")
    (root / ".git" / "HEAD").write_text("ref\n")
    (root / ".venv" / "lib" / "x.py").write_text("")


def test_zip_directory_is_deterministic_and_skips_junk(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _tree(src)
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    names = zip_directory(src, first)
    assert names == ["model.py", "pkg/util.py", "requirements.txt"]
    for path in src.rglob("*"):  # new times and permissions change nothing
        path.touch()
    (src / "model.py").chmod(0o755)
    assert zip_directory(src, second) == names
    assert first.read_bytes() == second.read_bytes()
    assert inspect_zip(first, *LIMITS) == names
    with zipfile.ZipFile(first) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_zip_directory_can_write_inside_the_folder(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text("")
    out = tmp_path / "model.zip"
    assert zip_directory(tmp_path, out) == ["model.py"]
    assert zip_directory(tmp_path, out) == ["model.py"], "the zip itself is never included"


def test_zip_directory_refuses_empty_or_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no files"):
        zip_directory(tmp_path, tmp_path.parent / f"{tmp_path.name}.zip")
    with pytest.raises(ValueError, match="not a folder"):
        zip_directory(tmp_path / "missing", tmp_path / "x.zip")
