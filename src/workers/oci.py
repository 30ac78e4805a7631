"""Exports a built artifact as a standard OCI image layout, with buildah.

The image is the artifact as it is, plus a tiny server: ``FROM <base>`` (by default
``python:<version>-slim``; ``scratch`` and local bases such as ``oci:/path:tag`` work
offline), the artifact copied to ``/opt/model`` (its code at the root, its installed
requirements in ``.cp_site``), and the server as the command: ``workers/image_server.py``
as ``.cp_serve.py``, with ``workers/loader.py`` beside it as ``.cp_loader.py`` (both
stdlib only). The server loads ``file_path:function_name`` with the very loader of the
build's check and of a replica, and answers POST with the same JSON wire format, so the
image behaves like the model's deployment outside the cluster. The Containerfile has no
``RUN``: the base may have no shell, and the build needs no network beyond pulling it.

``export_oci`` works in a throwaway folder under ``work_dir``: a build context (the
artifact hard-linked, or copied across filesystems; the artifact is never changed),
a buildah storage of its own (``vfs``: no mounts, no privileges beyond the user's),
and the pushed layout, which is moved to ``dest`` only once complete. That folder is
removed afterwards whatever happens (failure, timeout, interrupt). buildah runs with
``workers.process``: its own process group, killed at the deadline; its output streams
to ``log``.

Images are reproducible: ``--timestamp 0`` zeroes the creation time and the files'
times, ``--layers=false`` gives one layer for the model, so the same artifact and
base give the same manifest digest. Pure Python and subprocess: no ray, no protobuf.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers import process
from workers.loader import SITE_DIR

MODEL_DIR = "/opt/model"  # where the artifact lands in the image
SERVE_FILE = ".cp_serve.py"  # the server (workers/image_server.py), beside the model's code
LOADER_FILE = ".cp_loader.py"  # workers/loader.py, which the server loads from beside it
PORT = 8080
SCRATCH = "scratch"
MAX_ERROR_CHARS = 500
_LOCAL_NAME = "localhost/modelctl-export:latest"  # the image's name in the throwaway storage
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_KEEP_LINES = 200  # of buildah's output, to find its error (the log has them all)


def server_files() -> dict[str, str]:
    """The image's own files, by their name in MODEL_DIR: the server and the loader it
    uses, read from this package's source (nothing is fetched: exports work offline)."""
    package = importlib.resources.files("workers")
    sources = {SERVE_FILE: "image_server.py", LOADER_FILE: "loader.py"}
    return {name: package.joinpath(source).read_text("utf-8") for name, source in sources.items()}


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
            f"COPY {SERVE_FILE} {LOADER_FILE} {MODEL_DIR}/",
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


def _run(
    cmd: list[str],
    *,
    env: dict[str, str],
    log: Callable[[str], None],
    deadline: process.Deadline,
    during: str,
) -> None:
    """Runs ``cmd`` (``workers.process``: its own group, killed at the deadline), its
    output to ``log``; raises ExportFailed, or process.Stopped at the deadline."""
    log(f"running: {' '.join(cmd)}")
    lines: deque[str] = deque(maxlen=_KEEP_LINES)

    def sink(text: str) -> None:
        lines.append(text)
        log(f"buildah | {text}")

    try:
        returncode = process.run(cmd, env=env, output=sink, deadline=deadline, during=during)
    except OSError as e:
        raise ExportFailed(f"cannot run {cmd[0]}: {e}") from None
    if returncode != 0:
        raise ExportFailed(f"{during} failed: {_last_error(list(lines), returncode)}")


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
    for name, text in server_files().items():
        (scratch.context / name).write_text(text)
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
    deadline = process.Deadline.after(timeout_s)
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
    except (ExportFailed, process.Stopped) as e:  # Stopped: "timed out after 2 s while ..."
        raise ExportFailed(_one_line(str(e))) from None
    finally:
        remove_tree(scratch.root, buildah)


def _export_in(
    export: OciExport,
    dest: Path,
    scratch: _Scratch,
    buildah: str,
    log: Callable[[str], None],
    deadline: process.Deadline,
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
