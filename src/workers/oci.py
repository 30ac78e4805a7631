"""Exports a built artifact as a standard OCI image layout, with buildah.

The image is the artifact as it is, plus a tiny server: ``FROM <base>`` (by default
``python:<version>-slim``; ``scratch`` and local bases such as ``oci:/path:tag`` work
offline), the artifact copied to ``/opt/model`` (its code at the root, its installed
requirements in ``.cp_site``), and ``.cp_serve.py`` (``SERVE_SCRIPT``, stdlib only) as
the command. The server loads ``file_path:function_name`` the way a replica does
(``workers.model_app``) and answers POST with the same JSON wire format, so the image
behaves like the model's deployment outside the cluster. The Containerfile has no
``RUN``: the base may have no shell, and the build needs no network beyond pulling it.

``export_oci`` works in a throwaway folder under ``work_dir``: a build context (the
artifact hard-linked, or copied across filesystems; the artifact is never changed),
a buildah storage of its own (``vfs``: no mounts, no privileges beyond the user's),
and the pushed layout, which is moved to ``dest`` only once complete. That folder is
removed afterwards whatever happens (failure, timeout, interrupt). buildah runs in
its own process group, killed at the deadline; its output streams to ``log``.

Images are reproducible: ``--timestamp 0`` zeroes the creation time and the files'
times, ``--layers=false`` gives one layer for the model, so the same artifact and
base give the same manifest digest. Pure Python and subprocess: no ray, no protobuf.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from workers.builder import SITE_DIR

MODEL_DIR = "/opt/model"  # where the artifact lands in the image
SERVE_FILE = ".cp_serve.py"  # the server, beside the model's code
PORT = 8080
SCRATCH = "scratch"
MAX_ERROR_CHARS = 500
_LOCAL_NAME = "localhost/modelctl-export:latest"  # the image's name in the throwaway storage
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_KEEP_LINES = 200  # of buildah's output, to find its error (the log has them all)
_KILL_GRACE_S = 5.0

# The image's command. Stdlib only, and Python 3.8+ syntax: it runs on the base's
# Python. Configured by the environment the Containerfile sets (CP_MODEL_FILE,
# CP_MODEL_FUNCTION, CP_BUILD, PORT); CP_MODEL_ROOT defaults to its own folder.
SERVE_SCRIPT = r'''"""Serves one model function over HTTP, as a modelctl replica does."""
import importlib.util
import json
import os
import signal
import socket
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.abspath(os.environ.get("CP_MODEL_ROOT") or os.path.dirname(__file__))
FILE = os.environ.get("CP_MODEL_FILE", "model.py")
FUNCTION = os.environ.get("CP_MODEL_FUNCTION", "predict")
BUILD = os.environ.get("CP_BUILD", "")
REPLICA = socket.gethostname()


def load():
    """Imports FILE by path, its dependencies and folder on sys.path as in model_app."""
    module_file = os.path.join(ROOT, FILE)
    for entry in (os.path.join(ROOT, ".cp_site"), os.path.dirname(module_file), ROOT):
        while entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    os.chdir(ROOT)
    name = "_cp_model_" + os.path.splitext(FILE)[0].replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, module_file)
    if spec is None or spec.loader is None:
        raise ImportError("cannot import " + FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    fn = getattr(module, FUNCTION, None)
    if not callable(fn):
        raise ImportError("%s has no callable %r" % (FILE, FUNCTION))
    return fn


def plain(value):
    for attr in ("tolist", "item"):
        method = getattr(value, attr, None)
        if callable(method):
            return method()
    raise TypeError("the model returned a %s, which is not JSON" % type(value).__name__)


def invoke(fn, raw):
    """(status, body bytes) for one request body: model_app.invoke's wire format."""
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as e:
        error = "the request body is not JSON: %s" % e
        return 400, json.dumps({"success": False, "error": error}).encode()
    try:
        reply = {"success": True, "response": fn(body), "replica_id": REPLICA, "build": BUILD}
        return 200, json.dumps(reply, default=plain).encode()
    except Exception as e:
        last = traceback.extract_tb(e.__traceback__)[-1:]
        where = " (%s:%s)" % (os.path.basename(last[0].filename), last[0].lineno) if last else ""
        error = "%s: %s%s" % (type(e).__name__, e, where)
        reply = {"success": False, "error": error, "replica_id": REPLICA, "build": BUILD}
        return 500, json.dumps(reply).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "modelctl-serve"
    fn = None

    def do_POST(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.send(400, json.dumps({"success": False, "error": "bad Content-Length"}).encode())
            return
        raw = self.rfile.read(length) if length > 0 else b""
        self.send(*invoke(type(self).fn, raw))

    def do_GET(self):
        if self.path.split("?")[0] == "/healthz":
            self.send(200, json.dumps({"status": "ok", "build": BUILD}).encode())
        else:
            error = "POST a JSON body to call the model"
            self.send(404, json.dumps({"success": False, "error": error}).encode())

    def send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def stop(signum, frame):
    raise SystemExit(0)


def main():
    try:
        Handler.fn = staticmethod(load())
    except BaseException as e:
        traceback.print_exc()
        sys.stderr.write("cannot load %s:%s: %s: %s\n" % (FILE, FUNCTION, type(e).__name__, e))
        return 1
    signal.signal(signal.SIGTERM, stop)  # as PID 1, SIGTERM is ignored without a handler
    host = os.environ.get("CP_HOST", "0.0.0.0")
    server = ThreadingHTTPServer((host, int(os.environ.get("PORT", "8080"))), Handler)
    server.daemon_threads = True
    print("serving %s:%s on http://%s:%d" % (FILE, FUNCTION, host, server.server_port), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


class ExportFailed(Exception):
    """The export failed for the reason in the message (one line)."""


@dataclass(frozen=True)
class OciExport:
    artifact_path: Path  # the artifact folder
    file_path: str  # module path relative to the artifact, e.g. "model.py"
    function_name: str
    build_name: str  # e.g. "projects/p/models/m/builds/3"
    image: str  # e.g. "artifact://sha256:<hex>"
    python_version: str  # e.g. "3.11": a label, and the default base python:<v>-slim
    base_image: str = ""  # "" -> docker.io/library/python:<python_version>-slim
    tag: str = "latest"  # the ref name inside the layout

    @property
    def base(self) -> str:
        return self.base_image or f"docker.io/library/python:{self.python_version}-slim"


# --------------------------------------------------------------------------- Containerfile


def _quoted(value: str) -> str:
    """A double-quoted Containerfile word: no expansion of ``$``, no line breaks."""
    if any(c in value for c in "\r\n\0"):
        raise ExportFailed(f"a line break in {value!r} cannot go into a Containerfile")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def _pairs(instruction: str, items: dict[str, str]) -> str:
    """``ENV``/``LABEL`` with one ``key="value"`` per line."""
    lines = [f"{key}={_quoted(value)}" for key, value in items.items()]
    return f"{instruction} " + " \\\n    ".join(lines)


def labels(export: OciExport) -> dict[str, str]:
    """The image's labels: OCI's standard ones and ours (io.modelctl.*)."""
    model, found, build_id = export.build_name.rpartition("/builds/")
    if not found:
        model, build_id = export.build_name, ""
    every = {
        "org.opencontainers.image.title": model,
        "org.opencontainers.image.version": build_id,
        "org.opencontainers.image.revision": export.image.removeprefix("artifact://"),
        "org.opencontainers.image.source": export.image,
        "io.modelctl.build": export.build_name,
        "io.modelctl.image": export.image,
        "io.modelctl.function": f"{export.file_path}:{export.function_name}",
        "io.modelctl.python": export.python_version,
    }
    return {key: value for key, value in every.items() if value}


def _environment(export: OciExport) -> dict[str, str]:
    return {
        # Also for `python -c` in the image; the server puts these first itself.
        "PYTHONPATH": f"{MODEL_DIR}:{MODEL_DIR}/{SITE_DIR}",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # the model's folder may be read-only
        "CP_MODEL_FILE": export.file_path,
        "CP_MODEL_FUNCTION": export.function_name,
        "CP_BUILD": export.build_name,
        "PORT": str(PORT),
    }


def containerfile(export: OciExport) -> str:
    """The Containerfile for ``export``; its context holds ``model/`` and ``SERVE_FILE``."""
    _check_names(export)
    return "\n".join(
        [
            "# Generated by modelctl (workers/oci.py).",
            f"FROM {export.base}",
            f"COPY model/ {MODEL_DIR}/",
            f"COPY {SERVE_FILE} {MODEL_DIR}/{SERVE_FILE}",
            _pairs("ENV", _environment(export)),
            _pairs("LABEL", labels(export)),
            f"WORKDIR {MODEL_DIR}",
            f"EXPOSE {PORT}",
            f'CMD ["python", "{MODEL_DIR}/{SERVE_FILE}"]',
            "",
        ]
    )


def _check_names(export: OciExport) -> None:
    path = Path(export.file_path)
    if path.is_absolute() or ".." in path.parts or path.suffix != ".py":
        raise ExportFailed(f"file_path {export.file_path!r} is not a .py file inside the artifact")
    if not export.function_name.isidentifier():
        raise ExportFailed(f"function_name {export.function_name!r} is not a Python name")
    if not export.base_image and not re.fullmatch(r"\d+(\.\d+)*", export.python_version):
        raise ExportFailed(f"bad python_version {export.python_version!r} for the base image")
    if any(c.isspace() for c in export.base):
        raise ExportFailed(f"bad base image {export.base!r}")
    if not _TAG.fullmatch(export.tag):
        raise ExportFailed(f"bad tag {export.tag!r}: letters, digits, '_', '.', '-' only")


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Deadline:
    at: float
    timeout_s: float

    def left(self) -> float:
        return self.at - time.monotonic()


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_ERROR_CHARS else flat[: MAX_ERROR_CHARS - 3] + "..."


def _last_error(lines: list[str], returncode: int) -> str:
    """buildah's own last error line, without its prefix; else its last line."""
    for line in reversed(lines):
        if line.startswith("Error: "):
            return line.removeprefix("Error: ")
        found = re.search(r'level=(?:error|fatal) msg="(.*)"', line)
        if found:
            return found.group(1)
    rest = [line for line in lines if line.strip()]
    return rest[-1] if rest else f"exit status {returncode}"


def _pump(stream: IO[str], sink: Callable[[str], None]) -> None:
    for raw in stream:
        sink(raw.rstrip("\n"))


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_KILL_GRACE_S)


def _wait(proc: subprocess.Popen[str], deadline: _Deadline, during: str) -> None:
    """Waits for ``proc``; kills its group at the deadline (or on an interrupt)."""
    try:
        while proc.poll() is None:
            if deadline.left() <= 0:
                raise ExportFailed(f"timed out after {deadline.timeout_s:g} s while {during}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(0.1, max(deadline.left(), 0.001)))
    except BaseException:
        _kill_group(proc)
        raise


def _run(
    cmd: list[str],
    *,
    env: dict[str, str],
    log: Callable[[str], None],
    deadline: _Deadline,
    during: str,
) -> None:
    """Runs ``cmd`` in its own process group, its output to ``log``; raises ExportFailed."""
    log(f"running: {' '.join(cmd)}")
    lines: deque[str] = deque(maxlen=_KEEP_LINES)

    def sink(text: str) -> None:
        lines.append(text)
        log(f"buildah | {text}")

    try:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )
    except OSError as e:
        raise ExportFailed(f"cannot run {cmd[0]}: {e}") from None
    assert proc.stdout is not None
    pump = threading.Thread(target=_pump, args=(proc.stdout, sink), daemon=True)
    pump.start()
    try:
        _wait(proc, deadline, during)
    finally:
        pump.join(timeout=1.0)
        if pump.is_alive():  # something of its group still holds the pipe
            _kill_group(proc)
            pump.join(timeout=_KILL_GRACE_S)
        if not pump.is_alive():
            proc.stdout.close()
    if proc.returncode != 0:
        raise ExportFailed(f"{during} failed: {_last_error(list(lines), proc.returncode)}")


# --------------------------------------------------------------------------- work folders


def _toml(path: Path) -> str:
    return json.dumps(str(path))  # a JSON string is a TOML basic string


@dataclass(frozen=True)
class _Scratch:
    """The throwaway folder of one export."""

    root: Path

    @property
    def context(self) -> Path:
        return self.root / "context"

    @property
    def containerfile(self) -> Path:
        return self.root / "Containerfile"

    @property
    def layout(self) -> Path:
        return self.root / "layout"

    @property
    def digest_file(self) -> Path:
        return self.root / "digest"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def run_root(self) -> Path:
        return self.root / "run"

    def buildah(self, buildah: str) -> list[str]:
        """buildah with this export's own storage, whatever the host's configuration."""
        return [
            buildah,
            "--storage-driver",
            "vfs",
            "--root",
            str(self.storage),
            "--runroot",
            str(self.run_root),
        ]

    def prepare_env(self) -> dict[str, str]:
        """Writes buildah's storage configuration in here; returns the environment to run
        buildah with: the caller's (registry settings and credentials stay), with that
        configuration and with temporary files kept in here."""
        conf = self.root / "storage.conf"
        conf.write_text(
            f'[storage]\ndriver = "vfs"\n'
            f"graphroot = {_toml(self.storage)}\nrunroot = {_toml(self.run_root)}\n"
        )
        (self.root / "tmp").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDAH_")}
        env["CONTAINERS_STORAGE_CONF"] = str(conf)
        env["TMPDIR"] = str(self.root / "tmp")
        return env


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (cheap, and the artifact is immutable), a copy across filesystems."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _make_context(export: OciExport, scratch: _Scratch) -> None:
    scratch.context.mkdir()
    shutil.copytree(
        export.artifact_path, scratch.context / "model", symlinks=True, copy_function=_link_or_copy
    )
    (scratch.context / SERVE_FILE).write_text(SERVE_SCRIPT)
    scratch.containerfile.write_text(containerfile(export))


def remove_tree(path: Path, buildah: str | None = None) -> None:
    """Removes ``path`` although buildah's vfs storage holds read-only folders (0555).

    Without root, layers may hold files of other (mapped) users: those only go inside
    buildah's user namespace, so that is the fallback.
    """

    def make_writable_and_retry(func: Callable[[str], Any], failed: str, _exc: Any) -> None:
        for target in (os.path.dirname(failed), failed):
            with contextlib.suppress(OSError):
                mode = os.lstat(target).st_mode
                if not stat.S_ISLNK(mode):
                    os.chmod(target, stat.S_IMODE(mode) | stat.S_IRWXU)
        func(failed)

    with contextlib.suppress(OSError):
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=make_writable_and_retry)
        else:
            shutil.rmtree(path, onerror=make_writable_and_retry)
    if path.exists() and buildah is not None and os.geteuid() != 0:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            cmd = [buildah, "unshare", "rm", "-rf", "--", str(path)]
            subprocess.run(cmd, capture_output=True, timeout=300, check=False)


def _check_inputs(export: OciExport, dest: Path) -> str:
    """Checks what can be checked before any work; returns buildah's path."""
    _check_names(export)
    if not export.artifact_path.is_dir():
        raise ExportFailed(f"the artifact folder {export.artifact_path} does not exist")
    if not (export.artifact_path / export.file_path).is_file():
        raise ExportFailed(f"{export.file_path} is not in the artifact {export.artifact_path}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportFailed(f"the destination {dest} exists and is not an empty folder")
    buildah = shutil.which("buildah")
    if buildah is None:
        raise ExportFailed("buildah is not installed (scripts/system_packages.sh installs it)")
    return buildah


def _read_digest(scratch: _Scratch) -> str:
    try:
        digest = scratch.digest_file.read_text().strip()
    except OSError:
        digest = ""
    if not _DIGEST.fullmatch(digest):
        raise ExportFailed(f"buildah push wrote no manifest digest (got {digest[:80]!r})")
    return digest


def _move_into_place(layout: Path, dest: Path) -> None:
    if dest.is_dir():
        dest.rmdir()  # checked empty
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(layout, dest)


# --------------------------------------------------------------------------- the export


def export_oci(
    export: OciExport,
    dest: Path,
    *,
    work_dir: Path,
    log: Callable[[str], None],
    timeout_s: float = 600.0,
) -> str:
    """Writes an OCI image layout at ``dest`` (must not exist or be empty); returns the
    manifest digest ``"sha256:..."``. Raises ExportFailed with a one-line cause."""
    deadline = _Deadline(time.monotonic() + timeout_s, timeout_s)
    try:
        buildah = _check_inputs(export, dest)
        work_dir.mkdir(parents=True, exist_ok=True)
        scratch = _Scratch(Path(tempfile.mkdtemp(prefix="oci-", dir=work_dir)).resolve())
    except OSError as e:
        raise ExportFailed(_one_line(f"cannot prepare the export: {e}")) from None
    try:
        return _export_in(export, dest, scratch, buildah, log, deadline)
    except OSError as e:
        raise ExportFailed(_one_line(f"export failed: {type(e).__name__}: {e}")) from None
    except ExportFailed as e:
        raise ExportFailed(_one_line(str(e))) from None
    finally:
        remove_tree(scratch.root, buildah)


def _export_in(
    export: OciExport,
    dest: Path,
    scratch: _Scratch,
    buildah: str,
    log: Callable[[str], None],
    deadline: _Deadline,
) -> str:
    log(f"exporting {export.image} ({export.build_name}) FROM {export.base} to {dest}")
    _make_context(export, scratch)
    env, base_cmd = scratch.prepare_env(), scratch.buildah(buildah)
    build = [
        *base_cmd,
        "bud",
        "--isolation=chroot",  # no runtime needed (and no RUN anyway)
        "--format=oci",
        "--layers=false",  # one layer for the model
        "--timestamp=0",  # reproducible: creation time and file times are the epoch
        "--identity-label=false",  # no io.buildah.version: the same image across versions
        f"--file={scratch.containerfile}",
        f"--tag={_LOCAL_NAME}",
        str(scratch.context),
    ]
    during = f"building the image FROM {export.base}"
    _run(build, env=env, log=log, deadline=deadline, during=during)
    push = [
        *base_cmd,
        "push",
        "--format=oci",
        f"--digestfile={scratch.digest_file}",
        _LOCAL_NAME,
        f"oci:{scratch.layout}:{export.tag}",
    ]
    _run(push, env=env, log=log, deadline=deadline, during="writing the layout")
    digest = _read_digest(scratch)
    _move_into_place(scratch.layout, dest)
    log(f"exported {export.image} as {dest} ({export.tag}, manifest {digest})")
    return digest
