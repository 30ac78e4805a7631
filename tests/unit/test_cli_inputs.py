"""What people type on the command line, turned into what the API takes."""

from __future__ import annotations

import io
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controlplane.cli import inputs


@pytest.mark.parametrize(
    ("text", "mib"),
    [("2GiB", 2048), ("2G", 2048), ("512Mi", 512), ("512MiB", 512), ("1.5g", 1536), ("300", 300),
     ("0", 0), ("100KiB", 1), ("1TiB", 1024 * 1024)],
)  # fmt: skip
def test_memory_sizes(text: str, mib: int) -> None:
    assert inputs.memory_mib(text) == mib


@pytest.mark.parametrize("text", ["", "lots", "2 parsecs", "-1G", "1.2.3G", "2XB"])
def test_bad_memory_sizes_say_how_to_write_them(text: str) -> None:
    with pytest.raises(inputs.UsageError, match="2GiB"):
        inputs.memory_mib(text)


def test_environment_pairs() -> None:
    assert inputs.environment(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    assert inputs.environment(None) == {}
    for bad in ("NOEQUALS", "=value"):
        with pytest.raises(inputs.UsageError, match="NAME=value"):
            inputs.environment([bad])


def test_names_from_ids_and_full_names() -> None:
    assert inputs.model_name("demo", "iris") == "projects/demo/models/iris"
    assert inputs.model_name("projects/demo", "iris") == "projects/demo/models/iris"
    assert inputs.model_name("x", "projects/p/models/m") == "projects/p/models/m"
    with pytest.raises(inputs.UsageError):
        inputs.model_name("demo", "models/iris")
    m = "projects/p/models/m"
    assert inputs.child_name(m, "builds", "3") == f"{m}/builds/3"
    assert inputs.child_name(m, "builds", f"{m}/builds/7") == f"{m}/builds/7"
    with pytest.raises(inputs.UsageError):
        inputs.child_name(m, "builds", "latest")


def test_zip_directory_keeps_code_and_leaves_caches_and_links_out(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "model.py").write_text("def predict(b):\n    return b\n")
    (tmp_path / "pkg" / "util.py").write_text("X = 1\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "link.py").symlink_to(tmp_path / "model.py")
    with zipfile.ZipFile(io.BytesIO(inputs.zip_directory(tmp_path))) as z:
        assert sorted(z.namelist()) == ["model.py", "pkg/util.py"]
        assert z.read("pkg/util.py") == b"X = 1\n"


def test_zip_of_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(inputs.UsageError, match="no files"):
        inputs.zip_directory(tmp_path)
    with pytest.raises(inputs.UsageError, match="not a directory"):
        inputs.zip_directory(tmp_path / "missing")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("1h", 3600), ("1.5h", 5400), ("2d", 172800), ("45", 45),
     (" 2s ", 2), ("0.5", 0.5)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert inputs.duration_s(text, "--window") == seconds


@pytest.mark.parametrize("text", ["", "lots", "1w", "-1m", "1h30m", "m"])
def test_bad_durations_name_the_flag_and_say_how_to_write_them(text: str) -> None:
    with pytest.raises(inputs.UsageError, match=r"--window .*30s, 10m, 1h"):
        inputs.duration_s(text, "--window")


def test_since_a_duration_ago_or_a_time() -> None:
    now = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
    assert inputs.since("10m", now) == now - timedelta(minutes=10)
    assert inputs.since("2025-01-31T11:00:00+00:00") == datetime(2025, 1, 31, 11, tzinfo=UTC)
    assert inputs.since("2025-01-31T13:00:00+01:00") == now
    local = datetime(2025, 1, 31, 12, 0).astimezone()  # no zone: local time
    assert inputs.since("2025-01-31T12:00") == local.astimezone(UTC)
    assert inputs.since("2025-01-31 12:00").tzinfo == UTC
    for bad in ("yesterday", "10 minutes", "2025-13-01"):
        with pytest.raises(inputs.UsageError, match="--since"):
            inputs.since(bad)
