"""Builds: an uploaded zip becomes an immutable, content-addressed artifact folder.

``run_build`` extracts the source into a fresh staging folder (under
``<artifacts_dir>/.staging``, so the final move is an atomic rename on one
filesystem), installs ``requirements.txt`` into ``<staging>/.cp_site`` with this
very interpreter, imports ``file_path`` in a clean subprocess to check that
``function_name`` is callable, and renames staging to ``<artifacts_dir>/<hex>``.

The check (``workers.import_check``), a replica and the exported image all load the
model with ``workers.loader``, so what passes the check loads the same way when served.
A failed build never raises: it returns ``BuildOutcome(ok=False, error=...)``
with one line naming the cause, and leaves nothing behind but its log.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workers import build_cache, import_check, loader, process, requirements, runtime
from workers.archive import (
    DEFAULT_MAX_UNCOMPRESSED_BYTES,
    UnsafeArchive,
    check_member_path,
    safe_extract,
)
from workers.backend import BuildOutcome, BuildSpec, ResolvedPackage

SITE_DIR = loader.SITE_DIR  # where requirements are installed, inside the artifact
MANIFEST = ".cp_artifact.json"  # what the artifact's digest was computed from
STAGING_DIR = ".staging"  # under artifacts_dir; content-addressed names are hex, no clash
PIP_REPORT = ".cp_pip_report.json"  # pip's --report, read into the manifest, not kept
MiB = 1024 * 1024
MAX_ERROR_CHARS = 500
_KEEP_LINES = 1000  # of a step's output, for its error message (the log has them all)


class BuildFailed(Exception):
    """A build failed for the reason in the message (one line, shown to users)."""


# --------------------------------------------------------------------------- log


class BuildLog:
    """The build log: timestamped lines, appended and flushed one by one."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self.full = False  # a line did not fit on the disk: later lines are dropped

    def line(self, text: str) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with self._lock:
            if self.full:
                return
            try:
                self._file.write(f"{stamp} {text.rstrip()}\n")
                self._file.flush()
            except OSError as e:
                if not disk_full(e):
                    raise
                self.full = True  # the build goes on; its outcome says the disk is full

    def close(self) -> None:
        with contextlib.suppress(OSError):  # what could not be flushed is lost
            self._file.close()


def disk_full(error: BaseException) -> bool:
    """Whether ``error``, or one it came from, is the disk being full (or over quota)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# --------------------------------------------------------------------------- processes


@dataclass
class _Finished:
    returncode: int
    stdout: str
    lines: list[str] = field(default_factory=list)  # what went to the log


def _run_logged(
    cmd: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    log: BuildLog,
    prefix: str,
    deadline: process.Deadline,
    during: str,
    capture_stdout: bool = False,
) -> _Finished:
    """Runs ``cmd`` (``workers.process``: killed with its group at the deadline or on
    cancel), streaming its output into the log; stdout is kept when ``capture_stdout``."""
    lines: deque[str] = deque(maxlen=_KEEP_LINES)
    captured: list[str] = []

    def to_log(text: str) -> None:
        lines.append(text)
        log.line(f"{prefix} | {text}")

    returncode = process.run(
        cmd,
        cwd=cwd,
        env=env,
        output=to_log,
        stdout=captured.append if capture_stdout else None,
        deadline=deadline,
        during=during,
    )
    return _Finished(returncode, "\n".join(captured), list(lines))


def _clean_env() -> dict[str, str]:
    """A minimal environment for the import check: no PYTHON*, no stray settings."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
    return {k: os.environ[k] for k in keep if k in os.environ}


def _pip_env() -> dict[str, str]:
    """pip keeps its configuration (index, proxies, certificates), never a prompt."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PIP_USER", "PIP_PREFIX", "PIP_TARGET", "PIP_ROOT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PIP_NO_INPUT"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- steps


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_ERROR_CHARS else flat[: MAX_ERROR_CHARS - 3] + "..."


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _extract(spec: BuildSpec, staging: Path, log: BuildLog) -> str:
    """Extracts the source; returns the normalised file_path, present in it."""
    try:
        file_path = check_member_path(spec.file_path)
    except ValueError as e:
        raise BuildFailed(str(e)) from None
    try:  # a bomb guard (the upload was checked against the server's own limit): a build
        # may be as big as its size limit allows, whose check after the steps says so
        limit = max(spec.max_size_bytes, DEFAULT_MAX_UNCOMPRESSED_BYTES)
        files = safe_extract(spec.source_zip, staging, max_uncompressed_bytes=limit)
    except UnsafeArchive as e:
        raise BuildFailed(f"rejected source archive: {e}") from None
    log.line(f"extracted {len(files)} files")
    if file_path not in files:
        raise BuildFailed(f"file_path {file_path!r} not found in the source")
    return file_path


def _install_requirements(
    staging: Path, log: BuildLog, deadline: process.Deadline
) -> tuple[ResolvedPackage, ...]:
    """Installs the model's requirements into the artifact; returns what pip resolved."""
    req = requirements.find(staging)
    if req is None:
        log.line(f"no {requirements.REQUIREMENTS}: nothing to install")
        return ()
    if req.locked:
        try:
            requirements.check_lock((staging / req.file).read_text(errors="replace"))
        except requirements.LockError as e:
            raise BuildFailed(str(e)) from None
        log.line(f"{req.file}: every requirement pinned; installing exactly these (--no-deps)")
    report = staging / PIP_REPORT
    cmd = requirements.pip_install(sys.executable, staging / SITE_DIR, req, report)
    log.line(f"running: {' '.join(cmd)}")
    done = _run_logged(
        cmd,
        cwd=staging,
        env=_pip_env(),
        log=log,
        prefix="pip",
        deadline=deadline,
        during="installing requirements",
    )
    if done.returncode != 0:
        raise BuildFailed(f"requirement failed: {_pip_error(done.lines, done.returncode)}")
    try:
        packages = requirements.read_report(report)
    finally:
        report.unlink(missing_ok=True)
    _log_packages(log, packages)
    return packages


def _log_packages(log: BuildLog, packages: Iterable[ResolvedPackage]) -> None:
    for p in packages:
        log.line(f"resolved {p.name}=={p.version}" + (f" sha256:{p.sha256}" if p.sha256 else ""))


def _pip_error(lines: Iterable[str], returncode: int) -> str:
    """pip's own last ERROR line, the most specific one, without its prefix."""
    errors = [ln.removeprefix("ERROR:").strip() for ln in lines if ln.startswith("ERROR:")]
    errors = [e for e in errors if e]
    return errors[-1] if errors else f"pip exited with status {returncode}"


def _check_import(
    staging: Path, file_path: str, function_name: str, log: BuildLog, deadline: process.Deadline
) -> None:
    """Loads the model in a fresh interpreter, as a replica will (``workers.import_check``)."""
    root = str(staging.resolve())
    check = ["-m", import_check.__name__, root, file_path, function_name]
    done = _run_logged(
        [sys.executable, "-I", "-B", *check],
        cwd=staging,
        env=_clean_env(),
        log=log,
        prefix="import",
        deadline=deadline,
        during=f"importing {file_path}",
        capture_stdout=True,
    )
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        last = done.lines[-1] if done.lines else "no output"
        raise BuildFailed(
            f"importing {file_path} ended with status {done.returncode} and no result: {last}"
        ) from None
    if not report.get("ok"):
        raise BuildFailed(str(report.get("error") or f"importing {file_path} failed"))


def _site_files(site: Path) -> list[tuple[str, str]]:
    """(relative path, sha256) of every installed file, bytecode aside, sorted."""
    if not site.is_dir():
        return []
    found = []
    for path in site.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.suffix not in (".pyc", ".pyo"):
            found.append((path.relative_to(site).as_posix(), _sha256_file(path)))
    return sorted(found)


def tree_size(root: Path) -> int:
    """Bytes of the regular files under ``root`` (links not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def artifact_digest(
    source_sha256: str, packages: Iterable[ResolvedPackage], rt: runtime.Runtime
) -> str:
    """The artifact's content address: the source, the resolved dependencies, the runtime."""
    inputs = {
        "format": 2,
        "source_sha256": source_sha256,
        "packages": [[p.name.lower(), p.version, p.sha256] for p in packages],
        "runtime": rt.abi,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _check_size(staging: Path, limit: int, log: BuildLog) -> int:
    size = tree_size(staging)
    log.line(f"artifact size: {size / MiB:.1f} MiB")
    if limit and size > limit:
        raise BuildFailed(
            f"the build is {size / MiB:.1f} MiB, over the limit of {limit / MiB:g} MiB "
            "(code and installed requirements)"
        )
    return size


def _store(
    staging: Path,
    artifacts_dir: Path,
    source_sha256: str,
    packages: tuple[ResolvedPackage, ...],
    log: BuildLog,
) -> Path:
    """Renames staging to its content address; an existing artifact is kept as it is."""
    rt = runtime.current()
    digest = artifact_digest(source_sha256, packages, rt)
    manifest = {
        "format": 2,
        "source_sha256": source_sha256,
        "runtime": rt.text(),
        "packages": [asdict(p) for p in packages],
        "site_files": [list(f) for f in _site_files(staging / SITE_DIR)],
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    final = artifacts_dir / digest
    if final.is_dir():
        log.line(f"artifact sha256:{digest} exists already: same inputs, same artifact")
        build_cache.touch(final)
        return final
    try:
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():  # not a concurrent build that stored the same artifact
            raise
        log.line(f"artifact sha256:{digest} was stored meanwhile by another build")
    return final


# --------------------------------------------------------------------------- the build


def _key(spec: BuildSpec, source_sha256: str, rt: runtime.Runtime) -> str:
    return build_cache.cache_key(source_sha256, spec.file_path, spec.function_name, rt.abi)


def cached_build(spec: BuildSpec, rt: runtime.Runtime) -> BuildOutcome | None:
    """The result of an earlier build with the same inputs on ``rt``, logged; else None.

    Cheap (one small file read): the control plane asks before sending a build to the
    cluster, so that an unchanged rebuild takes a fraction of a second.
    """
    if spec.no_cache or not spec.source_sha256:
        return None
    found = build_cache.lookup(spec.artifacts_dir, _key(spec, spec.source_sha256, rt))
    if found is None:
        return None
    try:
        log = BuildLog(spec.log_path)
    except OSError:
        return None  # build it: that reports why the log cannot be written
    try:
        log.line(f"build {spec.build_name}: {spec.file_path}:{spec.function_name}")
        log.line(f"source sha256:{spec.source_sha256}, runtime {rt.describe()}")
        log.line(
            f"cache hit: the same source, requirements and runtime were built by "
            f"{found.first_build}; reusing artifact sha256:{found.digest}"
        )
        _log_packages(log, found.packages)
        image = f"artifact://sha256:{found.digest}"
        log.line(f"build succeeded (cached): {image}")
    finally:
        log.close()
    return BuildOutcome(
        ok=True,
        image=image,
        artifact_path=str((spec.artifacts_dir / found.digest).resolve()),
        runtime=found.runtime,
        packages=found.packages,
        cache_hit=True,
        size_bytes=found.size_bytes,
    )


def run_build(spec: BuildSpec, cancel: threading.Event | None = None) -> BuildOutcome:
    """Builds ``spec``; never raises for a failed build. ``cancel`` stops it cleanly."""
    started = time.monotonic()
    deadline = process.Deadline(started + spec.timeout_s, spec.timeout_s, cancel)
    try:
        log = BuildLog(spec.log_path)
    except OSError as e:
        error = _one_line(f"cannot write the build log: {e}")
        return BuildOutcome(ok=False, error=error, disk_full=disk_full(e))
    try:
        return _build_logged(spec, log, deadline, started)
    finally:
        log.close()


def _build_logged(
    spec: BuildSpec, log: BuildLog, deadline: process.Deadline, started: float
) -> BuildOutcome:
    log.line(f"build {spec.build_name}: {spec.file_path}:{spec.function_name}")
    staging: Path | None = None
    full = False
    try:
        spec.artifacts_dir.joinpath(STAGING_DIR).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="build-", dir=spec.artifacts_dir / STAGING_DIR))
        staging = staging.resolve()
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the artifact from other users
        outcome = _steps(spec, staging, log, deadline)
        log.line(f"build succeeded in {time.monotonic() - started:.1f} s: {outcome.image}")
        return outcome
    except BuildFailed as e:
        error = _one_line(str(e))
    except process.Stopped as e:  # "timed out after 2 s while ...", "cancelled while ..."
        error = _one_line(f"build {e}")
    except Exception as e:  # a bug or the disk, never the model: still a failed build
        full = disk_full(e)
        error = _one_line(
            f"the artifacts' disk is full ({spec.artifacts_dir}): {e}"
            if full
            else f"internal build error: {type(e).__name__}: {e}"
        )
    finally:
        if staging is not None:  # nothing half-written is left
            shutil.rmtree(staging, ignore_errors=True)
    log.line(f"build FAILED after {time.monotonic() - started:.1f} s: {error}")
    return BuildOutcome(ok=False, error=error, disk_full=full or log.full)


def _steps(
    spec: BuildSpec, staging: Path, log: BuildLog, deadline: process.Deadline
) -> BuildOutcome:
    rt = runtime.current()
    log.line(f"step 1/4: extract source {spec.source_zip.name}")
    source_sha256 = _sha256_file(spec.source_zip)
    log.line(f"source sha256:{source_sha256}, runtime {rt.describe()} ({sys.executable})")
    file_path = _extract(spec, staging, log)
    deadline.check("extracting the source")
    log.line("step 2/4: install requirements")
    packages = _install_requirements(staging, log, deadline)
    deadline.check("installing requirements")
    size = _check_size(staging, spec.max_size_bytes, log)
    log.line(f"step 3/4: import {file_path} and check {spec.function_name!r} is callable")
    _check_import(staging, file_path, spec.function_name, log, deadline)
    log.line(f"{file_path}: {spec.function_name!r} is callable")
    deadline.check(f"importing {file_path}")
    log.line("step 4/4: store the artifact")
    final = _store(staging, spec.artifacts_dir, source_sha256, packages, log)
    entry = build_cache.CacheEntry(final.name, rt.text(), packages, size, spec.build_name)
    build_cache.remember(spec.artifacts_dir, _key(spec, source_sha256, rt), entry)
    return BuildOutcome(
        ok=True,
        image=f"artifact://sha256:{final.name}",
        artifact_path=str(final.resolve()),
        runtime=rt.text(),
        packages=packages,
        size_bytes=size,
    )
