"""The caller's W3C trace context, as the RPC span reads it from the call's metadata."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from controlplane import tracing
from controlplane.api.interceptor import caller_trace

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Context:
    def __init__(self, metadata: tuple[tuple[str, Any], ...] | None) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...] | None:
        return self.metadata


def test_the_first_traceparent_and_tracestate_of_the_metadata() -> None:
    metadata = (
        ("authorization", "Bearer x"),
        ("traceparent", PARENT),
        ("tracestate", "vendor=1"),
        ("traceparent", "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01"),
    )
    assert caller_trace(Context(metadata)) == (PARENT, "vendor=1")  # type: ignore[arg-type]
    assert caller_trace(Context(None)) == ("", "")  # type: ignore[arg-type]


def test_a_valid_traceparent_is_a_remote_parent_and_an_invalid_one_none() -> None:
    parent = trace.get_current_span(tracing.context_of(PARENT, "vendor=1")).get_span_context()
    assert parent.is_valid and parent.is_remote
    assert format(parent.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(parent.span_id, "016x") == "b7ad6b7169203331"
    assert parent.trace_state.get("vendor") == "1"
    for bad in ("garbage", "00-00000000000000000000000000000000-b7ad6b7169203331-01"):
        assert not trace.get_current_span(tracing.context_of(bad)).get_span_context().is_valid
