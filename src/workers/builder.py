"""Builds: an uploaded zip becomes an immutable, content-addressed artifact folder.

``run_build`` extracts the source into a fresh staging folder (under
``<artifacts_dir>/.staging``, so the final move is an atomic rename on one
filesystem), installs ``requirements.txt`` into ``<staging>/.cp_site`` with this
very interpreter, imports ``file_path`` in a clean subprocess to check that
``function_name`` is callable, and renames staging to ``<artifacts_dir>/<hex>``.

Serving loads the artifact the same way the check does: ``sys.path`` starts
with ``[<artifact>, <artifact>/.cp_site]`` and the module is imported by path.
A failed build never raises: it returns ``BuildOutcome(ok=False, error=...)``
with one line naming the cause, and leaves nothing behind but its log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from workers import build_cache, requirements, runtime
from workers.archive import UnsafeArchive, check_member_path, safe_extract
from workers.backend import BuildOutcome, BuildSpec, ResolvedPackage

SITE_DIR = ".cp_site"  # where requirements are installed, inside the artifact
MANIFEST = ".cp_artifact.json"  # what the artifact's digest was computed from
STAGING_DIR = ".staging"  # under artifacts_dir; content-addressed names are hex, no clash
PIP_REPORT = ".cp_pip_report.json"  # pip's --report, read into the manifest, not kept
MiB = 1024 * 1024
MAX_ERROR_CHARS = 500
_KILL_GRACE_S = 5.0
_KEEP_LINES = 1000  # of a step's output, for its error message (the log has them all)

# Run with ``python -I -B -c``: imports the model by path, reports one JSON object
# on the original stdout; everything the model prints goes to stderr (the log).
_CHECK_SCRIPT = r"""
import importlib.util, json, os, sys, traceback
result = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
root, rel, func = sys.argv[1:4]
sys.path[:0] = [root, os.path.join(root, ".cp_site")]

def own(path):
    # A path of the model's own code, relative to the root; None for anything else.
    full = os.path.abspath(path)
    site = os.path.join(root, ".cp_site") + os.sep
    if full.startswith(root + os.sep) and not full.startswith(site):
        return os.path.relpath(full, root)
    return None

def where(exc):
    # The deepest frame in the model's own code.
    tb, line, path = exc.__traceback__, 0, ""
    while tb is not None:
        mine = own(tb.tb_frame.f_code.co_filename)
        if mine:
            line, path = tb.tb_lineno, mine
        tb = tb.tb_next
    return path, line

def report(**kw):
    result.write(json.dumps(kw))
    result.flush()

name = rel[:-3].replace("/", ".")
try:
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, rel))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
except SyntaxError as e:
    path = (own(e.filename) or e.filename) if e.filename else rel
    report(ok=False, kind=type(e).__name__, file=path, line=e.lineno or 0, msg=e.msg or str(e))
except BaseException as e:
    traceback.print_exc()
    path, line = where(e)
    kind = "ImportError" if isinstance(e, ImportError) else type(e).__name__
    report(ok=False, kind=kind, file=path, line=line, msg=str(e))
else:
    target = getattr(module, func, None)
    if target is None:
        report(ok=False, kind="missing")
    elif not callable(target):
        report(ok=False, kind="not_callable", type=type(target).__name__)
    else:
        report(ok=True)
"""


class BuildFailed(Exception):
    """A build failed for the reason in the message (one line, shown to users)."""


# --------------------------------------------------------------------------- log


class BuildLog:
    """The build log: timestamped lines, appended and flushed one by one."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with self._lock:
            self._file.write(f"{stamp} {text.rstrip()}\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------- processes


@dataclass
class _Deadline:
    at: float
    timeout_s: float
    cancel: threading.Event | None = None

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, during: str) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise BuildFailed(f"build cancelled while {during}")
        if self.left() <= 0:
            raise BuildFailed(f"build timed out after {self.timeout_s:g} s while {during}")


@dataclass
class _Finished:
    returncode: int
    stdout: str
    lines: list[str] = field(default_factory=list)  # what went to the log


def _pump(stream: IO[str], sink: Callable[[str], None]) -> None:
    for raw in stream:
        sink(raw.rstrip("\n"))


def _run_logged(
    cmd: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    log: BuildLog,
    prefix: str,
    deadline: _Deadline,
    during: str,
    capture_stdout: bool = False,
) -> _Finished:
    """Runs ``cmd``, streaming its output into the log; stdout is kept when ``capture_stdout``.

    Kills the whole process group at the deadline (or on cancel) and raises BuildFailed.
    """
    lines: deque[str] = deque(maxlen=_KEEP_LINES)
    captured: list[str] = []

    def to_log(text: str) -> None:
        lines.append(text)
        log.line(f"{prefix} | {text}")

    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if capture_stdout else subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    )
    assert proc.stdout is not None
    streams = [proc.stdout]
    pumps = [_start_pump(proc.stdout, captured.append if capture_stdout else to_log)]
    if capture_stdout:
        assert proc.stderr is not None
        streams.append(proc.stderr)
        pumps.append(_start_pump(proc.stderr, to_log))
    try:
        _wait(proc, deadline, during)
    finally:
        _drain(proc, pumps, streams)
    return _Finished(proc.returncode, "\n".join(captured), list(lines))


def _start_pump(stream: IO[str], sink: Callable[[str], None]) -> threading.Thread:
    thread = threading.Thread(target=_pump, args=(stream, sink), daemon=True)
    thread.start()
    return thread


def _wait(proc: subprocess.Popen[str], deadline: _Deadline, during: str) -> None:
    try:
        while proc.poll() is None:
            deadline.check(during)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(0.1, max(deadline.left(), 0.001)))
    except BaseException:  # failed, timed out, cancelled, or interrupted (Ray cancel)
        _kill_group(proc)
        raise


def _drain(
    proc: subprocess.Popen[str], pumps: list[threading.Thread], streams: list[IO[str]]
) -> None:
    """Waits for the output's end; kills what the process left holding it (its group)."""
    for pump in pumps:
        pump.join(timeout=1.0)
    if any(pump.is_alive() for pump in pumps):
        _kill_group(proc)
        for pump in pumps:
            pump.join(timeout=_KILL_GRACE_S)
    if not any(pump.is_alive() for pump in pumps):  # closing under a reader would block
        for stream in streams:
            stream.close()
    proc.wait()


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=_KILL_GRACE_S)


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
    try:
        files = safe_extract(spec.source_zip, staging)
    except UnsafeArchive as e:
        raise BuildFailed(f"rejected source archive: {e}") from None
    log.line(f"extracted {len(files)} files")
    if file_path not in files:
        raise BuildFailed(f"file_path {file_path!r} not found in the source")
    return file_path


def _install_requirements(
    staging: Path, log: BuildLog, deadline: _Deadline
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
    staging: Path, file_path: str, function_name: str, log: BuildLog, deadline: _Deadline
) -> None:
    root = str(staging.resolve())
    cmd = [sys.executable, "-I", "-B", "-c", _CHECK_SCRIPT, root, file_path, function_name]
    done = _run_logged(
        cmd,
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
        raise BuildFailed(_import_error(report, file_path, function_name))


def _import_error(report: dict[str, Any], file_path: str, function_name: str) -> str:
    kind = str(report.get("kind", ""))
    if kind == "missing":
        return f"function {function_name!r} not found in {file_path}"
    if kind == "not_callable":
        return (
            f"{function_name!r} in {file_path} is not callable "
            f"(it is a {report.get('type', 'value')})"
        )
    msg, where, line = report.get("msg", ""), report.get("file") or file_path, report.get("line")
    if kind.endswith(("SyntaxError", "IndentationError", "TabError")):
        return f"{kind} in {where} line {line}: {msg}"
    if kind == "ImportError":
        return f"ImportError in {file_path}: {msg}"
    at = f" ({where} line {line})" if line else ""
    return f"{kind} while importing {file_path}{at}" + (f": {msg}" if msg else "")


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
    deadline = _Deadline(started + spec.timeout_s, spec.timeout_s, cancel)
    try:
        log = BuildLog(spec.log_path)
    except OSError as e:
        return BuildOutcome(ok=False, error=_one_line(f"cannot write the build log: {e}"))
    try:
        return _build_logged(spec, log, deadline, started)
    finally:
        log.close()


def _build_logged(
    spec: BuildSpec, log: BuildLog, deadline: _Deadline, started: float
) -> BuildOutcome:
    log.line(f"build {spec.build_name}: {spec.file_path}:{spec.function_name}")
    staging: Path | None = None
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
    except Exception as e:  # a bug or the disk, never the model: still a failed build
        error = _one_line(f"internal build error: {type(e).__name__}: {e}")
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    log.line(f"build FAILED after {time.monotonic() - started:.1f} s: {error}")
    return BuildOutcome(ok=False, error=error)


def _steps(spec: BuildSpec, staging: Path, log: BuildLog, deadline: _Deadline) -> BuildOutcome:
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
