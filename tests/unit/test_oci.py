"""OCI export: the Containerfile, the image's server over real HTTP, real buildah builds.

The buildah tests build FROM scratch (or FROM a layout made by an earlier export), so
they need no registry; they skip where buildah or skopeo is missing
(scripts/system_packages.sh installs both).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.model_cases import write_image_server
from workers.oci import (
    LOADER_FILE,
    SERVE_FILE,
    ExportFailed,
    OciExport,
    containerfile,
    export_oci,
    remove_tree,
    server_files,
)

needs_buildah = pytest.mark.skipif(
    shutil.which("buildah") is None or shutil.which("skopeo") is None,
    reason="buildah and skopeo are not installed (scripts/system_packages.sh)",
)

BUILD = "projects/p/models/m/builds/3"
HEX = "ab" * 32
MODEL = """\
import tinypkg

def predict(body):
    if body == "boom":
        raise ValueError("no such feature")
    return tinypkg.double(body)
"""
TINYPKG = "def double(x):\n    return {'twice': x * 2, 'from': __name__}\n"


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    """An artifact as builder.py leaves it: code at the root, requirements in .cp_site."""
    root = tmp_path / "artifacts" / HEX
    (root / ".cp_site" / "tinypkg").mkdir(parents=True)
    (root / "model.py").write_text(MODEL)
    (root / ".cp_site" / "tinypkg" / "__init__.py").write_text(TINYPKG)
    (root / ".cp_artifact.json").write_text('{"format": 2}\n')
    return root


def export_for(artifact: Path, **more: Any) -> OciExport:
    fields: dict[str, Any] = {
        "artifact_path": artifact,
        "file_path": "model.py",
        "function_name": "predict",
        "build_name": BUILD,
        "image": f"artifact://sha256:{HEX}",
        "python_version": "3.11",
        "base_image": "scratch",
        **more,
    }
    return OciExport(**fields)


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file's mode, mtime and content hash: to show the artifact was not touched."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[path.relative_to(root).as_posix()] = (st.st_mode, st.st_mtime_ns, digest)
    return found


# --------------------------------------------------------------------------- Containerfile


def test_containerfile_copies_the_model_and_runs_the_server_without_run(artifact: Path) -> None:
    text = containerfile(export_for(artifact, base_image=""))
    lines = text.splitlines()
    assert "FROM docker.io/library/python:3.11-slim" in lines
    assert "COPY model/ /opt/model/" in lines
    assert "COPY .cp_serve.py .cp_loader.py /opt/model/" in lines
    assert 'ENV PYTHONPATH="/opt/model:/opt/model/.cp_site" \\' in lines
    assert '    CP_MODEL_FILE="model.py" \\' in lines
    assert '    CP_MODEL_FUNCTION="predict" \\' in lines
    assert f'    io.modelctl.build="{BUILD}" \\' in lines
    assert f'    io.modelctl.image="artifact://sha256:{HEX}" \\' in lines
    assert '    io.modelctl.function="model.py:predict" \\' in lines
    assert 'LABEL org.opencontainers.image.title="projects/p/models/m" \\' in lines
    assert f'    org.opencontainers.image.revision="sha256:{HEX}" \\' in lines
    assert lines[-3:] == [
        "WORKDIR /opt/model",
        "EXPOSE 8080",
        'CMD ["python", "/opt/model/.cp_serve.py"]',
    ]
    assert not any(line.startswith("RUN") for line in lines)
    assert containerfile(export_for(artifact)).splitlines()[1] == "FROM scratch"


def test_containerfile_quotes_values_and_refuses_what_cannot_go_in(artifact: Path) -> None:
    text = containerfile(export_for(artifact, build_name='b "x" $HOME \\'))
    assert '    io.modelctl.build="b \\"x\\" \\$HOME \\\\" \\' in text.splitlines()
    with pytest.raises(ExportFailed, match="line break"):
        containerfile(export_for(artifact, build_name="b\nRUN rm -rf /"))
    with pytest.raises(ExportFailed, match="bad tag"):
        containerfile(export_for(artifact, tag="a:b"))
    with pytest.raises(ExportFailed, match=r"not a \.py file inside"):
        containerfile(export_for(artifact, file_path="../model.py"))
    with pytest.raises(ExportFailed, match="bad python_version"):
        containerfile(export_for(artifact, base_image="", python_version=""))
    assert "org.opencontainers.image.version" not in containerfile(
        export_for(artifact, build_name="b")
    )
    with pytest.raises(ExportFailed, match="not a Python name"):
        containerfile(export_for(artifact, function_name="predict; x"))


def test_the_server_and_its_loader_are_python_3_8_syntax_for_older_bases() -> None:
    files = server_files()
    assert sorted(files) == [LOADER_FILE, SERVE_FILE]
    for name, text in files.items():
        ast.parse(text, filename=name, feature_version=(3, 8))


# --------------------------------------------------------------------------- the server


class Server:
    """The image's server, run here on 127.0.0.1 with only the stdlib (-I -S)."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc, self.port = proc, port

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {"Content-Type": "application/json"} if body else {}
            conn.request(method, path, body=body, headers=headers)
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read())
        finally:
            conn.close()


def start_server(tmp_path: Path, artifact: Path, function: str) -> subprocess.Popen[str]:
    script = write_image_server(tmp_path / "image")  # outside the artifact, which stays untouched
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CP_MODEL_ROOT": str(artifact),
        "CP_MODEL_FILE": "model.py",
        "CP_MODEL_FUNCTION": function,
        "CP_BUILD": BUILD,
        "CP_HOST": "127.0.0.1",
        "PORT": "0",  # the system picks a free port; the server prints it
    }
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", str(script)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def server(tmp_path: Path, artifact: Path) -> Iterator[Server]:
    with start_server(tmp_path, artifact, "predict") as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        found = re.search(r"on http://127\.0\.0\.1:(\d+)", first)
        if found is None:
            proc.kill()
            pytest.fail(f"the server did not start: {first!r} {proc.communicate()[1]}")
        try:
            yield Server(proc, int(found.group(1)))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_the_server_answers_in_the_replicas_wire_format(server: Server, artifact: Path) -> None:
    before = snapshot(artifact)
    status, body = server.request("POST", "/", b"21")
    assert status == 200
    assert body == {
        "success": True,
        "response": {"twice": 42, "from": "tinypkg"},  # imported from .cp_site
        "replica_id": socket.gethostname(),
        "build": BUILD,
    }
    status, body = server.request("POST", "/predict", b'"boom"')
    assert status == 500 and body["success"] is False
    assert body["error"] == "ValueError: no such feature (model.py:5)"
    assert body["replica_id"] == socket.gethostname() and body["build"] == BUILD
    status, body = server.request("POST", "/", b"{not json")
    assert status == 400 and body["success"] is False and "not JSON" in body["error"]
    assert server.request("GET", "/healthz") == (200, {"status": "ok", "build": BUILD})
    assert snapshot(artifact) == before


def test_the_server_stops_on_sigterm(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1
    assert server.proc.wait(timeout=10) == 0


def test_the_server_exits_when_the_function_cannot_be_loaded(
    tmp_path: Path, artifact: Path
) -> None:
    with start_server(tmp_path, artifact, "missing") as proc:
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.splitlines()[-1] == (
        "cannot load model.py:missing: function 'missing' not found in model.py"
    )


# --------------------------------------------------------------------------- buildah


def skopeo_inspect(layout: Path, tag: str) -> dict[str, Any]:
    done = subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:{tag}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def read_blob(layout: Path, digest: str) -> bytes:
    algorithm, hexdigest = digest.split(":")
    data = (layout / "blobs" / algorithm / hexdigest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexdigest
    return data


def manifest_of(layout: Path, tag: str) -> tuple[str, dict[str, Any]]:
    """The digest and content of the manifest that ``tag`` names in the layout's index."""
    index = json.loads((layout / "index.json").read_text())
    (entry,) = [
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    ]
    manifest: dict[str, Any] = json.loads(read_blob(layout, entry["digest"]))
    return entry["digest"], manifest


def layer_members(layout: Path, layer: dict[str, Any]) -> dict[str, tarfile.TarInfo]:
    data = read_blob(layout, layer["digest"])
    if layer["mediaType"].endswith("+gzip"):
        data = gzip.decompress(data)
    path = layout.parent / "layer.tar"
    path.write_bytes(data)
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


@needs_buildah
def test_export_from_scratch_writes_a_reproducible_oci_layout(
    tmp_path: Path, artifact: Path
) -> None:
    before = snapshot(artifact)
    work, lines = tmp_path / "work", list[str]()
    dest = tmp_path / "oci" / "image"
    started = time.monotonic()
    digest = export_oci(export_for(artifact, tag="v3"), dest, work_dir=work, log=lines.append)
    print(f"export took {time.monotonic() - started:.2f} s")

    info = skopeo_inspect(dest, "v3")
    assert info["Digest"] == digest
    assert info["Labels"]["io.modelctl.build"] == BUILD
    assert info["Labels"]["io.modelctl.image"] == f"artifact://sha256:{HEX}"
    assert info["Labels"]["io.modelctl.function"] == "model.py:predict"
    assert info["Labels"]["org.opencontainers.image.revision"] == f"sha256:{HEX}"
    assert len(info["Layers"]) == 1 and info["Created"] == "1970-01-01T00:00:00Z"
    assert "PYTHONPATH=/opt/model:/opt/model/.cp_site" in info["Env"]

    manifest_digest, manifest = manifest_of(dest, "v3")
    assert manifest_digest == digest
    config = json.loads(read_blob(dest, manifest["config"]["digest"]))["config"]
    assert config["Cmd"] == ["python", "/opt/model/.cp_serve.py"]
    assert config["WorkingDir"] == "/opt/model" and "8080/tcp" in config["ExposedPorts"]
    members = layer_members(dest, manifest["layers"][0])
    assert members["opt/model/model.py"].isfile()
    assert members["opt/model/.cp_site/tinypkg/__init__.py"].isfile()
    assert members["opt/model/.cp_artifact.json"].isfile()
    for name, text in server_files().items():
        member = members[f"opt/model/{name}"]
        assert member.isfile() and member.size == len(text.encode())
    assert all(m.mtime == 0 and m.uid == 0 for m in members.values())

    assert any("STEP 1/8: FROM scratch" in line for line in lines)  # buildah's output
    assert snapshot(artifact) == before
    assert list(work.iterdir()) == []
    again = tmp_path / "again"
    assert export_oci(export_for(artifact, tag="v3"), again, work_dir=work, log=print) == digest


@needs_buildah
def test_export_onto_a_local_base_image_adds_one_layer(tmp_path: Path, artifact: Path) -> None:
    base = tmp_path / "base"
    export_oci(export_for(artifact), base, work_dir=tmp_path / "work", log=print)
    dest = tmp_path / "dest"
    dest.mkdir()  # an empty folder will do
    export = export_for(artifact, base_image=f"oci:{base}:latest")
    digest = export_oci(export, dest, work_dir=tmp_path / "work", log=print)
    base_layers = skopeo_inspect(base, "latest")["Layers"]
    info = skopeo_inspect(dest, "latest")
    assert info["Digest"] == digest
    assert info["Layers"][:1] == base_layers and len(info["Layers"]) == 2
    assert list((tmp_path / "work").iterdir()) == []


@needs_buildah
@pytest.mark.slow  # buildah retries the pull for seconds
def test_a_base_image_that_cannot_be_pulled_fails_in_one_line(
    tmp_path: Path, artifact: Path
) -> None:
    work, dest = tmp_path / "work", tmp_path / "dest"
    export = export_for(artifact, base_image="localhost/does-not-exist:1")
    with pytest.raises(ExportFailed) as failed:
        export_oci(export, dest, work_dir=work, log=print, timeout_s=120)
    message = str(failed.value)
    prefix = "building the image FROM localhost/does-not-exist:1 failed: "
    assert message.startswith(prefix) and "\n" not in message
    assert "localhost/does-not-exist:1" in message.removeprefix(prefix)  # buildah's own line
    assert not dest.exists() and list(work.iterdir()) == []


@needs_buildah
def test_a_timeout_kills_buildah_and_cleans_up(tmp_path: Path, artifact: Path) -> None:
    work, dest = tmp_path / "work", tmp_path / "dest"
    export = export_for(artifact, base_image="localhost/does-not-exist:1")  # retries for 6 s
    started = time.monotonic()
    with pytest.raises(
        ExportFailed, match=r"^timed out after 1 s while building the image FROM localhost/"
    ):
        export_oci(export, dest, work_dir=work, log=print, timeout_s=1)
    assert time.monotonic() - started < 5
    assert not dest.exists() and list(work.iterdir()) == []


def test_bad_inputs_fail_before_any_work(
    tmp_path: Path, artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    missing = export_for(tmp_path / "nope")
    with pytest.raises(ExportFailed, match=r"^the artifact folder .*nope does not exist$"):
        export_oci(missing, tmp_path / "d1", work_dir=work, log=print)
    with pytest.raises(ExportFailed, match=r"^other\.py is not in the artifact"):
        export_oci(
            export_for(artifact, file_path="other.py"), tmp_path / "d2", work_dir=work, log=print
        )
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(ExportFailed, match="exists and is not an empty folder"):
        export_oci(export_for(artifact), full, work_dir=work, log=print)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ExportFailed, match=r"^buildah is not installed"):
        export_oci(export_for(artifact), tmp_path / "d3", work_dir=work, log=print)
    assert not work.exists()


def test_remove_tree_removes_read_only_folders(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    (root / "layer" / "etc").mkdir(parents=True)
    (root / "layer" / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    for path in (root / "layer" / "etc" / "passwd", root / "layer" / "etc", root / "layer"):
        path.chmod(0o444 if path.is_file() else 0o555)
    remove_tree(root)
    assert not root.exists()
