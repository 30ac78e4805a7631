"""Registers the gRPC services on a server: ModelLifecycle, health, reflection.

Every method's handler is wrapped once here, as it is registered (telemetry outside,
then auth: ``Wrap``), instead of by grpc.aio server interceptors, which run their chain
again for every call and cost a quarter of GetModel's throughput (bench/rpc.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane.api.servicer import ModelLifecycleServicer
from modellifecycle.v1 import service_pb2

SERVICE = service_pb2.DESCRIPTOR.services_by_name["ModelLifecycle"]
SERVICE_NAME: str = SERVICE.full_name
# Streams whose handler writes each message already encoded (the servicer encodes each
# change once, whatever the number of streams it goes to): no serializer.
PRE_ENCODED = frozenset({"WatchModel", "WatchModels"})

_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(servicer: ModelLifecycleServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """Each method of the service, as the generated code registers it, except that the
    watch streams write bytes the servicer encoded."""
    table = {}
    for method in SERVICE.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        encode: Callable[[Message], bytes] | None = response.SerializeToString
        if method.name in PRE_ENCODED:
            encode = None
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        table[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=encode,
        )
    return table


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# (/package.Service/Method, handler) -> the handler wrapped
Wrap = Callable[[str, "grpc.RpcMethodHandler[Any, Any]"], "grpc.RpcMethodHandler[Any, Any]"]


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A service's generic handler whose handlers come out wrapped, each once per method."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrap: Wrap) -> None:
        self.inner = inner
        self.wrap = wrap
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def service(self, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self.inner.service(details)
        if handler is None:
            return None
        kept = self._wrapped.get(details.method)
        if kept is None or kept[0] is not handler:
            kept = (handler, self.wrap(details.method, handler))
            self._wrapped[details.method] = kept
        return kept[1]


class _Registering(grpc.aio.Server):
    """The server as a service sees it while it registers (health, reflection: their own
    add_*_to_server functions): each handler it adds is wrapped, then added for real."""

    def __init__(self, server: grpc.aio.Server, wrap: Wrap) -> None:
        self.server = server
        self.wrap = wrap

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self.server.add_generic_rpc_handlers(
            tuple(_WrappedGeneric(h, self.wrap) for h in generic_rpc_handlers)
        )

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        self.server.add_registered_method_handlers(
            service_name,
            {m: self.wrap(f"/{service_name}/{m}", h) for m, h in method_handlers.items()},
        )

    # Nothing registering calls these.
    def add_insecure_port(self, address: str) -> int:
        raise NotImplementedError

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self, grace: float | None) -> None:
        raise NotImplementedError

    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 (the base's signature)
        raise NotImplementedError


def register(
    server: grpc.aio.Server, servicer: ModelLifecycleServicer, wrap: Wrap
) -> health.aio.HealthServicer:
    """Adds every service, each method's handler wrapped once by ``wrap``; returns the
    health servicer so the server can flip its status."""
    target = _Registering(server, wrap)
    table = method_handlers(servicer)
    target.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, table),))
    target.add_registered_method_handlers(SERVICE_NAME, table)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, target)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), target
    )
    return checker


async def set_serving(checker: health.aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE_NAME):
        await checker.set(name, status)
