"""The server's logs: text for people, or JSON lines for a log store (--log-format json).

Every line carries what it is about: the model and the operation (set by the RPC or the
job that is running, empty otherwise), the RPC method, the trace id when tracing, and
the server's id. The values live in context variables, so they follow the work into
asyncio tasks and ``asyncio.to_thread`` calls.

Everything the server writes to stderr goes through the root logger's one handler: the
warnings module's (``py.warnings``), and Ray's and Serve's, whose own stderr handlers the
Ray backend removes once ray is imported and started (workers/ray_backend.py; it does
not import this module). Ray workers' output is not streamed to the server
(``log_to_driver=False``): it stays in Ray's log files.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

from controlplane import tracing

FIELDS = ("model", "operation", "rpc")
_context: dict[str, contextvars.ContextVar[str]] = {
    name: contextvars.ContextVar(f"log_{name}", default="") for name in FIELDS
}


@contextlib.contextmanager
def about(**values: str) -> Iterator[None]:
    """Log lines inside the block name these (model=..., operation=..., rpc=...)."""
    tokens = [(_context[k], _context[k].set(v)) for k, v in values.items() if v]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class _ContextFilter(logging.Filter):
    def __init__(self, server_id: str) -> None:
        super().__init__()
        self.server_id = server_id

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _context.items():
            setattr(record, name, var.get())
        record.trace_id = tracing.trace_id()
        record.server = self.server_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the context, and the
    exception's traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "model": getattr(record, "model", ""),
            "operation": getattr(record, "operation", ""),
            "rpc": getattr(record, "rpc", ""),
            "trace_id": getattr(record, "trace_id", ""),
            "server": getattr(record, "server", ""),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    """The usual line, with ``[model operation]`` when the line is about one."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        about = " ".join(v for v in (getattr(record, f, "") for f in ("model", "operation")) if v)
        return f"{text} [{about}]" if about else text


OWN = ("controlplane", "workers")  # the loggers ``level`` reaches below INFO


def setup(fmt: str = "text", server_id: str = "", level: int = logging.INFO) -> None:
    """The root logger writes to stderr in ``fmt`` ("text" or "json"), warnings included.

    ``level`` below INFO (DEBUG: each reconciler look at a changing model, each apply's
    steps) applies to this project's loggers only; the libraries' stay at INFO."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter(server_id))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(level, logging.INFO))
    for name in OWN:
        logging.getLogger(name).setLevel(level)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn's lines too, not plain text beside them
