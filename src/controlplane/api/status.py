"""Domain errors -> gRPC status with google.rpc details, exactly once, at the edge."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from controlplane.api import convert
from controlplane.domain import errors

log = logging.getLogger(__name__)

DOMAIN = convert.ERROR_DOMAIN

_CODES: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def code_of(err: errors.DomainError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.UNKNOWN


def to_status(err: errors.DomainError) -> grpc.Status:
    code = code_of(err)
    details: list[any_pb2.Any] = []
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=dict(err.metadata))
    )
    details.append(info)
    if err.violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in err.violations
                ]
            )
        )
        details.append(bad)
    status = status_pb2.Status(
        code=code_pb2.Code.Value(code.name), message=err.message, details=details
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


def internal_status(exc: BaseException) -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error ({type(exc).__name__}); see server log",
        details=[info],
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]]
StreamHandler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[R]]


def unary(fn: Handler[R]) -> Handler[R]:
    """Maps exceptions of a unary (or client-streaming) handler to a rich status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            return await fn(self, request, context)
        except errors.DomainError as e:
            await context.abort_with_status(to_status(e))
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            log.exception("internal error in %s", fn.__name__)
            await context.abort_with_status(internal_status(e))
        raise AssertionError("unreachable")

    return wrapper


def stream(fn: StreamHandler[R]) -> StreamHandler[R]:
    """Maps exceptions of a server-streaming handler to a rich status."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[R]:
        try:
            async for item in fn(self, request, context):
                yield item
        except errors.DomainError as e:
            await context.abort_with_status(to_status(e))
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            log.exception("internal error in %s", fn.__name__)
            await context.abort_with_status(internal_status(e))

    return wrapper
