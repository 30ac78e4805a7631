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
import json
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers import loader

ModelFunction = Callable[[Any], Any]


class LoadError(RuntimeError):
    """The artifact cannot be loaded. Its message is one marked line (``loader.MARK``
    and the reason): Serve reports it inside a long deployment message, from which
    ``loader.reason_in`` takes that line back."""

    def __init__(self, reason: str) -> None:
        super().__init__(loader.MARK + reason)
        self.reason = reason


def load_function(artifact_path: str, file_path: str, function_name: str) -> ModelFunction:
    """Loads ``function_name`` from the artifact as the build's check did (``workers.loader``:
    the module's folder, the artifact and its requirements on sys.path, the artifact as
    the working directory). Raises LoadError, caused by the model's own exception."""
    try:
        return loader.load(artifact_path, file_path, function_name)
    except loader.LoadFailed as e:
        raise LoadError(e.reason) from e.__cause__


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
