"""Every RPC but health: the bearer token is checked, the call's project and role are
checked against it (domain/access.py), and every mutation leaves an audit record.

With ``--insecure-no-auth`` every call is made by an anonymous admin (still audited).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from controlplane.access import Access, PendingAudit, end_audit, expect_audit
from controlplane.api import status
from controlplane.api.interceptor import code_of, rewrap
from controlplane.domain import errors
from controlplane.domain.access import (
    ANONYMOUS,
    INSECURE,
    MUTATIONS,
    RULES,
    Principal,
    Role,
    check,
    hidden,
    project_of,
    unauthenticated,
)
from controlplane.domain.errors import DomainError

log = logging.getLogger(__name__)

OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
LIFECYCLE = "modellifecycle.v1.ModelLifecycle"
_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")
# An open server stream's token is checked again this often, by the call's own task
# while the handler sends from another (most checks answer from Access's cache).
STREAM_RECHECK_S = 0.5


def current_principal() -> Principal:
    """Who makes the RPC being served (set by the interceptor before the handler runs)."""
    return _principal.get(INSECURE)


def bearer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, secret = value.partition(" ")
            return secret.strip() if scheme.lower() == "bearer" else ""
    return ""


def resource_of(method: str, request: Any) -> str:
    """The resource a request names, as its rule says (CreateModel: the model to be)."""
    rule = RULES.get(method)
    if rule is None or request is None:
        return ""
    value = getattr(request, rule.field, "")
    if method == "CreateModel" and value and getattr(request, "model_id", ""):
        return f"{value}/models/{request.model_id}"
    return value if isinstance(value, str) else ""


class AuthInterceptor:
    def __init__(self, access: Access, enabled: bool) -> None:
        self.access = access
        self.enabled = enabled

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``method`` (/package.Service/Method) guarded: wrapped once, at registration."""
        service, _, name = method.lstrip("/").rpartition("/")
        if service in OPEN_SERVICES:
            return handler
        guard = _Guard(self, method, name if service == LIFECYCLE else "")
        return rewrap(handler, guard.unary, guard.stream, guard.upload, guard.bidi)


class _Guard:
    """One method's checks. ``method`` is empty for services other than ours (reflection):
    they need a valid token and nothing more."""

    def __init__(self, owner: AuthInterceptor, full: str, method: str) -> None:
        self.access = owner.access
        self.enabled = owner.enabled
        self.full = full
        self.method = method

    async def _admit(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Principal, str, str]:
        """The caller, the resource and its project; aborts the call if it may not (a
        refused mutation is audited too, with whoever the token said it was)."""
        principal = INSECURE if not self.enabled else _anonymous()
        resource = resource_of(self.method, request)
        project = project_of(resource)
        try:
            if self.enabled:
                principal = await self._authenticate(context)
                if project is None and resource.startswith("operations/"):
                    project = await asyncio.to_thread(self.access.operation_project, resource)
                    if project is None and not principal.sees_all:
                        # No such operation: for a project's token, the very answer an
                        # operation of another project gets (its role is not told either).
                        raise hidden(resource)
            if self.method:
                check(principal, self.method, resource, project)
        except DomainError as e:
            # Refusals of a known caller are audited where its own admins read them (not
            # under a project it may not see); anonymous ones are not, or anyone who
            # reaches the port could fill the audit table.
            if not isinstance(e, errors.Unauthenticated):
                seen = project if project and principal.sees(project) else principal.project
                await self._audit(self._pending(principal, resource, seen, context), context, e)
            await status.abort(context, e, self.full)
        except Exception as e:  # e.g. the database: INTERNAL, as from a handler
            await status.abort(context, e, self.full)
        _principal.set(principal)
        return principal, resource, project or ""

    async def _still_valid(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """A stream (a watch may stay open for days) ends once its token is revoked or
        expires: UNAUTHENTICATED, as the call would get if made now."""
        try:
            await self._authenticate(context)
        except Exception as e:
            await status.abort(context, e, self.full)

    async def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        secret = bearer(context)
        known = self.access.cached(secret) if secret else None
        if known is False:  # not seen lately: ask the database, in a thread
            known = await asyncio.to_thread(self.access.verify, secret)
        if not isinstance(known, Principal):
            raise unauthenticated()
        return known

    def _pending(
        self,
        principal: Principal,
        resource: str,
        project: str,
        context: grpc.aio.ServicerContext[Any, Any],
        request: Any = None,
    ) -> PendingAudit | None:
        """What a mutation's record will say (None: a read, or a plan only, which changes
        nothing and leaves no record either)."""
        if self.method not in MUTATIONS or getattr(request, "validate_only", False):
            return None
        return PendingAudit(principal.name, self.full, resource, project, context.peer() or "")

    async def _audit(
        self,
        pending: PendingAudit | None,
        context: grpc.aio.ServicerContext[Any, Any],
        exc: BaseException | None,
    ) -> None:
        """The record of a call whose change did not carry one: refused, or failed (a
        change that committed wrote its record in its own transaction)."""
        if pending is None or (pending.written and exc is None):
            return
        code = code_of(context, exc)
        if isinstance(exc, DomainError):
            code = status.code_of(exc).name
        pending.written = True  # this record's own transaction adds no other
        try:
            await asyncio.to_thread(self.access.audit, pending, code, pending.operation)
        except Exception:  # the call's outcome stands; the record is what is lost
            log.exception("audit record of %s not written", self.full)

    def unary(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            principal, resource, project = await self._admit(request, context)
            pending = self._pending(principal, resource, project, context, request)
            if pending is None:  # a read: no record to write
                return await behavior(request, context)
            expected = expect_audit(pending)
            exc: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                end_audit(expected)
                await self._audit(pending, context, exc)

        return guarded

    def stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """A server stream: a generator of messages (build logs, an export) or one that
        sends with ``context.write`` (the watches). With tokens on, a generator's items are
        written by the handler's own task, so that both kinds are rechecked alike."""
        if not inspect.isasyncgenfunction(behavior):
            return self._written(behavior)
        if self.enabled:
            return self._written(_writing(behavior))

        async def guarded(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async with self._admitted(request, context):
                async for item in behavior(request, context):
                    yield item

        return guarded

    def _written(self, behavior: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """A stream that sends with ``context.write``: checked as it opens, then its token
        again every STREAM_RECHECK_S (whether or not anything is sent: an idle watch) by
        this call's own task while the handler runs in another; nothing is added to each
        message sent."""

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            async with self._admitted(request, context):
                if not self.enabled:
                    await behavior(request, context)
                else:
                    await self._run_while_valid(behavior(request, context), context)

        return guarded

    @contextlib.asynccontextmanager
    async def _admitted(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        """Around a server stream: admitted first (or aborted); a mutation's record
        written at the end if the stream did not write it."""
        principal, resource, project = await self._admit(request, context)
        pending = self._pending(principal, resource, project, context, request)
        exc: BaseException | None = None
        try:
            yield
        except BaseException as e:
            exc = e
            raise
        finally:
            await self._audit(pending, context, exc)

    async def _run_while_valid(
        self, call: Awaitable[None], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Runs ``call`` as its own task; ends it (UNAUTHENTICATED) once the token is no
        longer live, checked every STREAM_RECHECK_S whether or not anything is sent."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=STREAM_RECHECK_S)
                if done:
                    task.result()
                    return
                await self._still_valid(context)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def upload(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """Client streaming: the first message names the resource; it is checked before
        the handler sees any byte, then handed on with the rest."""

        async def guarded(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            first = await anext(aiter(requests), None)
            principal, resource, project = await self._admit(first, context)
            pending = self._pending(principal, resource, project, context, first)
            expected = expect_audit(pending) if pending is not None else None

            async def replay() -> AsyncIterator[Any]:
                if first is not None:
                    yield first
                async for message in requests:
                    yield message

            exc: BaseException | None = None
            try:
                return await behavior(replay(), context)
            except BaseException as e:
                exc = e
                raise
            finally:
                if expected is not None:
                    end_audit(expected)
                await self._audit(pending, context, exc)

        return guarded

    def bidi(self, behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def guarded(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            await self._admit(None, context)
            async for item in behavior(requests, context):
                yield item

        return guarded


def _writing(
    behavior: Callable[..., AsyncGenerator[Any, None]],
) -> Callable[..., Awaitable[None]]:
    """A generator stream as one that writes: each item sent with ``context.write``, in
    order, through the method's own serializer; the generator closed however it ends."""

    async def written(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        items = behavior(request, context)
        try:
            async for item in items:
                await context.write(item)
        finally:
            await items.aclose()

    return written


def _anonymous() -> Principal:
    return Principal(ANONYMOUS, "", Role.VIEWER)
