"""The ModelLifecycle gRPC service: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from controlplane import build_logs
from controlplane.access import Access
from controlplane.api import convert
from controlplane.api.auth import current_principal
from controlplane.api.event_bytes import EncodedEvents
from controlplane.api.status import stream, unary, written
from controlplane.domain import names
from controlplane.domain.errors import invalid_field
from controlplane.domain.states import BuildState
from controlplane.domain.types import DeployOptions, Event, Operation
from controlplane.exports import Exporter
from controlplane.service import NewBuild, Service, metrics_window
from controlplane.signals import Signals
from controlplane.sources import SourceStore
from controlplane.watch import EventHub
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from modellifecycle.v1 import service_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
# A log follower reads again when this server wrote lines, or after this long (another
# server may have written them).
LOG_FOLLOW_S = 1.0


async def _run(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def _deploy_options(msg: rpc.DeployOptions) -> DeployOptions:
    return DeployOptions(
        resources=convert.resources_from_pb(msg.resources),
        environment=dict(msg.environment),
        secret_environment=dict(msg.secret_environment),
    )


class ModelLifecycleServicer(service_pb2_grpc.ModelLifecycleServicer):
    def __init__(
        self,
        service: Service,
        sources: SourceStore,
        hub: EventHub,
        wait_max_s: float,
        exporter: Exporter,
        access: Access,
        signals: Signals,
    ) -> None:
        self.svc = service
        self.signals = signals
        self.access = access
        self.sources = sources
        self.hub = hub
        self.exporter = exporter
        self.wait_max_s = wait_max_s
        self._encoded = EncodedEvents()

    # ---- models ----------------------------------------------------------------------------

    @unary
    async def CreateModel(self, request: rpc.CreateModelRequest, context: Ctx) -> pb.Model:
        m = request.model
        model = await _run(
            lambda: self.svc.create_model(
                request.parent, request.model_id, m.display_name, m.description, request.request_id
            )
        )
        return convert.model_to_pb(model)

    @unary
    async def GetModel(self, request: rpc.GetModelRequest, context: Ctx) -> pb.Model:
        model = self.svc.cached_model(request.name)  # in memory: no thread, no query
        if model is None and self.svc.head is not None:  # PostgreSQL: if the head is where it was
            with contextlib.suppress(Exception):  # the database away: the plain read says so
                model = self.svc.cached_model(request.name, await self.svc.head.now())
        if model is None:
            model = await _run(lambda: self.svc.get_model(request.name))
        return convert.model_to_pb(model)

    @unary
    async def ListModels(
        self, request: rpc.ListModelsRequest, context: Ctx
    ) -> rpc.ListModelsResponse:
        page = await _run(
            lambda: self.svc.list_models(request.parent, request.page_size, request.page_token)
        )
        return rpc.ListModelsResponse(
            models=[convert.model_to_pb(m) for m in page.items],
            next_page_token=page.next_page_token,
        )

    @unary
    async def DeleteModel(self, request: rpc.DeleteModelRequest, context: Ctx) -> empty_pb2.Empty:
        await _run(lambda: self.svc.delete_model(request.name))
        return empty_pb2.Empty()

    # ---- sources and builds ----------------------------------------------------------------

    @unary
    async def UploadSource(
        self, request_iterator: AsyncIterator[rpc.UploadSourceRequest], context: Ctx
    ) -> pb.Source:
        parent = ""

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal parent
            async for msg in request_iterator:
                if not parent:
                    if not msg.parent:
                        raise invalid_field("parent", "required in the first message")
                    parent = str(names.parse_model(msg.parent, "parent"))
                    await asyncio.to_thread(self.svc.model_exists, parent)
                elif msg.parent and msg.parent != parent:
                    raise invalid_field("parent", "must not change within one upload")
                yield msg.chunk
            if not parent:
                raise invalid_field("parent", "required in the first message")

        sha, size, _files = await self.sources.receive(chunks())
        source = await _run(lambda: self.svc.record_source(parent, sha, size))
        return convert.source_to_pb(source)

    @unary
    async def CreateBuild(self, request: rpc.CreateBuildRequest, context: Ctx) -> pb.Operation:
        req = NewBuild(
            parent=request.parent,
            source_sha256=request.source_sha256,
            file_path=request.file_path,
            function_name=request.function_name,
            comment=request.comment,
            deploy=_deploy_options(request.deploy) if request.HasField("deploy") else None,
            request_id=request.request_id,
            no_cache=request.no_cache,
            creator=current_principal().name,
            validate_only=request.validate_only,
            wait_for_capacity=request.wait_for_capacity,
        )
        return convert.operation_to_pb(await _run(lambda: self.svc.create_build(req)))

    @unary
    async def GetBuild(self, request: rpc.GetBuildRequest, context: Ctx) -> pb.Build:
        return convert.build_to_pb(await _run(lambda: self.svc.get_build(request.name)))

    @unary
    async def ListBuilds(
        self, request: rpc.ListBuildsRequest, context: Ctx
    ) -> rpc.ListBuildsResponse:
        page = await _run(
            lambda: self.svc.list_builds(request.parent, request.page_size, request.page_token)
        )
        return rpc.ListBuildsResponse(
            builds=[convert.build_to_pb(b) for b in page.items],
            next_page_token=page.next_page_token,
        )

    # ---- deployments -----------------------------------------------------------------------

    @unary
    async def CreateDeployment(
        self, request: rpc.CreateDeploymentRequest, context: Ctx
    ) -> pb.Operation:
        resources = (
            convert.resources_from_pb(request.resources) if request.HasField("resources") else None
        )
        op = await _run(
            lambda: self.svc.create_deployment(
                request.parent,
                request.build,
                resources,
                dict(request.environment),
                request.request_id,
                dict(request.secret_environment),
                creator=current_principal().name,
                strategy=convert.strategy_from_pb(request.rollout),
                validate_only=request.validate_only,
                wait_for_capacity=request.wait_for_capacity,
            )
        )
        return convert.operation_to_pb(op)

    @unary
    async def SetTraffic(self, request: rpc.SetTrafficRequest, context: Ctx) -> pb.Operation:
        op = await _run(
            lambda: self.svc.set_traffic(
                request.name,
                [(w.build, w.percent) for w in request.weights],
                request.sticky_header,
                request.request_id,
                creator=current_principal().name,
            )
        )
        return convert.operation_to_pb(op)

    @unary
    async def PromoteRollout(
        self, request: rpc.PromoteRolloutRequest, context: Ctx
    ) -> pb.Operation:
        return convert.operation_to_pb(await _run(lambda: self.svc.promote_rollout(request.name)))

    @unary
    async def GetDeployment(self, request: rpc.GetDeploymentRequest, context: Ctx) -> pb.Deployment:
        return convert.deployment_to_pb(await _run(lambda: self.svc.get_deployment(request.name)))

    @unary
    async def ListDeployments(
        self, request: rpc.ListDeploymentsRequest, context: Ctx
    ) -> rpc.ListDeploymentsResponse:
        page = await _run(
            lambda: self.svc.list_deployments(request.parent, request.page_size, request.page_token)
        )
        return rpc.ListDeploymentsResponse(
            deployments=[convert.deployment_to_pb(d) for d in page.items],
            next_page_token=page.next_page_token,
        )

    # ---- stop and restart ------------------------------------------------------------------

    @unary
    async def StopModel(self, request: rpc.StopModelRequest, context: Ctx) -> pb.Operation:
        op = await _run(
            lambda: self.svc.stop_model(request.name, request.request_id, request.validate_only)
        )
        return convert.operation_to_pb(op)

    @unary
    async def RestartModel(self, request: rpc.RestartModelRequest, context: Ctx) -> pb.Operation:
        op = await _run(
            lambda: self.svc.restart_model(
                request.name,
                request.request_id,
                request.validate_only,
                request.wait_for_capacity,
            )
        )
        return convert.operation_to_pb(op)

    # ---- operations ------------------------------------------------------------------------

    @unary
    async def GetOperation(self, request: rpc.GetOperationRequest, context: Ctx) -> pb.Operation:
        return convert.operation_to_pb(await _run(lambda: self.svc.get_operation(request.name)))

    @unary
    async def ListOperations(
        self, request: rpc.ListOperationsRequest, context: Ctx
    ) -> rpc.ListOperationsResponse:
        page = await _run(
            lambda: self.svc.list_operations(request.parent, request.page_size, request.page_token)
        )
        return rpc.ListOperationsResponse(
            operations=[convert.operation_to_pb(o) for o in page.items],
            next_page_token=page.next_page_token,
        )

    @unary
    async def WaitOperation(self, request: rpc.WaitOperationRequest, context: Ctx) -> pb.Operation:
        timeout = self.wait_max_s
        if request.HasField("timeout"):
            requested = request.timeout.ToTimedelta().total_seconds()
            if requested < 0:
                raise invalid_field("timeout", "must not be negative")
            timeout = min(requested, self.wait_max_s)
        op = await _run(lambda: self.svc.get_operation(request.name))
        return convert.operation_to_pb(await self._until_done(op, timeout))

    async def _until_done(self, op: Operation, wait_s: float) -> Operation:
        """The operation once done, or as it is after ``wait_s`` seconds."""
        if op.done or wait_s == 0:
            return op
        name = op.name
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        sub = self.hub.subscribe(op.model)
        try:
            while not op.done:
                left = deadline - loop.time()
                if left <= 0:
                    break
                # Any event of the model may finish the operation; poll as a fallback.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.next(), min(left, 1.0))
                sub.drain()
                op = await _run(lambda: self.svc.get_operation(name))
        finally:
            self.hub.unsubscribe(sub)
        return op

    # ---- watch -----------------------------------------------------------------------------

    # The watches write each event themselves, already encoded (the hub awaits the
    # write): under a thousand watchers each layer between the hub's queue and the socket
    # is paid a thousand times per event.
    @written
    async def WatchModel(self, request: rpc.WatchModelRequest, context: Ctx) -> None:  # type: ignore[override]  # writes with context.write
        await self.hub.watch(request.name, request.since_revision, self._sender(context))

    @written
    async def WatchModels(self, request: rpc.WatchModelsRequest, context: Ctx) -> None:  # type: ignore[override]  # writes with context.write
        await self.hub.watch_project(
            request.parent, request.filter, request.since_revision, self._sender(context)
        )

    def _sender(self, context: Ctx) -> Callable[[Event], Awaitable[None]]:
        """Writes each event on this stream as bytes (a change's encoded once for all)."""
        write, encoded = context.write, self._encoded
        return lambda event: write(encoded(event))

    @stream
    async def StreamBuildLogs(
        self, request: rpc.StreamBuildLogsRequest, context: Ctx
    ) -> AsyncIterator[rpc.BuildLogLine]:
        source = await _run(lambda: self.svc.build_log_source(request.name))

        async def finished() -> bool:
            build = await _run(lambda: self.svc.get_build(request.name))
            if build.state not in (BuildState.BUILT, BuildState.FAILED):
                return False
            await _run(lambda: self.svc.build_log_path(request.name))  # another server's: here now
            return True

        async for line in build_logs.follow(source.read, request.follow, finished):
            yield rpc.BuildLogLine(
                number=line.number, time=convert.timestamp(line.time), text=line.text
            )

    @stream
    async def ExportBuild(
        self, request: rpc.ExportBuildRequest, context: Ctx
    ) -> AsyncIterator[rpc.ExportBuildChunk]:
        export = await _run(
            lambda: self.svc.export_of(request.name, request.base_image, request.tag)
        )
        async for data, digest in self.exporter.layout_tar(export):
            yield rpc.ExportBuildChunk(data=data, manifest_digest=digest)

    # ---- signals -----------------------------------------------------------------------------

    @unary
    async def GetModelMetrics(
        self, request: rpc.GetModelMetricsRequest, context: Ctx
    ) -> rpc.ModelMetrics:
        window_s, step_s = metrics_window(
            request.window.ToTimedelta().total_seconds() if request.HasField("window") else 0,
            request.step.ToTimedelta().total_seconds() if request.HasField("step") else 0,
        )
        model = await _run(lambda: self.svc.get_model(request.name))
        alive = await _run(lambda: self.svc.serving_replicas(model.name))
        series = self.signals.series(model.name, window_s, step_s, alive)
        return convert.metrics_to_pb(model.name, series, model.health)

    @stream
    async def StreamModelLogs(
        self, request: rpc.StreamModelLogsRequest, context: Ctx
    ) -> AsyncIterator[rpc.ModelLogLine]:
        since = convert.from_timestamp(request.since) if request.HasField("since") else None
        query = await _run(
            lambda: self.svc.log_query(
                request.name, request.replica, request.build, since, request.tail
            )
        )
        while True:  # what is kept (a page at a time), then, following, what comes
            lines = await _run(functools.partial(self.svc.model_log_lines, query))
            for line in lines:
                yield convert.log_line_to_pb(line)
            # From now on, every line after the last one sent (all of them, if none was).
            query = replace(query, after_id=lines[-1].id if lines else query.after_id, tail=0)
            if len(lines) >= query.limit:
                continue
            if not request.follow:
                return
            await self.signals.wait_for_lines(LOG_FOLLOW_S)

    # ---- cancel ----------------------------------------------------------------------------

    @unary
    async def CancelOperation(
        self, request: rpc.CancelOperationRequest, context: Ctx
    ) -> pb.Operation:
        op = await _run(lambda: self.svc.cancel_operation(request.name))
        # A running build stops at its server's next look (within a second or so).
        return convert.operation_to_pb(await self._until_done(op, min(30.0, self.wait_max_s)))

    # ---- tokens and audit --------------------------------------------------------------------

    @unary
    async def CreateToken(
        self, request: rpc.CreateTokenRequest, context: Ctx
    ) -> rpc.CreateTokenResponse:
        ttl = request.ttl.ToTimedelta().total_seconds() if request.HasField("ttl") else None
        creator = current_principal()
        token, secret = await _run(
            lambda: self.access.create_token(
                request.parent, request.role, request.description, ttl, creator
            )
        )
        return rpc.CreateTokenResponse(token=convert.token_to_pb(token), secret=secret)

    @unary
    async def ListTokens(
        self, request: rpc.ListTokensRequest, context: Ctx
    ) -> rpc.ListTokensResponse:
        tokens, nxt = await _run(
            lambda: self.access.list_tokens(request.parent, request.page_size, request.page_token)
        )
        return rpc.ListTokensResponse(
            tokens=[convert.token_to_pb(tok) for tok in tokens], next_page_token=nxt
        )

    @unary
    async def RevokeToken(self, request: rpc.RevokeTokenRequest, context: Ctx) -> pb.Token:
        return convert.token_to_pb(await _run(lambda: self.access.revoke_token(request.name)))

    @unary
    async def CreateInvocationKey(
        self, request: rpc.CreateInvocationKeyRequest, context: Ctx
    ) -> rpc.CreateInvocationKeyResponse:
        creator = current_principal()
        key, secret = await _run(
            lambda: self.access.create_key(request.parent, request.description, creator)
        )
        return rpc.CreateInvocationKeyResponse(key=convert.key_to_pb(key), secret=secret)

    @unary
    async def ListInvocationKeys(
        self, request: rpc.ListInvocationKeysRequest, context: Ctx
    ) -> rpc.ListInvocationKeysResponse:
        keys, nxt = await _run(
            lambda: self.access.list_keys(request.parent, request.page_size, request.page_token)
        )
        return rpc.ListInvocationKeysResponse(
            keys=[convert.key_to_pb(k) for k in keys], next_page_token=nxt
        )

    @unary
    async def RevokeInvocationKey(
        self, request: rpc.RevokeInvocationKeyRequest, context: Ctx
    ) -> pb.InvocationKey:
        return convert.key_to_pb(await _run(lambda: self.access.revoke_key(request.name)))

    @unary
    async def ListAuditRecords(
        self, request: rpc.ListAuditRecordsRequest, context: Ctx
    ) -> rpc.ListAuditRecordsResponse:
        records, nxt = await _run(
            lambda: self.access.list_audit(request.parent, request.page_size, request.page_token)
        )
        return rpc.ListAuditRecordsResponse(
            records=[convert.audit_to_pb(r) for r in records], next_page_token=nxt
        )

    @unary
    async def GetCaller(self, request: rpc.GetCallerRequest, context: Ctx) -> rpc.Caller:
        return convert.caller_to_pb(current_principal())
