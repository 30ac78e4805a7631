"""What people type on the command line, turned into what the API takes."""

from __future__ import annotations

import argparse
import io
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controlplane.cli import commands, inputs
from controlplane.cli import main as modelctl
from controlplane.domain import scaling
from controlplane.domain.scaling import Autoscaling
from controlplane.domain.types import Resources


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


# ---- autoscaling flags ----------------------------------------------------------------------


def test_no_autoscaling_flag_is_no_autoscaling() -> None:
    assert inputs.autoscaling(None, None, None, None, None) is None


def test_autoscaling_flags_with_their_defaults() -> None:
    assert inputs.autoscaling(None, 4, None, None, None) == Autoscaling(
        min_replicas=1,
        max_replicas=4,
        target_ongoing_requests=scaling.DEFAULT_TARGET,
        upscale_delay_s=scaling.DEFAULT_UPSCALE_DELAY_S,
        downscale_delay_s=scaling.DEFAULT_DOWNSCALE_DELAY_S,
    )
    assert inputs.autoscaling(0, 8, 3.5, "30s", "10m") == Autoscaling(0, 8, 3.5, 30.0, 600.0)
    assert inputs.autoscaling(2, 3, None, "1.5", None) == Autoscaling(
        2, 3, upscale_delay_s=1.5, downscale_delay_s=scaling.DEFAULT_DOWNSCALE_DELAY_S
    )
    # The bounds are the server's to judge (its INVALID_ARGUMENT names the field).
    assert inputs.autoscaling(3, 2, None, None, None) == Autoscaling(3, 2)


@pytest.mark.parametrize(
    "given",
    [(2, None, None, None, None), (None, None, 4.0, None, None), (None, None, None, "1m", None),
     (None, None, None, None, "5m")],
)  # fmt: skip
def test_autoscaling_needs_max_replicas(
    given: tuple[int | None, int | None, float | None, str | None, str | None],
) -> None:
    with pytest.raises(inputs.UsageError, match="needs --max-replicas"):
        inputs.autoscaling(*given)


@pytest.mark.parametrize(
    ("up", "down", "flag"),
    [("soon", None, "--upscale-delay"), (None, "1h30m", "--downscale-delay")],
)
def test_bad_autoscaling_delays_name_the_flag(up: str | None, down: str | None, flag: str) -> None:
    with pytest.raises(inputs.UsageError, match=rf"{flag} .*30s, 10m, 1h"):
        inputs.autoscaling(None, 3, None, up, down)


def _flags(*argv: str) -> argparse.Namespace:
    return modelctl.parser().parse_args(["deploy", "m", "--build", "1", *argv])


BASE = Resources(replicas=2, cpus=1.0, memory_mib=512, autoscaling=Autoscaling(1, 5))


@pytest.mark.parametrize(
    ("argv", "base", "expected"),
    [
        ([], BASE, None),  # nothing given: the active deployment's, as it is
        ([], None, Resources()),
        (["--max-replicas", "4"], None, Resources(replicas=0, autoscaling=Autoscaling(1, 4))),
        (
            ["--min-replicas", "0", "--max-replicas", "4", "--replicas", "2",
             "--target-ongoing-requests", "8", "--upscale-delay", "10s",
             "--downscale-delay", "2m"],
            None,
            Resources(replicas=2, autoscaling=Autoscaling(0, 4, 8.0, 10.0, 120.0)),
        ),
        # Autoscaling flags set it afresh: the count to start with is then the default.
        (["--max-replicas", "9"], BASE,
         Resources(replicas=0, cpus=1.0, memory_mib=512, autoscaling=Autoscaling(1, 9))),
        # Other flags keep the active deployment's autoscaling; --replicas: to start with.
        (["--cpus", "2", "--replicas", "3"], BASE,
         Resources(replicas=3, cpus=2.0, memory_mib=512, autoscaling=Autoscaling(1, 5))),
        # --no-autoscaling: a fixed count again, --replicas or what it starts with.
        (["--no-autoscaling"], BASE, Resources(replicas=2, cpus=1.0, memory_mib=512)),
        (["--no-autoscaling", "--replicas", "4"], BASE,
         Resources(replicas=4, cpus=1.0, memory_mib=512)),
        (["--no-autoscaling"], Resources(replicas=0, autoscaling=Autoscaling(3, 5)),
         Resources(replicas=3)),
    ],
)  # fmt: skip
def test_resource_flags_over_the_active_deployments(
    argv: list[str], base: Resources | None, expected: Resources | None
) -> None:
    assert commands._resources(_flags(*argv), base) == expected


def test_no_autoscaling_with_autoscaling_flags_is_a_usage_error() -> None:
    with pytest.raises(inputs.UsageError, match="choose one"):
        commands._resources(_flags("--no-autoscaling", "--max-replicas", "3"), None)


@pytest.mark.parametrize(
    "argv",
    [["deploy", "m", "--build", "1"], ["build", "d", "-m", "m", "--file", "f", "--function", "g"],
     ["restart", "m"], ["stop", "m"]],
)  # fmt: skip
def test_dry_run_and_wait_for_capacity_flags(argv: list[str]) -> None:
    args = modelctl.parser().parse_args(argv)
    assert args.dry_run is False
    assert modelctl.parser().parse_args([*argv, "--dry-run"]).dry_run is True
    if argv[0] == "stop":  # a stop needs no room
        assert not hasattr(args, "wait_for_capacity")
        with pytest.raises(SystemExit):
            modelctl.parser().parse_args([*argv, "--wait-for-capacity"])
    else:
        assert modelctl.parser().parse_args([*argv, "--wait-for-capacity"]).wait_for_capacity
