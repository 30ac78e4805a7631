"""A typed async Python client for ModelLifecycle: domain types in and out, no protobuf.

    async with Client("127.0.0.1:50051") as c:
        model = await c.create_model("projects/demo", "iris")
        source = await c.upload_source(model.name, zip_bytes)
        op = await c.create_build(model.name, source.sha256, "model.py", "predict",
                                  deploy=DeployOptions(Resources(replicas=2)))
        op = await c.wait(op.name, on_progress=print)

Errors come back as ``ClientError`` carrying the gRPC code, the ErrorInfo reason
and metadata, and any field violations. The CLI is built on this client.
"""

from __future__ import annotations

import asyncio
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controlplane.api import convert, transport
from controlplane.build_logs import LogLine
from controlplane.domain.access import AuditRecord, InvocationKey, Principal, Role, Token
from controlplane.domain.figures import ModelMetrics
from controlplane.domain.traffic import Strategy
from controlplane.domain.types import (
    Build,
    Deployment,
    DeployOptions,
    Event,
    Model,
    Operation,
    Page,
    Resources,
    Source,
)
from controlplane.domain.types import LogLine as ModelLogLine
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from modellifecycle.v1 import service_pb2_grpc

CHUNK = 256 * 1024
R = TypeVar("R")


@dataclass(eq=False)  # not frozen: Python sets __traceback__ on it as it goes up the stack
class ClientError(Exception):
    code: str  # grpc.StatusCode name, e.g. "NOT_FOUND"
    message: str
    reason: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        return f"{text} [{self.reason}]" if self.reason else text


def _error(e: grpc.aio.AioRpcError) -> ClientError:
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    status = rpc_status.from_call(e)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
    return ClientError(
        code=e.code().name,
        message=e.details() or "",
        reason=reason,
        metadata=metadata,
        violations=tuple(violations),
    )


def _deploy_options(options: DeployOptions) -> rpc.DeployOptions:
    return rpc.DeployOptions(
        resources=convert.resources_to_pb(options.resources),
        environment=dict(options.environment),
        secret_environment=dict(options.secret_environment),
    )


def _unpack(tar: IO[bytes], dest: Path) -> None:
    tar.seek(0)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=tar, mode="r:") as archive:
        archive.extractall(dest, filter="data")


def _log_line(msg: rpc.BuildLogLine) -> LogLine:
    when = msg.time.ToDatetime(UTC) if msg.HasField("time") else None
    return LogLine(msg.number, when, msg.text)


def _same(msg: R) -> R:
    return msg


class Client:
    def __init__(
        self,
        target: str,
        timeout_s: float = 30.0,
        tls: tuple[str | None, str | None, str | None] | None = None,
        token: str = "",
    ) -> None:
        """``tls``: (CA file, client certificate, client key), PEM paths, each may be
        empty: TLS trusting that CA (the system's roots when empty), with a client
        certificate for servers that want one. None: plaintext. ``token``: sent as
        ``authorization: Bearer <token>`` with every call."""
        self.target = target
        self.timeout_s = timeout_s
        options = [
            ("grpc.max_send_message_length", 8 * 1024 * 1024),
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ]
        interceptors = transport.bearer_interceptors(token) if token else None
        if tls is None:
            self._channel = grpc.aio.insecure_channel(
                target, options=options, interceptors=interceptors
            )
        else:
            ca, cert, key = (value or None for value in tls)
            creds = transport.channel_credentials(ca, cert, key)
            self._channel = grpc.aio.secure_channel(
                target, creds, options=options, interceptors=interceptors
            )
        self._stub = service_pb2_grpc.ModelLifecycleStub(self._channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, deadline_s: float | None = None) -> Any:
        try:
            return await method(request, timeout=deadline_s or self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None

    # ---- models -----------------------------------------------------------------------------

    async def create_model(
        self,
        parent: str,
        model_id: str,
        display_name: str = "",
        description: str = "",
        request_id: str = "",
    ) -> Model:
        msg = await self._call(
            self._stub.CreateModel,
            rpc.CreateModelRequest(
                parent=parent,
                model_id=model_id,
                model=pb.Model(display_name=display_name, description=description),
                request_id=request_id,
            ),
        )
        return convert.model_from_pb(msg)

    async def get_model(self, name: str) -> Model:
        return convert.model_from_pb(
            await self._call(self._stub.GetModel, rpc.GetModelRequest(name=name))
        )

    async def list_models(
        self, parent: str, page_size: int = 0, page_token: str = ""
    ) -> Page[Model]:
        r = await self._call(
            self._stub.ListModels,
            rpc.ListModelsRequest(parent=parent, page_size=page_size, page_token=page_token),
        )
        return Page([convert.model_from_pb(m) for m in r.models], r.next_page_token)

    async def delete_model(self, name: str) -> None:
        await self._call(self._stub.DeleteModel, rpc.DeleteModelRequest(name=name))

    # ---- sources and builds -----------------------------------------------------------------

    async def upload_source(
        self,
        model: str,
        data: bytes,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> Source:
        """Streams ``data`` (a zip) in chunks; ``on_progress(sent, total)`` after each."""

        async def chunks() -> AsyncIterator[rpc.UploadSourceRequest]:
            for start in range(0, max(len(data), 1), CHUNK):
                yield rpc.UploadSourceRequest(
                    parent=model if start == 0 else "", chunk=data[start : start + CHUNK]
                )
                if on_progress is not None:
                    on_progress(min(start + CHUNK, len(data)), len(data))

        try:
            msg = await self._stub.UploadSource(chunks(), timeout=max(self.timeout_s, 300))
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
        return convert.source_from_pb(msg)

    async def create_build(
        self,
        model: str,
        source_sha256: str,
        file_path: str,
        function_name: str,
        comment: str = "",
        deploy: DeployOptions | None = None,
        request_id: str = "",
        no_cache: bool = False,
        validate_only: bool = False,
        wait_for_capacity: bool = False,
    ) -> Operation:
        """``validate_only`` (with ``deploy``): the plan of the deploy only (the answer's
        ``plan``; nothing is built or written)."""
        request = rpc.CreateBuildRequest(
            parent=model,
            source_sha256=source_sha256,
            file_path=file_path,
            function_name=function_name,
            comment=comment,
            request_id=request_id,
            no_cache=no_cache,
            validate_only=validate_only,
            wait_for_capacity=wait_for_capacity,
        )
        if deploy is not None:
            request.deploy.CopyFrom(_deploy_options(deploy))
        return convert.operation_from_pb(await self._call(self._stub.CreateBuild, request))

    async def get_build(self, name: str) -> Build:
        return convert.build_from_pb(
            await self._call(self._stub.GetBuild, rpc.GetBuildRequest(name=name))
        )

    async def list_builds(
        self, model: str, page_size: int = 0, page_token: str = ""
    ) -> Page[Build]:
        r = await self._call(
            self._stub.ListBuilds,
            rpc.ListBuildsRequest(parent=model, page_size=page_size, page_token=page_token),
        )
        return Page([convert.build_from_pb(b) for b in r.builds], r.next_page_token)

    # ---- deployments ------------------------------------------------------------------------

    async def create_deployment(
        self,
        model: str,
        build: str,
        resources: Resources | None = None,
        environment: Mapping[str, str] | None = None,
        request_id: str = "",
        secret_environment: Mapping[str, str] | None = None,
        rollout: Strategy | None = None,
        validate_only: bool = False,
        wait_for_capacity: bool = False,
    ) -> Operation:
        """Deploys ``build``; ``resources`` None keeps the active deployment's, and no
        ``secret_environment`` keeps its secrets. ``rollout``: CANARY or SHADOW (None:
        IMMEDIATE). ``validate_only``: only its plan (the answer's ``plan``); a change the
        cluster has no room for is refused unless ``wait_for_capacity``."""
        request = rpc.CreateDeploymentRequest(
            parent=model,
            build=build,
            environment=dict(environment or {}),
            request_id=request_id,
            secret_environment=dict(secret_environment or {}),
            validate_only=validate_only,
            wait_for_capacity=wait_for_capacity,
        )
        if rollout is not None:
            request.rollout.CopyFrom(convert.strategy_to_pb(rollout))
        if resources is not None:
            request.resources.CopyFrom(convert.resources_to_pb(resources))
        return convert.operation_from_pb(await self._call(self._stub.CreateDeployment, request))

    async def get_deployment(self, name: str) -> Deployment:
        return convert.deployment_from_pb(
            await self._call(self._stub.GetDeployment, rpc.GetDeploymentRequest(name=name))
        )

    async def list_deployments(
        self, model: str, page_size: int = 0, page_token: str = ""
    ) -> Page[Deployment]:
        r = await self._call(
            self._stub.ListDeployments,
            rpc.ListDeploymentsRequest(parent=model, page_size=page_size, page_token=page_token),
        )
        return Page([convert.deployment_from_pb(d) for d in r.deployments], r.next_page_token)

    # ---- traffic ----------------------------------------------------------------------------

    async def set_traffic(
        self,
        model: str,
        weights: Mapping[str, int],
        sticky_header: str = "",
        request_id: str = "",
    ) -> Operation:
        """``weights``: percent by build name (two adding up to 100, or one at 100)."""
        request = rpc.SetTrafficRequest(
            name=model,
            weights=[rpc.TrafficWeight(build=b, percent=p) for b, p in weights.items()],
            sticky_header=sticky_header,
            request_id=request_id,
        )
        return convert.operation_from_pb(await self._call(self._stub.SetTraffic, request))

    async def promote_rollout(self, operation: str) -> Operation:
        return convert.operation_from_pb(
            await self._call(self._stub.PromoteRollout, rpc.PromoteRolloutRequest(name=operation))
        )

    # ---- stop, restart ----------------------------------------------------------------------

    async def stop_model(
        self, name: str, request_id: str = "", validate_only: bool = False
    ) -> Operation:
        request = rpc.StopModelRequest(
            name=name, request_id=request_id, validate_only=validate_only
        )
        return convert.operation_from_pb(await self._call(self._stub.StopModel, request))

    async def restart_model(
        self,
        name: str,
        request_id: str = "",
        validate_only: bool = False,
        wait_for_capacity: bool = False,
    ) -> Operation:
        request = rpc.RestartModelRequest(
            name=name,
            request_id=request_id,
            validate_only=validate_only,
            wait_for_capacity=wait_for_capacity,
        )
        return convert.operation_from_pb(await self._call(self._stub.RestartModel, request))

    # ---- operations -------------------------------------------------------------------------

    async def cancel_operation(self, name: str) -> Operation:
        """Asks a running build or deploy to stop; returns the operation once it has (the
        server waits up to 30 s for it, so the deadline is longer than a plain call's)."""
        msg = await self._call(
            self._stub.CancelOperation,
            rpc.CancelOperationRequest(name=name),
            deadline_s=max(self.timeout_s, 60.0),
        )
        return convert.operation_from_pb(msg)

    async def get_operation(self, name: str) -> Operation:
        return convert.operation_from_pb(
            await self._call(self._stub.GetOperation, rpc.GetOperationRequest(name=name))
        )

    async def list_operations(
        self, model: str, page_size: int = 0, page_token: str = ""
    ) -> Page[Operation]:
        r = await self._call(
            self._stub.ListOperations,
            rpc.ListOperationsRequest(parent=model, page_size=page_size, page_token=page_token),
        )
        return Page([convert.operation_from_pb(o) for o in r.operations], r.next_page_token)

    # ---- tokens and audit --------------------------------------------------------------

    async def create_token(
        self, parent: str, role: Role, description: str = "", ttl_s: float | None = None
    ) -> tuple[Token, str]:
        """A new token of ``parent`` (projects/P, or projects/- for every project) and its
        secret, which the server never shows again."""
        request = rpc.CreateTokenRequest(
            parent=parent, role=pb.Role.ValueType(int(role)), description=description
        )
        if ttl_s is not None:
            request.ttl.FromTimedelta(timedelta(seconds=ttl_s))
        r = await self._call(self._stub.CreateToken, request)
        return convert.token_from_pb(r.token), r.secret

    async def list_tokens(
        self, parent: str, page_size: int = 0, page_token: str = ""
    ) -> Page[Token]:
        r = await self._call(
            self._stub.ListTokens,
            rpc.ListTokensRequest(parent=parent, page_size=page_size, page_token=page_token),
        )
        return Page([convert.token_from_pb(x) for x in r.tokens], r.next_page_token)

    async def get_caller(self) -> Principal:
        """Who this client's token is: its name, project and role."""
        return convert.caller_from_pb(
            await self._call(self._stub.GetCaller, rpc.GetCallerRequest())
        )

    async def revoke_token(self, name: str) -> Token:
        r = await self._call(self._stub.RevokeToken, rpc.RevokeTokenRequest(name=name))
        return convert.token_from_pb(r)

    async def create_invocation_key(
        self, model: str, description: str = ""
    ) -> tuple[InvocationKey, str]:
        """A new key for ``model``'s endpoint and its secret (shown once). The replicas
        take it within seconds."""
        r = await self._call(
            self._stub.CreateInvocationKey,
            rpc.CreateInvocationKeyRequest(parent=model, description=description),
        )
        return convert.key_from_pb(r.key), r.secret

    async def list_invocation_keys(
        self, model: str, page_size: int = 0, page_token: str = ""
    ) -> Page[InvocationKey]:
        r = await self._call(
            self._stub.ListInvocationKeys,
            rpc.ListInvocationKeysRequest(parent=model, page_size=page_size, page_token=page_token),
        )
        return Page([convert.key_from_pb(k) for k in r.keys], r.next_page_token)

    async def revoke_invocation_key(self, name: str) -> InvocationKey:
        r = await self._call(
            self._stub.RevokeInvocationKey, rpc.RevokeInvocationKeyRequest(name=name)
        )
        return convert.key_from_pb(r)

    async def list_audit_records(
        self, parent: str, page_size: int = 0, page_token: str = ""
    ) -> Page[AuditRecord]:
        r = await self._call(
            self._stub.ListAuditRecords,
            rpc.ListAuditRecordsRequest(parent=parent, page_size=page_size, page_token=page_token),
        )
        return Page([convert.audit_from_pb(x) for x in r.records], r.next_page_token)

    async def wait_operation(self, name: str, timeout_s: float) -> Operation:
        """One WaitOperation call: returns when done or after at most ``timeout_s``."""
        timeout = duration_pb2.Duration()
        timeout.FromNanoseconds(int(max(timeout_s, 0) * 1e9))
        request = rpc.WaitOperationRequest(name=name, timeout=timeout)
        msg = await self._call(self._stub.WaitOperation, request, deadline_s=timeout_s + 30)
        return convert.operation_from_pb(msg)

    async def wait(
        self,
        name: str,
        timeout_s: float = 900.0,
        on_progress: Callable[[Operation], None] | None = None,
        progress_every_s: float = 0.5,
    ) -> Operation:
        """Follows an operation until done, calling ``on_progress`` whenever it changes.

        Uses WaitOperation in slices of ``progress_every_s``: the end is seen the moment
        the server records it, progress at least that often. Raises ``TimeoutError`` if
        it is not done after ``timeout_s``; the operation itself goes on (look it up
        with ``get_operation``).
        """
        deadline = time.monotonic() + timeout_s
        last: tuple[str, bool] | None = None
        op = await self.get_operation(name)
        while True:
            seen = (op.progress, op.done)
            if on_progress is not None and seen != last:
                on_progress(op)
            last = seen
            if op.done:
                return op
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{name} is not done after {timeout_s:g}s")
            op = await self.wait_operation(name, min(progress_every_s, left))

    async def build_logs(self, name: str, follow: bool = False) -> AsyncIterator[LogLine]:
        """The build's log lines so far; with ``follow``, each new one as the build writes
        it, until the build ends."""
        call = self._stub.StreamBuildLogs(rpc.StreamBuildLogsRequest(name=name, follow=follow))
        async for line in self._stream(call, _log_line):
            yield line

    async def export_build(
        self,
        name: str,
        dest: Path,
        base_image: str = "",
        tag: str = "",
        on_progress: Callable[[int], None] | None = None,
    ) -> str:
        """Writes the build as an OCI image layout in ``dest``; returns the manifest digest.

        The server builds the image and streams the layout as a tar archive, unpacked here
        (only regular files and folders inside ``dest`` are accepted)."""
        call = self._stub.ExportBuild(
            rpc.ExportBuildRequest(name=name, base_image=base_image, tag=tag)
        )
        digest, received = "", 0
        with tempfile.TemporaryFile() as tar:
            async for msg in self._stream(call, _same):
                tar.write(msg.data)
                received += len(msg.data)
                digest = msg.manifest_digest or digest
                if on_progress is not None and msg.data:
                    on_progress(received)
            await asyncio.to_thread(_unpack, tar, dest)
        return digest

    async def export_build_stream(
        self, name: str, base_image: str = "", tag: str = ""
    ) -> AsyncIterator[tuple[bytes, str]]:
        """The build as an OCI image layout, as the server streams it, to pass on without
        unpacking (the console's download): (piece of the tar archive, "") pairs, and
        (b"", manifest digest) last. A refusal comes out of the first step."""
        call = self._stub.ExportBuild(
            rpc.ExportBuildRequest(name=name, base_image=base_image, tag=tag)
        )
        async for msg in self._stream(call, _same):
            yield bytes(msg.data), str(msg.manifest_digest)

    # ---- watch ------------------------------------------------------------------------------

    async def watch_model(self, name: str, since_revision: int = 0) -> AsyncIterator[Event]:
        """The model's events: its current state first (when ``since_revision`` is 0),
        then every change as it happens, until the caller stops iterating."""
        call = self._stub.WatchModel(
            rpc.WatchModelRequest(name=name, since_revision=since_revision)
        )
        async for event in self._stream(call, convert.event_from_pb):
            yield event

    async def watch_models(
        self, parent: str, filter: str = "", since_revision: int = 0
    ) -> AsyncIterator[Event]:
        """Every model of project ``parent`` (``projects/p``), as watch_model does for one;
        ``filter``: e.g. ``"kind=model model=iris"``. BOOKMARKs carry the latest revision:
        resume from the last revision seen after a disconnect."""
        call = self._stub.WatchModels(
            rpc.WatchModelsRequest(parent=parent, filter=filter, since_revision=since_revision)
        )
        async for event in self._stream(call, convert.event_from_pb):
            yield event

    # ---- signals ----------------------------------------------------------------------------

    async def get_model_metrics(
        self, name: str, window_s: float = 3600, step_s: float = 10
    ) -> ModelMetrics:
        """The model's figures over the last ``window_s`` (10 s to 1 h), in points of
        ``step_s`` (a multiple of 10 s): totals, per build, per replica, and its health."""
        request = rpc.GetModelMetricsRequest(name=name)
        request.window.FromTimedelta(timedelta(seconds=window_s))
        request.step.FromTimedelta(timedelta(seconds=step_s))
        return convert.metrics_from_pb(await self._call(self._stub.GetModelMetrics, request))

    async def model_logs(
        self,
        name: str,
        replica: str = "",
        build: str = "",
        since: datetime | None = None,
        tail: int = 0,
        follow: bool = False,
    ) -> AsyncIterator[ModelLogLine]:
        """The model's replicas' lines kept so far (only ``replica``'s, ``build``'s, those
        at or after ``since``, the last ``tail``, when given); with ``follow``, each new one
        as it comes, until the caller stops iterating."""
        request = rpc.StreamModelLogsRequest(
            name=name,
            replica=replica,
            build=build,
            since=convert.timestamp(since),
            tail=tail,
            follow=follow,
        )
        call = self._stub.StreamModelLogs(request)
        async for line in self._stream(call, lambda msg: convert.log_line_from_pb(msg, name)):
            yield line

    @staticmethod
    async def _stream(call: Any, one: Callable[[Any], R]) -> AsyncIterator[R]:
        """A server stream's messages through ``one``; errors as ClientError; the call is
        cancelled when the caller stops reading."""
        try:
            async for msg in call:
                yield one(msg)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()
