"""OpenTelemetry traces: RPC -> job -> backend (Ray) call, one trace. Off unless configured.

The RPC's span (api/interceptor.py) continues the caller's trace when the call's metadata
carries a valid W3C ``traceparent`` (and ``tracestate``), and is a root otherwise. It is
current while the RPC writes its job, and the job
row keeps it as a W3C ``traceparent``; the dispatcher that runs the job, maybe later and
on another server, continues that trace, and every backend call is a span of the job.
Jobs a job enqueues (a build's deploy) carry the job's span in turn.

Until ``configure`` is called every span is a no-op and ``traceparent()`` is empty.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

SCOPE = "controlplane"
_propagator = TraceContextTextMapPropagator()
_tracer: Tracer = trace.NoOpTracer()


def active() -> bool:
    """Whether spans go anywhere (``configure`` ran): when not, callers may skip them."""
    return not isinstance(_tracer, trace.NoOpTracer)


def endpoint_from_env() -> str:
    """The OTLP/HTTP traces endpoint the standard OpenTelemetry variables name, if any."""
    explicit = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
    if explicit:
        return explicit
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    return f"{base.rstrip('/')}/v1/traces" if base else ""


def configure(
    exporter: SpanExporter, service_name: str = "modelctl", server_id: str = ""
) -> Callable[[], None]:
    """Turns tracing on, spans going to ``exporter`` in batches; returns the function that
    flushes and turns it off again (the server calls it when it stops)."""
    global _tracer
    attributes: dict[str, Any] = {"service.name": service_name}
    if server_id:
        attributes["service.instance.id"] = server_id
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _tracer = provider.get_tracer(SCOPE)

    def shutdown() -> None:
        global _tracer
        _tracer = trace.NoOpTracer()
        provider.shutdown()  # exports what is still buffered

    return shutdown


def otlp_exporter(endpoint: str) -> SpanExporter:
    """Spans as OTLP over HTTP (protobuf) to ``endpoint``, e.g. http://collector:4318/v1/traces."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint)


@contextlib.contextmanager
def span(
    name: str,
    parent: str = "",
    kind: SpanKind = SpanKind.INTERNAL,
    tracestate: str = "",
    **attributes: str | int | float | bool,
) -> Iterator[Span]:
    """A span, current inside the block; a child of ``parent`` (a traceparent, with its
    ``tracestate``) if given, else of the current span; a root when ``parent`` is given
    but not a valid traceparent. Exceptions are recorded on it and re-raised."""
    context = context_of(parent, tracestate) if parent else None
    with _tracer.start_as_current_span(
        name, context=context, kind=kind, attributes=attributes
    ) as current:
        yield current


def context_of(traceparent: str, tracestate: str = "") -> Context:
    """The context of a remote parent span; an empty one when ``traceparent`` is not valid."""
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _propagator.extract(carrier, context=Context())


def traceparent() -> str:
    """The current span as a W3C traceparent header value ("" when not tracing)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def trace_id() -> str:
    """The current trace's id in hex, for log lines ("" when not tracing)."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def error_status(description: str) -> Status:
    return Status(StatusCode.ERROR, description)
