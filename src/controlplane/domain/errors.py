"""Domain errors. Raised inside; mapped to gRPC status exactly once, at the edge."""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class DomainError(Exception):
    """Base of every error a client may see. ``reason`` is UPPER_SNAKE_CASE."""

    message: str
    reason: str = "ERROR"
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: Sequence[FieldViolation] = ()

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class InvalidArgument(DomainError):
    """A field is malformed or out of range (gRPC INVALID_ARGUMENT)."""


class NotFound(DomainError):
    """gRPC NOT_FOUND."""


class AlreadyExists(DomainError):
    """gRPC ALREADY_EXISTS."""


class FailedPrecondition(DomainError):
    """The system is not in a state the call needs (gRPC FAILED_PRECONDITION)."""


class Aborted(DomainError):
    """Another operation runs on the model (gRPC ABORTED); metadata names it."""


class OutOfRange(DomainError):
    """gRPC OUT_OF_RANGE (e.g. a watch revision older than retention)."""


class ResourceExhausted(DomainError):
    """gRPC RESOURCE_EXHAUSTED (e.g. an upload over the size limit, a full disk)."""


class Unavailable(DomainError):
    """gRPC UNAVAILABLE: a part the call needs (the database, the Ray cluster) does not
    answer now; nothing was changed, and the same call may be made again after
    ``retry_after_s`` (said in the status's RetryInfo)."""

    retry_after_s: float = 1.0


def disk_full(where: str, e: OSError) -> ResourceExhausted:
    return ResourceExhausted(
        message=f"the server's disk is full ({where}: {e.strerror or e}); nothing was kept",
        reason="DISK_FULL",
        metadata={"where": where},
    )


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


class Unauthenticated(DomainError):
    """No valid token (gRPC UNAUTHENTICATED); never says why, so nothing helps a guess."""


class PermissionDenied(DomainError):
    """A known resource, a role too weak for the call (gRPC PERMISSION_DENIED)."""


class InvalidTransition(Exception):
    """A state change not in domain/transitions.py: a bug, never a client error."""


def invalid_field(
    field_name: str, description: str, reason: str = "INVALID_FIELD"
) -> InvalidArgument:
    return InvalidArgument(
        message=f"{field_name}: {description}",
        reason=reason,
        metadata={"field": field_name},
        violations=(FieldViolation(field_name, description),),
    )


def check_text(value: str, field_name: str, limit: int) -> str:
    """``value`` if it is at most ``limit`` characters, else INVALID_ARGUMENT."""
    if len(value) > limit:
        raise invalid_field(field_name, f"at most {limit} characters, got {len(value)}")
    return value


def not_found(kind: str, name: str) -> NotFound:
    return NotFound(
        message=f"{kind} {name!r} not found",
        reason=f"{kind.upper()}_NOT_FOUND",
        metadata={"name": name},
    )
