"""Turning what people type into what the API takes: names, sizes, environments, zips."""

from __future__ import annotations

import io
import re
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from controlplane.config import ADMIN_TOKEN_FILE, DEFAULT_DATA_DIR
from controlplane.domain import scaling
from controlplane.domain.scaling import Autoscaling

MAX_ZIP_ENTRIES = 10_000
_SKIP_DIRS = {"__pycache__", ".git", ".venv", "venv", ".mypy_cache", ".pytest_cache"}
_UNITS = {"": 1.0, "k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0 * 1024}


class UsageError(ValueError):
    """What the user typed cannot work; the message says what to type instead."""


def project_name(project: str) -> str:
    return project if project.startswith("projects/") else f"projects/{project}"


def model_name(project: str, model: str) -> str:
    """``iris`` -> ``projects/<project>/models/iris``; full names pass through."""
    if model.startswith("projects/"):
        return model
    if "/" in model:
        raise UsageError(f"{model!r}: give a model id (iris) or a full name (projects/p/models/m)")
    return f"{project_name(project)}/models/{model}"


def child_name(model: str, collection: str, ref: str) -> str:
    """``3`` -> ``<model>/builds/3``; full names pass through."""
    if ref.startswith("projects/"):
        return ref
    if not ref.isdigit():
        raise UsageError(f"{ref!r}: give a number (3) or a full name ({model}/{collection}/3)")
    return f"{model}/{collection}/{int(ref)}"


def memory_mib(text: str) -> int:
    """``2GiB``, ``512Mi``, ``1.5G``, ``300`` (MiB) -> MiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([kmgtKMGT])[iI]?[bB]?)?\s*", text)
    if m is None:
        raise UsageError(f"memory {text!r}: write it like 512MiB, 2GiB or 1.5G")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    return max(round(value), 1 if value > 0 else 0)


def environment(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {pair!r}: write it as NAME=value")
        out[key] = value
    return out


def zip_directory(directory: Path) -> bytes:
    """Zips the model's code: regular files only, relative paths, caches left out."""
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    buf = io.BytesIO()
    count = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(directory.rglob("*")):
            rel = path.relative_to(directory)
            if any(part in _SKIP_DIRS for part in rel.parts) or path.suffix == ".pyc":
                continue
            if path.is_symlink() or not path.is_file():
                continue
            count += 1
            if count > MAX_ZIP_ENTRIES:
                raise UsageError(f"{directory}: more than {MAX_ZIP_ENTRIES} files")
            z.write(path, rel.as_posix())
    if count == 0:
        raise UsageError(f"{directory}: no files to upload")
    return buf.getvalue()


def empty_directory(path: str) -> Path:
    """A directory to write into: absent (created later) or empty."""
    dest = Path(path)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest} exists and is not an empty directory")
    return dest


DEFAULT_TOKEN_FILE = DEFAULT_DATA_DIR / ADMIN_TOKEN_FILE
_TTL = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_TTL_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def token(explicit: str, file: str) -> str:
    """The token to send: --token, else the contents of --token-file, else the admin
    token `modelctl serve` wrote in ./.modelctl at its first start, if there is one."""
    if explicit:
        return explicit.strip()
    path = Path(file) if file else DEFAULT_TOKEN_FILE
    if not file and not path.is_file():
        return ""
    try:
        return path.read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read the token file {path}: {e.strerror}") from e


def ttl_seconds(text: str) -> float | None:
    """'90m' -> 5400; '' -> None (never expires)."""
    if not text:
        return None
    found = _TTL.match(text.strip())
    if found is None:
        raise UsageError(f"--ttl {text!r}: use a number and a unit, e.g. 3600s, 90m, 12h, 30d")
    return float(found.group(1)) * _TTL_UNIT[found.group(2)]


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def duration_s(text: str, flag: str) -> float:
    """'30s' -> 30, '10m' -> 600, '1h' -> 3600, '1.5' -> 1.5 (seconds)."""
    found = _DURATION.match(text.strip())
    if found is None:
        raise UsageError(f"{flag} {text!r}: use a number and a unit, e.g. 30s, 10m, 1h")
    return float(found.group(1)) * _TTL_UNIT[found.group(2) or "s"]


def since(text: str, now: datetime | None = None) -> datetime:
    """--since: a duration back from now ('10m') or a time ('2025-01-31T12:00', local time
    unless it says its zone)."""
    if _DURATION.match(text.strip()):
        return (now or datetime.now(UTC)) - timedelta(seconds=duration_s(text, "--since"))
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--since {text!r}: a duration (10m, 2h) or a time (2025-01-31T12:00:00)"
        ) from None
    return (value if value.tzinfo else value.astimezone()).astimezone(UTC)


def percent(text: str, flag: str) -> float:
    """'1%' -> 0.01, '0.5%' -> 0.005, '0.02' -> 0.02 (a share)."""
    value = text.strip()
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: use a percent, e.g. 1%") from None
    if not 0 <= share <= 1:
        raise UsageError(f"{flag} {text!r}: must be within 0% and 100%")
    return share


def milliseconds(text: str, flag: str) -> float:
    """'250ms' -> 250, '1.5s' -> 1500, '250' -> 250."""
    value = text.strip()
    try:
        if value.endswith("ms"):
            return float(value[:-2])
        if value.endswith("s"):
            return float(value[:-1]) * 1000
        return float(value)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: use e.g. 250ms or 1.5s") from None


def steps(text: str) -> tuple[int, ...]:
    """'10,50,100' -> (10, 50, 100)."""
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(
            f"--canary {text!r}: percents separated by commas, e.g. 10,50,100"
        ) from None


def weights(model: str, pairs: list[str]) -> dict[str, int]:
    """['4=90', '5=10'] -> {build name: percent}."""
    out: dict[str, int] = {}
    for pair in pairs:
        build, sep, pct = pair.partition("=")
        if not sep or not pct.strip().rstrip("%").isdigit():
            raise UsageError(f"{pair!r}: use BUILD=PERCENT, e.g. 4=90 5=10")
        out[child_name(model, "builds", build.strip())] = int(pct.strip().rstrip("%"))
    return out


def autoscaling(
    min_replicas: int | None,
    max_replicas: int | None,
    target: float | None,
    upscale_delay: str | None,
    downscale_delay: str | None,
) -> Autoscaling | None:
    """--min-replicas, --max-replicas, --target-ongoing-requests, --upscale-delay and
    --downscale-delay: None when none is given; any of them needs --max-replicas. What is
    not given takes the defaults (1 replica at least, Ray Serve's target and delays); the
    bounds themselves are the server's to judge."""
    given = (min_replicas, max_replicas, target, upscale_delay, downscale_delay)
    if all(v is None for v in given):
        return None
    if max_replicas is None:
        raise UsageError(
            "autoscaling (--min-replicas, --target-ongoing-requests, --upscale-delay, "
            "--downscale-delay) needs --max-replicas: the most replicas it may start"
        )
    return Autoscaling(
        min_replicas=1 if min_replicas is None else min_replicas,
        max_replicas=max_replicas,
        target_ongoing_requests=scaling.DEFAULT_TARGET if target is None else target,
        upscale_delay_s=scaling.DEFAULT_UPSCALE_DELAY_S
        if upscale_delay is None
        else duration_s(upscale_delay, "--upscale-delay"),
        downscale_delay_s=scaling.DEFAULT_DOWNSCALE_DELAY_S
        if downscale_delay is None
        else duration_s(downscale_delay, "--downscale-delay"),
    )
