"""The Go client (clients/go) as its README says to use it: `go vet` and `go test` for the
client package, then its example program (cmd/workflow) built and run against a real
`modelctl serve` on a real local Ray cluster: the whole workflow, from another language.

Go builds in GOPATH mode on Debian's packages (no module proxy here); skipped only when
the Go toolchain or Debian's gRPC package is missing (`make setup` installs both).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import EXAMPLES, ROOT

GO_ROOT = ROOT / "clients" / "go"
GOCODE = Path("/usr/share/gocode")
GO = shutil.which("go")
GOFMT = shutil.which("gofmt")
MODELCTL = str(Path(sys.executable).with_name("modelctl"))
PACKAGES = ["modellifecycle/client", "modellifecycle/cmd/workflow"]

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(GO is None, reason="the Go toolchain is not installed (make setup)"),
    pytest.mark.skipif(
        not (GOCODE / "src" / "google.golang.org" / "grpc").is_dir(),
        reason="Debian's Go gRPC package (golang-google-grpc-dev) is not installed (make setup)",
    ),
]


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def go_env(tmp_path: Path) -> dict[str, str]:
    """GOPATH mode: the client's tree first, then Debian's Go packages."""
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{GO_ROOT}:{GOCODE}", "GOFLAGS": ""}
    if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(tmp_path / "gocache")
    return env


def go(tmp_path: Path, *args: str, timeout: float = 240) -> str:
    assert GO is not None
    done = subprocess.run(
        [GO, *args],
        cwd=GO_ROOT,
        env=go_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"go {' '.join(args)} failed:\n{tail(output)}"
    return output


@pytest.mark.timeout(600)
def test_go_client_is_formatted_vetted_and_its_unit_tests_pass(tmp_path: Path) -> None:
    if GOFMT is not None:
        sources = [str(GO_ROOT / "src" / package) for package in PACKAGES]
        unformatted = subprocess.run(
            [GOFMT, "-l", *sources], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert unformatted == "", f"gofmt would change:\n{unformatted}"
    go(tmp_path, "vet", *PACKAGES)
    output = go(tmp_path, "test", "-count=1", "-v", PACKAGES[0])
    assert "--- PASS: TestErrorFromStatusWithDetails" in output, tail(output)
    assert "--- PASS: TestZipDirectoryStoresSourcesAndLeavesCachesOut" in output, tail(output)
    assert "--- PASS: TestMutualTLSWithTheCAAndAClientCertificateSendsTheToken" in output
    assert "--- PASS: TestTLSHandshakesThatMustFail" in output, tail(output)
    assert "--- FAIL" not in output, tail(output)


class Serve:
    def __init__(self, popen: subprocess.Popen[str], grpc_address: str, log: Path) -> None:
        self.popen = popen
        self.grpc_address = grpc_address
        self.log = log

    def log_tail(self) -> str:
        return tail(self.log.read_text(errors="replace"))


def stop(popen: subprocess.Popen[str], log: Path) -> None:
    """SIGTERM, then wait for the drain; a server that hangs is killed and fails the test."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=90)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
            pytest.fail(f"modelctl serve ignored SIGTERM for 90 s:\n{tail(log.read_text())}")


@contextlib.contextmanager
def modelctl_serve(data_dir: Path, start_timeout_s: float = 180) -> Iterator[Serve]:
    """`modelctl serve` on free ports with its own local Ray; stopped with SIGTERM."""
    data_dir.mkdir(parents=True)
    log = data_dir.parent / "serve.log"
    with log.open("w") as stderr:
        popen = subprocess.Popen(
            [
                MODELCTL,
                "serve",
                "--grpc-port=0",
                "--console-port=0",
                "--http-port=0",
                f"--data-dir={data_dir}",
                "--num-cpus=4",
                "--num-gpus=1",
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"},
        )
    assert popen.stdout is not None
    with popen.stdout:
        try:
            line = ""
            deadline = time.monotonic() + start_timeout_s
            while not line and popen.poll() is None:
                left = deadline - time.monotonic()
                assert left > 0, (
                    f"no ready line after {start_timeout_s:g} s:\n{tail(log.read_text())}"
                )
                readable, _, _ = select.select([popen.stdout], [], [], min(left, 1.0))
                if readable:
                    line = popen.stdout.readline()
            assert line.startswith("ready grpc="), (
                f"unexpected first line {line!r}:\n{tail(log.read_text())}"
            )
            fields = dict(part.split("=", 1) for part in line.split()[1:])
            yield Serve(popen, fields["grpc"], log)
        finally:
            stop(popen, log)
    assert popen.returncode == 0, (
        f"modelctl serve exited {popen.returncode}:\n{tail(log.read_text())}"
    )


@pytest.mark.timeout(600)
def test_the_go_client_example_runs_the_whole_workflow(tmp_path: Path) -> None:
    binary = tmp_path / "workflow"
    go(tmp_path, "build", "-o", str(binary), PACKAGES[1])
    with modelctl_serve(tmp_path / "data") as server:
        try:
            run = subprocess.run(
                [
                    str(binary),
                    "-server",
                    server.grpc_address,
                    "-project",
                    "projects/default",
                    "-model-id",
                    "iris-from-go",
                    "-source",
                    str(EXAMPLES / "iris-v1"),
                    "-timeout",
                    "4m",
                    "-token-file",
                    str(tmp_path / "data" / "admin.token"),
                ],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            pytest.fail(f"the example hung:\n{tail(out)}\nserver log:\n{server.log_tail()}")
        out, err = run.stdout, run.stderr
        failure = f"stdout:\n{tail(out)}\nstderr:\n{tail(err)}\nserver log:\n{server.log_tail()}"
    assert run.returncode == 0, failure
    assert "bad request -> INVALID_ARGUMENT INVALID_ID [model_id: " in out, failure
    assert "created projects/default/models/iris-from-go" in out, failure
    assert "create_build: deployed (done)" in out, failure
    assert "without a key -> 401" in out, "the endpoint wants a key: " + failure
    assert 'with the key -> 200 {"classes":["setosa"],"version":1}' in out, failure
    # Scaling with the same build keeps each replica's id and pid; restart replaces all.
    assert "2 of 2 replicas kept their id and pid" in out, "scaled in place: " + failure
    assert "scaled: DEPLOYED with 3 replicas" in out, failure
    assert "restarted: DEPLOYED, 3 of 3 replicas new (new id and pid)" in out, failure
    replicas = re.findall(r"^  replica (\S+) \(pid (\d+)\): (.+)$", out, re.MULTILINE)
    assert len(replicas) == 6, failure
    scaled, restarted = replicas[:3], replicas[3:]
    assert sorted(what for _, _, what in scaled) == ["kept", "kept", "new"], failure
    assert [what for _, _, what in restarted] == ["new"] * 3, failure
    assert not {i for i, _, _ in scaled} & {i for i, _, _ in restarted}, failure
    assert not {p for _, p, _ in scaled} & {p for _, p, _ in restarted}, failure
    assert "stopped: STOPPED" in out, failure
    # The watch followed every change, the stop included: STOPPING, then STOPPED.
    assert "UPDATED Model DEPLOYING" in out, "the watch followed the changes: " + failure
    saw = r"^watch saw the stop: (\S+ -> )*STOPPING( -> \S+)* -> STOPPED"
    assert re.search(saw, out, re.MULTILINE), failure
    events = re.findall(r"^  event \d+: UPDATED Model (\S+)$", out, re.MULTILINE)
    assert "STOPPING" in events, failure
    assert "STOPPED" in events[events.index("STOPPING") :], failure
    # A stopped model's endpoint no longer answers its still valid key.
    after_stop = re.search(r"^after stop: POST \S+ with the key -> (.+)$", out, re.MULTILINE)
    assert after_stop is not None, failure
    assert not after_stop.group(1).startswith("200"), "no answer after stop: " + failure
    assert "watch ended" not in err, failure
