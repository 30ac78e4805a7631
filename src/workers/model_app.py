"""What a serving replica does with a model's artifact: load the entry function, call it.

Pure Python (no ray): ``ray_backend`` wraps it in a Serve deployment, and unit
tests call it directly. The wire format is the contract's:
``{"success": true, "response": ..., "replica_id": ..., "build": ...}``, and
``{"success": false, "error": ...}`` with HTTP 500 when the user's code raises
(the replica stays up) or 400 when the body is not JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.builder import SITE_DIR

ModelFunction = Callable[[Any], Any]


class LoadError(RuntimeError):
    """The artifact cannot be loaded: Serve reports this message as the deploy failure."""


def load_function(artifact_path: str, file_path: str, function_name: str) -> ModelFunction:
    """Imports ``file_path`` from the artifact (its dependencies first on sys.path) and
    returns ``function_name``. The replica's working directory becomes the artifact,
    so the model finds files it ships beside its code by relative path."""
    root = Path(artifact_path)
    module_file = root / file_path
    if not module_file.is_file():
        raise LoadError(f"{file_path} is not in the artifact {artifact_path}")
    for entry in (str(root / SITE_DIR), str(module_file.parent), str(root)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    os.chdir(root)
    module_name = "_cp_model_" + Path(file_path).with_suffix("").as_posix().replace("/", "_")
    spec = importlib.util.spec_from_file_location(module_name, module_file)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot import {file_path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)  # the user's import-time errors propagate as they are
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise LoadError(f"{file_path} has no callable {function_name!r}")
    return fn  # type: ignore[no-any-return]


def _plain(value: Any) -> Any:
    """Makes NumPy arrays and scalars (and anything with tolist/item) JSON-friendly."""
    for attr in ("tolist", "item"):
        method = getattr(value, attr, None)
        if callable(method):
            return method()
    raise TypeError(f"the model returned a {type(value).__name__}, which is not JSON")


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes


def _reply(status: int, payload: dict[str, Any]) -> Reply:
    return Reply(status, json.dumps(payload, default=_plain).encode())


def invoke(fn: ModelFunction, raw_body: bytes, replica_id: str, build: str) -> Reply:
    """Calls the model on one request body and returns the HTTP status and JSON body."""
    try:
        body = json.loads(raw_body) if raw_body else None
    except (ValueError, UnicodeDecodeError) as e:
        return _reply(400, {"success": False, "error": f"the request body is not JSON: {e}"})
    try:
        response = fn(body)
        return _reply(
            200,
            {"success": True, "response": response, "replica_id": replica_id, "build": build},
        )
    except Exception as e:  # the user's code: report it, keep the replica up
        last = traceback.extract_tb(e.__traceback__)[-1:]
        where = f" ({Path(last[0].filename).name}:{last[0].lineno})" if last else ""
        return _reply(
            500,
            {
                "success": False,
                "error": f"{type(e).__name__}: {e}{where}",
                "replica_id": replica_id,
                "build": build,
            },
        )


class KeyCheck:
    """The endpoint's door: open, or a request whose ``Authorization: Bearer <key>`` is a
    live invocation key of this model (compared by SHA-256; the replica never sees a key
    it did not get in a request)."""

    def __init__(self) -> None:
        self.open = False  # closed until the control plane says otherwise
        self._hashes: frozenset[str] = frozenset()

    def configure(self, config: Mapping[str, Any] | None) -> None:
        config = config or {}
        self.open = bool(config.get("open", False))
        self._hashes = frozenset(str(h) for h in config.get("keys", ()))

    def allows(self, authorization: str | None) -> bool:
        if self.open:
            return True
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        hashed = hashlib.sha256(key.strip().encode()).hexdigest()
        return any(hmac.compare_digest(hashed, h) for h in self._hashes)


UNAUTHORIZED = Reply(
    401,
    json.dumps(
        {
            "success": False,
            "error": "a live invocation key of this model is needed: Authorization: Bearer <key>",
        }
    ).encode(),
)
