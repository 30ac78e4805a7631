"""Registers the gRPC services on a server: ModelLifecycle, health, reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane.api.servicer import ModelLifecycleServicer
from modellifecycle.v1 import service_pb2, service_pb2_grpc

SERVICE_NAME: str = service_pb2.DESCRIPTOR.services_by_name["ModelLifecycle"].full_name


def register(
    server: grpc.aio.Server, servicer: ModelLifecycleServicer
) -> health.aio.HealthServicer:
    """Adds every service; returns the health servicer so the server can flip its status."""
    service_pb2_grpc.add_ModelLifecycleServicer_to_server(servicer, server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
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
