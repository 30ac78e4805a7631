"""Log lines name what they are about, in JSON for log stores and in text for people;
the context follows work into threads and is undone when the work ends."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest

from controlplane import logs
from controlplane.api.interceptor import about
from modellifecycle.v1 import service_pb2 as rpc

MODEL = "projects/p/models/iris"


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[None]:
    """logs.setup replaces the root logger's handlers and captures warnings: pytest's
    handlers and warnings come back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in logs.OWN:
        logging.getLogger(name).setLevel(logging.NOTSET)


def setup(fmt: str) -> io.StringIO:
    logs.setup(fmt, server_id="cp-test")
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    out = io.StringIO()
    handler.setStream(out)
    return out


@pytest.fixture
def captured() -> tuple[logging.Logger, io.StringIO]:
    return logging.getLogger("controlplane.test"), setup("json")


def lines(out: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_json_lines_carry_the_model_and_operation_into_threads(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = captured
    log.info("before")
    with logs.about(model=MODEL, operation="operations/7"):
        await asyncio.to_thread(log.info, "in a thread %d", 1)
        with logs.about(operation="operations/8"):
            log.warning("nested")
        log.info("back")
    log.info("after")
    got = [(ln["message"], ln["model"], ln["operation"]) for ln in lines(out)]
    assert got == [
        ("before", "", ""),
        ("in a thread 1", MODEL, "operations/7"),
        ("nested", MODEL, "operations/8"),
        ("back", MODEL, "operations/7"),
        ("after", "", ""),
    ]
    first = lines(out)[0]
    assert first["level"] == "INFO" and first["logger"] == "controlplane.test"
    assert first["server"] == "cp-test" and first["trace_id"] == ""


def test_an_error_line_keeps_its_traceback_in_one_json_object(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = captured
    try:
        raise ValueError("bad weights")
    except ValueError:
        log.exception("loading failed")
    (line,) = lines(out)
    assert line["message"] == "loading failed"
    assert "ValueError: bad weights" in line["exception"]


def test_a_warning_is_a_json_line_too(captured: tuple[logging.Logger, io.StringIO]) -> None:
    _, out = captured
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old weights format", DeprecationWarning, stacklevel=1)
    (line,) = lines(out)
    assert line["logger"] == "py.warnings" and line["level"] == "WARNING"
    assert "DeprecationWarning: old weights format" in line["message"]
    assert line["server"] == "cp-test"


def test_text_lines_end_with_what_they_are_about() -> None:
    out = setup("text")
    with logs.about(model=MODEL, operation="operations/7"):
        logging.getLogger("x").info("deployed")
    logging.getLogger("x").info("idle")
    first, second = out.getvalue().splitlines()
    assert first.endswith(f"x: deployed [{MODEL} operations/7]")
    assert second.endswith("x: idle")


def test_requests_name_their_model_or_operation() -> None:
    assert about(rpc.GetModelRequest(name=MODEL)) == {"model": MODEL}
    assert about(rpc.GetBuildRequest(name=f"{MODEL}/builds/3")) == {"model": MODEL}
    assert about(rpc.ListModelsRequest(parent="projects/p")) == {}
    assert about(rpc.GetOperationRequest(name="operations/ab12")) == {
        "operation": "operations/ab12"
    }
    assert about(object()) == {}
    # A 100 KB name names nothing: it never reaches a log line or a span.
    assert about(rpc.GetModelRequest(name=MODEL + "x" * 100_000)) == {}


def test_debug_reaches_this_projects_loggers_only() -> None:
    """--log-level debug: each reconciler look and apply step, not every library's chatter."""
    logs.setup("json", server_id="cp-test", level=logging.DEBUG)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    out = io.StringIO()
    handler.setStream(out)
    logging.getLogger("controlplane.reconciler").debug("look: model DEPLOYING")
    logging.getLogger("workers.ray_backend").debug("apply: 1 applications")
    logging.getLogger("a_library.engine").debug("SELECT 1")
    logging.getLogger("a_library.engine").info("BEGIN")
    said = [json.loads(line)["message"] for line in out.getvalue().splitlines()]
    assert said == ["look: model DEPLOYING", "apply: 1 applications", "BEGIN"]
