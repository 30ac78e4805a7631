"""The exported image's command: serves one model function over HTTP, as a replica does.

``workers.oci`` copies this file into the image as ``/opt/model/.cp_serve.py`` and
``workers/loader.py`` beside it as ``.cp_loader.py``: the model loads exactly as in the
build's check and in a replica, and answers POST in ``workers.model_app``'s wire format.
It runs on the base image's Python, so: standard library only, Python 3.8 syntax.

Configured by the environment the Containerfile sets: CP_MODEL_FILE,
CP_MODEL_FUNCTION, CP_BUILD and PORT; CP_HOST (default 0.0.0.0) and CP_MODEL_ROOT
(default: this file's folder) for running it elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # workers.image_server, in this repository
    from workers import loader
else:  # .cp_serve.py in the image: the loader is beside it (oci.LOADER_FILE)
    _here = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.util.spec_from_file_location(
        "_cp_loader", os.path.join(_here, ".cp_loader.py")
    )
    loader = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = loader
    _spec.loader.exec_module(loader)

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

    ModelFunction = Callable[[Any], Any]


def _plain(value: Any) -> Any:
    """Makes NumPy arrays and scalars (and anything with tolist/item) JSON-friendly."""
    for attr in ("tolist", "item"):
        method = getattr(value, attr, None)
        if callable(method):
            return method()
    raise TypeError(f"the model returned a {type(value).__name__}, which is not JSON")


def invoke(fn: ModelFunction, raw: bytes, replica: str, build: str) -> tuple[int, bytes]:
    """(status, body) for one request body: ``model_app.invoke``'s wire format."""
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as e:
        error = f"the request body is not JSON: {e}"
        return 400, json.dumps({"success": False, "error": error}).encode()
    try:
        reply = {"success": True, "response": fn(body), "replica_id": replica, "build": build}
        return 200, json.dumps(reply, default=_plain).encode()
    except Exception as e:  # the user's code: report it, keep serving
        last = traceback.extract_tb(e.__traceback__)[-1:]
        where = f" ({os.path.basename(last[0].filename)}:{last[0].lineno})" if last else ""
        error = f"{type(e).__name__}: {e}{where}"
        reply = {"success": False, "error": error, "replica_id": replica, "build": build}
        return 500, json.dumps(reply).encode()


def handler(fn: ModelFunction, build: str) -> type[BaseHTTPRequestHandler]:
    """The request handler class for one loaded model function."""
    replica = socket.gethostname()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "modelctl-serve"

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self.send(400, json.dumps({"success": False, "error": "bad Content-Length"}))
                return
            raw = self.rfile.read(length) if length > 0 else b""
            status, body = invoke(fn, raw, replica, build)
            self.send(status, body)

        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/healthz":
                self.send(200, json.dumps({"status": "ok", "build": build}))
            else:
                error = "POST a JSON body to call the model"
                self.send(404, json.dumps({"success": False, "error": error}))

        def send(self, status: int, body: bytes | str) -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.abspath(os.environ.get("CP_MODEL_ROOT") or here)
    file_path = os.environ.get("CP_MODEL_FILE", "model.py")
    function = os.environ.get("CP_MODEL_FUNCTION", "predict")
    build = os.environ.get("CP_BUILD", "")
    try:
        fn = loader.load(root, file_path, function)
    except loader.LoadFailed as e:
        cause = e.__cause__
        if cause is not None:  # the model's own traceback, then the one line
            traceback.print_exception(type(cause), cause, cause.__traceback__)
        sys.stderr.write(f"cannot load {file_path}:{function}: {e.reason}\n")
        return 1
    signal.signal(signal.SIGTERM, _stop)  # as PID 1, SIGTERM is ignored without a handler
    host = os.environ.get("CP_HOST", "0.0.0.0")
    server = ThreadingHTTPServer((host, int(os.environ.get("PORT", "8080"))), handler(fn, build))
    server.daemon_threads = True
    print(f"serving {file_path}:{function} on http://{host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
