"""Every RPC, observed: a server span, Prometheus counts and latency, and log context.

Each method's handler is wrapped once, when the services register (api/wiring.py), so
a streaming RPC is observed for its whole life and its status code is the one the client
sees. Not a grpc.aio server interceptor: those run again for every call (a coroutine per
interceptor, a new handler each time), which cost a quarter of GetModel's throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from controlplane import logs, tracing
from controlplane.metrics import Metrics

# Longer than any name that can exist (a build's or deployment's is at most ~170).
MAX_NAME = 300


def about(request: Any) -> dict[str, str]:
    """The model and operation a request names (its ``name`` or ``parent``), for logs and
    spans; a value too long to name anything is left out (it is refused anyway)."""
    out: dict[str, str] = {}
    for field in ("name", "parent"):
        value = getattr(request, field, "")
        if not isinstance(value, str) or not value or len(value) > MAX_NAME:
            continue
        parts = value.split("/")
        if parts[0] == "operations":
            out["operation"] = value
        elif len(parts) >= 4 and parts[0] == "projects" and parts[2] == "models":
            out["model"] = "/".join(parts[:4])
    return out


def caller_trace(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str]:
    """The W3C ``traceparent`` and ``tracestate`` the caller sent in the call's metadata
    ("" for each it did not send), so that the RPC's span joins the caller's trace."""
    found = {"traceparent": "", "tracestate": ""}
    for key, value in context.invocation_metadata() or ():
        if key in found and not found[key] and isinstance(value, str):
            found[key] = value.strip()
    return found["traceparent"], found["tracestate"]


def code_of(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name  # the client went away
    code = context.code()
    if code is None or isinstance(code, int):  # not set by the handler
        if exc is not None and not isinstance(exc, grpc.aio.AbortError):
            return grpc.StatusCode.UNKNOWN.name
        return grpc.StatusCode.OK.name
    return str(code.name)


class TelemetryInterceptor:
    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``method`` (/package.Service/Method) observed: wrapped once, at registration."""
        service, _, name = method.lstrip("/").rpartition("/")
        observe = _Observer(self.metrics, method.lstrip("/"), service, name, _rpc_type(handler))
        return rewrap(handler, observe.unary, observe.stream, observe.unary, observe.stream)


Wrap = Callable[[Any], Any]


def rewrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    unary_unary: Wrap,
    unary_stream: Wrap,
    stream_unary: Wrap,
    stream_stream: Wrap,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same method, its behavior wrapped by the function for its kind of call."""
    codec = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_unary(handler.unary_unary), *codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(unary_stream(handler.unary_stream), *codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(stream_unary(handler.stream_unary), *codec)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(stream_stream(handler.stream_stream), *codec)


def _rpc_type(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    if handler.unary_unary:
        return "unary"
    if handler.unary_stream:
        return "server_stream"
    if handler.stream_unary:
        return "client_stream"
    return "bidi_stream"


class _Observer:
    """One method's observation (made once, at registration): its metrics' children are
    bound here, not looked up again on every call."""

    def __init__(
        self, metrics: Metrics | None, full: str, service: str, method: str, kind: str
    ) -> None:
        self.full = full
        self.labels = (service, method, kind)
        self.started = self.seconds = None
        self.handled: Callable[[str], Any] | None = None
        if metrics is not None:
            self.started = metrics.rpc_started.labels(*self.labels)
            self.seconds = metrics.rpc_seconds.labels(*self.labels)
            self.handled = functools.cache(
                lambda code: metrics.rpc_handled.labels(*self.labels, code)
            )

    @contextlib.contextmanager
    def _observing(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Iterator[None]:
        """Around one call: its log context and span; its count, code and time at the end."""
        if self.started is not None:
            self.started.inc()
        start = time.perf_counter()
        exc: BaseException | None = None
        with logs.about(rpc=self.full, **about(request)), self._span(context) as span:
            try:
                yield
            except BaseException as e:
                exc = e
                raise
            finally:
                code = code_of(context, exc)
                if self.handled is not None and self.seconds is not None:
                    self.handled(code).inc()
                    self.seconds.observe(time.perf_counter() - start)
                if span is not None:
                    span.set_attribute("rpc.grpc.status_code", code)
                    if code != "OK":
                        span.set_status(Status(StatusCode.ERROR, code))

    def _span(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> contextlib.AbstractContextManager[Span | None]:
        """The call's server span, a child of the caller's; none while nothing is traced."""
        if not tracing.active():
            return contextlib.nullcontext()
        parent, state = caller_trace(context)
        return tracing.span(self.full, parent, SpanKind.SERVER, state, **{"rpc.system": "grpc"})

    def unary(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with self._observing(request, context):
                return await behavior(request, context)

        return observed

    def stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            # A stream that sends with context.write(): observed as one await, and
            # still a coroutine function, which is how gRPC tells it from a generator.
            return self.unary(behavior)

        async def observed(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            with self._observing(request, context):
                async for item in behavior(request, context):
                    yield item

        return observed
