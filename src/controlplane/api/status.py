"""Domain errors -> gRPC status with google.rpc details, exactly once, at the edge."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
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
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def code_of(err: errors.DomainError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.UNKNOWN


# Every value an error quotes comes back in the trailers (grpc-message and, again, in
# grpc-status-details-bin), which a client refuses whole once they pass its metadata limit
# (8 KB soft, 16 KB hard by default): RESOURCE_EXHAUSTED instead of the real error. So a
# value is quoted by its first VALUE_CHARS characters, each text is cut to a number of
# bytes, and the whole is kept within TRAILER_BUDGET bytes (a tighter cut if needed).
VALUE_CHARS = 200
TRAILER_BUDGET = 4096


@dataclass(frozen=True)
class Cut:
    """How much of an error is kept: characters of a quoted value; UTF-8 bytes of the
    message, of a detail (a reason, metadata key or value, violation field or description);
    how many metadata entries and field violations."""

    value: int
    message: int
    detail: int
    metadata: int
    violations: int


# The first that fits TRAILER_BUDGET; the last always does (about 3 KB at most on the
# wire: 256 bytes of message, percent-encoded, plus under 2 KB of details, in base64).
CUTS = (
    Cut(value=VALUE_CHARS, message=1024, detail=512, metadata=16, violations=20),
    Cut(value=32, message=256, detail=64, metadata=8, violations=3),
)

# A value as repr() quotes it (the closing quote unescaped).
_QUOTED = {q: re.compile(rf"{q}(?:[^{q}\\]++|\\.)*+{q}", re.DOTALL) for q in "'\""}


@functools.cache
def _start(keep: int) -> re.Pattern[str]:
    """Where a value too long to quote whole may start: a quote at the start of the text
    or after a character that is not part of a word ("model's" is no quote), or an
    unbroken run of over ``keep`` other characters (a value not quoted)."""
    return re.compile(rf"(?<!\w)['\"]|[^\s'\"]{{{keep + 1},}}")


_ESCAPE = re.compile(r"\\(?:x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|N\{[^}]*\}|.)", re.DOTALL)


def _count(text: str) -> str:
    return f"({len(text)} characters)"


def _cut_quoted(literal: str, keep: int) -> str:
    """``'aaaa…' (100000 characters)``: a long quoted value, and its length as a value
    (an escape such as ``\\n`` or ``\\x00`` is one character)."""
    quote, inner = literal[0], literal[1:-1]
    length = len(inner) - sum(len(e.group()) - 1 for e in _ESCAPE.finditer(inner))
    return f"{quote}{inner[:keep]}…{quote} ({length} characters)"


def shorten_values(text: str, keep: int = VALUE_CHARS) -> str:
    """``text`` with each quoted value, and each unbroken run of characters (a value not
    quoted), that is longer than ``keep`` characters cut to its first ``keep``. Text with
    no such value comes back as it is. Linear in the length of ``text``."""
    if len(text) <= keep:
        return text
    out: list[str] = []
    done = 0  # text[:done] is in out
    unclosed: set[str] = set()  # a quote that failed to close once never closes later
    pos = 0
    starts = _start(keep)
    while (m := starts.search(text, pos)) is not None:
        start, token = m.start(), m.group()
        if token in _QUOTED:
            literal = None if token in unclosed else _QUOTED[token].match(text, start)
            if literal is None:
                unclosed.add(token)
                pos = start + 1
                continue
            end = literal.end()
            if end - start - 2 > keep:
                out += [text[done:start], _cut_quoted(literal.group(), keep)]
                done = end
        else:
            end = m.end()
            out += [text[done:start], f"{token[:keep]}… {_count(token)}"]
            done = end
        pos = end
    if not out:
        return text
    out.append(text[done:])
    return "".join(out)


def _cut_bytes(text: str, limit: int) -> str:
    """``text`` if it is at most ``limit`` UTF-8 bytes, else its start and its length."""
    if len(text) * 4 <= limit or len(text.encode()) <= limit:
        return text
    tail = f"… {_count(text)}"
    head = text.encode()[: max(0, limit - len(tail.encode()))].decode(errors="ignore")
    return head + tail


def _text(text: str, cut: Cut, limit: int) -> str:
    return _cut_bytes(shorten_values(text, cut.value), limit)


def _wire_bytes(status: status_pb2.Status) -> int:
    """About what the status takes in the trailers: grpc-message, percent-encoded, and
    grpc-status-details-bin (the whole status, in base64)."""
    raw = status.message.encode()
    message = sum(1 if 0x20 <= b < 0x7F and b != ord("%") else 3 for b in raw)
    size: int = status.ByteSize()
    return message + 4 * -(-size // 3)


def _build(err: errors.DomainError, code: grpc.StatusCode, cut: Cut) -> status_pb2.Status:
    metadata = {
        _text(k, cut, cut.detail): _text(v, cut, cut.detail)
        for k, v in list(err.metadata.items())[: cut.metadata]
    }
    details: list[any_pb2.Any] = []
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=_cut_bytes(err.reason, cut.detail), domain=DOMAIN, metadata=metadata
        )
    )
    details.append(info)
    if err.violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=_text(v.field, cut, cut.detail),
                        description=_text(v.description, cut, cut.detail),
                    )
                    for v in list(err.violations)[: cut.violations]
                ]
            )
        )
        details.append(bad)
    if isinstance(err, errors.Unavailable):  # when to try again
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=_duration(err.retry_after_s)))
        details.append(retry)
    return status_pb2.Status(
        code=code_pb2.Code.Value(code.name),
        message=_text(err.message, cut, cut.message),
        details=details,
    )


def to_status(err: errors.DomainError) -> grpc.Status:
    """The status a client gets for ``err``: its code, message and details (ErrorInfo,
    BadRequest), each value it quotes cut short enough for any client's metadata limit."""
    code = code_of(err)
    for cut in CUTS:
        status = _build(err, code, cut)
        if _wire_bytes(status) <= TRAILER_BUDGET:
            break
    result: grpc.Status = rpc_status.to_status(status)
    return result


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def infrastructure(exc: BaseException) -> errors.DomainError | None:
    """A full disk: RESOURCE_EXHAUSTED, whichever handler met it."""
    if errors.is_disk_full(exc):
        assert isinstance(exc, OSError)
        return errors.disk_full("the data dir", exc)
    return None


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


async def abort(
    context: grpc.aio.ServicerContext[Any, Any], exc: Exception, where: str
) -> NoReturn:
    """Ends the call with the status of ``exc``: a domain error's own, mapped by
    to_status; INTERNAL for anything else (logged here, with ``where`` it came from). The
    one way a call of ours ends in error, in a handler or an interceptor."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, errors.DomainError):
        await context.abort_with_status(to_status(exc))
    known = infrastructure(exc)
    if known is not None:
        log.warning("%s: %s", where, known.message)
        await context.abort_with_status(to_status(known))
    log.error("internal error in %s", where, exc_info=exc)
    await context.abort_with_status(internal_status(exc))


R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]]
StreamHandler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[R]]


def unary(fn: Handler[R]) -> Handler[R]:
    """Maps exceptions of a unary (or client-streaming) handler to a rich status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            return await fn(self, request, context)
        except Exception as e:
            await abort(context, e, fn.__name__)
        raise AssertionError("unreachable")

    return wrapper


def written(fn: Handler[None]) -> Handler[None]:
    """Maps exceptions of a server-streaming handler that sends with ``context.write``
    (nothing between its loop and the socket: gRPC awaits it as a coroutine) to a rich
    status, as for a unary handler."""
    return unary(fn)


def stream(fn: StreamHandler[R]) -> StreamHandler[R]:
    """Maps exceptions of a server-streaming handler (a generator) to a rich status."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[R]:
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as e:
            await abort(context, e, fn.__name__)

    return wrapper
