"""The TypeScript client (clients/typescript) keeps working: `npm test` compiles it and runs
its node:test suite, which starts a real `modelctl serve` (a local Ray cluster of its own)
and goes through the whole workflow with it: errors, create, upload, build and deploy,
the endpoint, scale in place, restart, stop, and watches."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.certs import Authority

PACKAGE = ROOT / "clients" / "typescript"
MODELCTL = Path(sys.executable).with_name("modelctl")
pytestmark = pytest.mark.ray

# What the workflow suite must report as passed, by name (node's spec reporter: "✔ name").
EXPECTED = (
    "without a token every call is UNAUTHENTICATED",
    "a bad model id is INVALID_ARGUMENT with reason INVALID_ID and a field violation",
    "an unknown model is NOT_FOUND with reason MODEL_NOT_FOUND",
    "create, upload, build and deploy 2 replicas",
    "the endpoint answers a POST with an invocation key, and 401 without",
    "scaling to 3 replicas with the same build is in place",
    "restart replaces every replica",
    "stop: a watch started before sees STOPPING then STOPPED",
    "mutual TLS with the CA and a client certificate gets in",
    "without a client certificate the handshake fails",
)


def npm() -> str:
    node, npm_path = shutil.which("node"), shutil.which("npm")
    if node is None or npm_path is None:
        pytest.skip("node and npm are not installed (the TypeScript client needs Node.js 20)")
    if not (PACKAGE / "node_modules").is_dir():
        pytest.skip(f"{PACKAGE / 'node_modules'} is missing: run `npm ci` in {PACKAGE}")
    return npm_path


def summary(out: str, key: str) -> int:
    """A count from the reporter's summary (a line such as "i pass 13"), -1 when missing."""
    found = re.search(rf"^\S*\s*{key} (\d+)$", out, re.MULTILINE)
    return int(found.group(1)) if found else -1


@pytest.mark.timeout(600)
def test_the_typescript_client_passes_its_suite_against_a_real_server(tmp_path: Path) -> None:
    certs = tmp_path / "certs"  # for test/tls.test.ts: a CA, a server and a client
    ca = Authority(certs, "ca")
    ca.issue("server", server=True)
    ca.issue("client", server=False)
    env = {
        **os.environ,
        "TLS_CERTS_DIR": str(certs),
        "MODELCTL": str(MODELCTL),
        "RAY_AUTH_MODE": "disabled",
        "NO_COLOR": "1",
        "FORCE_COLOR": "0",
    }
    done = subprocess.run(
        [npm(), "test"],
        cwd=PACKAGE,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    out = done.stdout + done.stderr
    tail = out[-6000:]
    assert done.returncode == 0, tail
    assert summary(out, "fail") == 0, tail
    assert summary(out, "pass") == summary(out, "tests") >= len(EXPECTED), tail
    passed = [line.strip() for line in out.splitlines() if line.strip().startswith("✔")]
    for name in EXPECTED:
        assert any(name in line for line in passed), f"{name!r} did not pass:\n{tail}"
