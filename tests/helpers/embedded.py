"""`modelctl serve` in a process of its own with its embedded local Ray (no --ray-address),
for the tests of what only a whole server with its own cluster shows."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import Stub
from tests.helpers.servers import MODELCTL


class Serve:
    def __init__(
        self, data: Path, *args: str, auth: bool = False, prefix: Sequence[str] = ()
    ) -> None:
        """``args``: more `modelctl serve` flags (e.g. --ray-address). ``auth``: tokens
        and invocation keys needed (the first admin token: ``admin_token()``). ``prefix``:
        what the command runs under (e.g. ``ray_nodes.sharing_no_disk``)."""
        self.data = data
        self.args = args
        self.auth = auth
        self.prefix = list(prefix)
        self.popen: subprocess.Popen[str] | None = None
        self.grpc = ""

    def start(self) -> None:
        log = self._log()
        self.popen = subprocess.Popen(
            [
                *self.prefix,
                MODELCTL,
                "serve",
                *([] if self.auth else ["--insecure-no-auth"]),
                "--console-port=0",
                "--grpc-port=0",
                "--http-port=0",
                f"--data-dir={self.data}",
                "--num-cpus=2",
                "--num-gpus=1",
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()  # the process has its own copy
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline().strip()
        assert line.startswith("ready grpc="), f"unexpected first line {line!r}"
        self.grpc = line.split()[1].removeprefix("grpc=")

    def admin_token(self) -> str:
        return (self.data / "admin.token").read_text().strip()

    def _log(self) -> Any:
        """Its log, beside its data dir (serve-N.log, one per start), for a failure."""
        self.starts = getattr(self, "starts", 0) + 1
        self.data.parent.mkdir(parents=True, exist_ok=True)
        return (self.data.parent / f"serve-{self.starts}.log").open("w")

    def kill(self) -> None:
        """SIGKILL, if it still runs (a test that failed before stopping it)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        if self.popen is not None and self.popen.stdout is not None:
            self.popen.stdout.close()

    def stop(self) -> int:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        code = self.popen.wait(120)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return code


def serving(data: Path) -> Iterator[Serve]:
    """A server on ``data``, killed at the end if a test left it running."""
    s = Serve(data)
    yield s
    s.kill()


async def answers(stub: Stub, model: str, seconds: float, key: str = "") -> dict[str, object]:
    """The model's answer once it is DEPLOYED and answers 200 (``key``: an invocation key)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(timeout=10, headers=headers) as http:

        async def answer() -> dict[str, object]:
            m = await stub.GetModel(rpc.GetModelRequest(name=model))
            assert m.state == pb.MODEL_STATE_DEPLOYED, pb.ModelState.Name(m.state)
            try:
                r = await http.post(m.endpoint, json={"x": 1})
            except httpx.HTTPError as e:
                raise AssertionError(f"no answer: {e!r}") from e
            assert r.status_code == 200, r.text
            body: dict[str, object] = r.json()
            return body

        return await eventually(f"{model} answering", answer, seconds, 1)
