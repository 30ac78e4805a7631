"""Use cases: validation, idempotency, conflicts. One transaction per mutation
writes the record, its Operation, the events and the job together.

Methods are synchronous (SQLModel); the API layer calls them in worker threads.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlmodel import col, select

from controlplane import desired, rollouts
from controlplane.domain import names
from controlplane.domain import states as st
from controlplane.domain import types as t
from controlplane.domain.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    check_text,
    invalid_field,
)
from controlplane.jobs import JOB_APPLY, JOB_BUILD
from controlplane.sources import SourceStore
from controlplane.storage import repo
from controlplane.storage.changes import Changes, now
from controlplane.storage.db import Database
from controlplane.storage.model_cache import ModelCache
from controlplane.storage.tables import (
    BuildRow,
    DeploymentRow,
    InvocationKeyRow,
    JobRow,
    ModelRow,
    OperationRow,
    RequestRow,
    SourceRow,
)
from workers.archive import check_member_path
from workers.backend import rolls
from workers.oci import OciExport
from workers.runtime import Runtime
from workers.runtime import mismatch as runtime_mismatch
from workers.runtime import parse as parse_runtime

MAX_DISPLAY_NAME = 200
MAX_DESCRIPTION = 10_000
MAX_COMMENT = 10_000
MAX_REQUEST_ID = 200
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # an OCI reference name
DEFAULT_PYTHON = "3.11"  # base image of builds made before runtimes were recorded


T = TypeVar("T")


@dataclass(frozen=True)
class NewBuild:
    parent: str
    source_sha256: str
    file_path: str
    function_name: str
    comment: str = ""
    deploy: t.DeployOptions | None = None
    request_id: str = ""
    no_cache: bool = False


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()


def _check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID:
        raise invalid_field("request_id", f"at most {MAX_REQUEST_ID} characters")


def _check_function_name(value: str) -> str:
    if not value.isidentifier() or keyword.iskeyword(value):
        raise invalid_field(
            "function_name", f"{value!r} is not a Python identifier" if value else "required"
        )
    return value


def _check_sha(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise invalid_field(
            "source_sha256",
            f"{value!r} is not a lowercase hex sha256"
            if value
            else "required: the sha256 UploadSource returned",
        )
    return value


def _check_secrets(env: Mapping[str, str], secrets: Mapping[str, str], prefix: str = "") -> None:
    t.validate_environment(secrets, f"{prefix}secret_environment")
    both = sorted(set(env) & set(secrets))
    if both:
        raise invalid_field(
            f"{prefix}secret_environment",
            f"{', '.join(both)} also in environment: a name is secret or not",
        )


def _check_built(b: BuildRow, verb: str) -> None:
    if b.state != st.BuildState.BUILT.value:
        raise FailedPrecondition(
            message=f"build {b.name} is {b.state}; only a BUILT build can be {verb}",
            reason="BUILD_NOT_BUILT",
            metadata={"build": b.name, "state": b.state},
        )


def _check_image(b: BuildRow) -> None:
    """The build's image is still on the disk (garbage collection may have removed it)."""
    if b.artifact_path and not Path(b.artifact_path).is_dir():
        raise FailedPrecondition(
            message=f"the image of build {b.name} ({b.image}) was removed as unused "
            "(garbage collection); build the same source again",
            reason="IMAGE_COLLECTED",
            metadata={"build": b.name, "image": b.image},
        )


def _new_operation_name() -> str:
    return f"operations/{uuid.uuid4()}"


class Service:
    def __init__(
        self,
        db: Database,
        sources: SourceStore,
        http_base: str,
        logs_dir_for: Callable[[str, int], str],
        cluster_runtime: Runtime | None = None,
    ) -> None:
        self.db = db
        self.sources = sources
        self.http_base = http_base
        self._log_path = logs_dir_for
        self.cluster_runtime = cluster_runtime  # None: not known, not checked
        self.models = ModelCache(db)

    # ---- helpers ---------------------------------------------------------------------------

    def _replay(
        self, c: Changes, method: str, scope: str, request_id: str, fingerprint: str
    ) -> str | None:
        """The first call's result for a repeated request_id, or None."""
        if not request_id:
            return None
        row = c.s.get(RequestRow, f"{method}:{scope}:{request_id}")
        if row is None:
            return None
        if row.fingerprint != fingerprint:
            raise InvalidArgument(
                message=f"request_id {request_id!r} was already used for a different request",
                reason="REQUEST_ID_REUSED",
                metadata={"request_id": request_id},
            )
        return row.result

    @staticmethod
    def _remember(
        c: Changes, method: str, scope: str, request_id: str, fingerprint: str, result: str
    ) -> None:
        if request_id:
            c.s.add(
                RequestRow(
                    key=f"{method}:{scope}:{request_id}",
                    result=result,
                    fingerprint=fingerprint,
                    create_time=now(),
                )
            )

    @staticmethod
    def _ensure_idle(model: ModelRow) -> None:
        if model.running_operation:
            raise Aborted(
                message=f"operation {model.running_operation} is running on {model.name}; "
                "wait for it to finish (WaitOperation) and try again",
                reason="OPERATION_IN_PROGRESS",
                metadata={"operation": model.running_operation, "model": model.name},
            )

    def _operation(
        self,
        c: Changes,
        model: ModelRow,
        kind: st.OperationKind,
        target: str,
        deployment: str = "",
        progress: str = "queued",
    ) -> OperationRow:
        ts = now()
        op = OperationRow(
            name=_new_operation_name(),
            model=model.name,
            kind=kind.value,
            target=target,
            deployment=deployment,
            progress=progress,
            create_time=ts,
            update_time=ts,
        )
        c.created(op)
        c.model(model, running_operation=op.name)
        return op

    def _deployment_row(
        self,
        c: Changes,
        model: ModelRow,
        build: str,
        resources: t.Resources,
        environment: dict[str, str],
        secrets: dict[str, str],
        state: st.DeploymentState,
    ) -> DeploymentRow:
        ts = now()
        number = model.next_deployment_number
        # Keep the restart generation: a new deployment that only scales stays in place.
        current = repo.maybe_deployment_row(c.s, model.active_deployment)
        if not secrets and current is not None:  # cannot be read back to be sent again
            secrets = repo.secrets_of(current)
        row = DeploymentRow(
            name=str(names.parse_model(model.name).deployment(number)),
            model=model.name,
            number=number,
            build=build,
            replicas=resources.replicas,
            cpus=resources.cpus,
            memory_mib=resources.memory_mib,
            gpus=resources.gpus,
            environment=json.dumps(environment, sort_keys=True),
            secret_environment=json.dumps(secrets, sort_keys=True),
            state=state.value,
            restart_generation=current.restart_generation if current else 0,
            create_time=ts,
            update_time=ts,
        )
        model.next_deployment_number = number + 1
        c.created(row)
        return row

    def _changes(self, tx: object) -> Changes:
        from controlplane.storage.db import WriteTx

        assert isinstance(tx, WriteTx)
        return Changes(tx, self.http_base)

    # ---- models ----------------------------------------------------------------------------

    def create_model(
        self, parent: str, model_id: str, display_name: str, description: str, request_id: str
    ) -> t.Model:
        project = names.parse_project(parent, "parent")
        names.check_id(model_id, "model_id")
        check_text(display_name, "model.display_name", MAX_DISPLAY_NAME)
        check_text(description, "model.description", MAX_DESCRIPTION)
        _check_request_id(request_id)
        name = str(names.ModelName(project.project, model_id))
        fp = _fingerprint(model_id, display_name, description)
        with self.db.write() as tx:
            c = self._changes(tx)
            first = self._replay(c, "CreateModel", parent, request_id, fp)
            if first is not None:
                return repo.to_model(repo.model_row(c.s, first), self.http_base)
            if c.s.exec(select(ModelRow).where(ModelRow.name == name)).first() is not None:
                raise AlreadyExists(
                    message=f"model {name!r} already exists",
                    reason="MODEL_EXISTS",
                    metadata={"name": name},
                )
            ts = now()
            row = ModelRow(
                name=name,
                project=project.project,
                display_name=display_name or model_id,
                description=description,
                state=st.ModelState.NOT_DEPLOYED.value,
                create_time=ts,
                update_time=ts,
            )
            c.created(row)
            self._remember(c, "CreateModel", parent, request_id, fp, name)
            return repo.to_model(row, self.http_base)

    def cached_model(self, name: str) -> t.Model | None:
        """The model if it is in memory (no thread, no database): else call get_model."""
        return self.models.get(name)

    def get_model(self, name: str) -> t.Model:
        names.parse_model(name)
        generation = self.models.generation
        with self.db.read() as s:
            model = repo.model(s, name, self.http_base)
        self.models.put(model, generation)
        return model

    def list_models(self, parent: str, size: int, token: str) -> t.Page[t.Model]:
        project = names.parse_project(parent, "parent")
        n = repo.page_size(size)
        with self.db.read() as s:
            rows, nxt = repo.page(
                s, ModelRow, [ModelRow.project == project.project], f"models:{parent}", n, token
            )
            return t.Page([repo.to_model(r, self.http_base) for r in rows], nxt)

    def delete_model(self, name: str) -> None:
        names.parse_model(name)
        with self.db.write() as tx:
            c = self._changes(tx)
            model = repo.model_row(c.s, name)
            self._ensure_idle(model)
            state = st.ModelState(model.state)
            if state.active or state is st.ModelState.PENDING:
                raise FailedPrecondition(
                    message=f"model {name} is {state.value}: stop it before deleting it",
                    reason="MODEL_ACTIVE",
                    metadata={"name": name, "state": state.value},
                )
            # Its invocation keys go too: a model made again under the name starts keyless.
            tables = (BuildRow, DeploymentRow, OperationRow, SourceRow, JobRow, InvocationKeyRow)
            for table in tables:
                for row in c.s.exec(select(table).where(col(table.model) == name)).all():
                    c.s.delete(row)
            c.model_deleted(model)

    # ---- sources ---------------------------------------------------------------------------

    def model_exists(self, name: str) -> None:
        names.parse_model(name, "parent")
        with self.db.read() as s:
            repo.model_row(s, name)

    def record_source(self, model: str, sha256: str, size: int) -> t.Source:
        with self.db.write() as tx:
            s = tx.session
            repo.model_row(s, model)
            if repo.source_row(s, model, sha256) is None:
                s.add(SourceRow(model=model, sha256=sha256, size_bytes=size, create_time=now()))
            return t.Source(sha256=sha256, size_bytes=size)

    # ---- builds ----------------------------------------------------------------------------

    def _validate_deploy(self, deploy: t.DeployOptions | None) -> None:
        if deploy is not None:
            deploy.resources.validate("deploy.resources")
            t.validate_environment(deploy.environment, "deploy.environment")
            _check_secrets(deploy.environment, deploy.secret_environment, "deploy.")

    def create_build(self, req: NewBuild) -> t.Operation:
        model_name = str(names.parse_model(req.parent, "parent"))
        _check_sha(req.source_sha256)
        try:
            file_path = check_member_path(req.file_path)
        except ValueError as e:
            raise invalid_field("file_path", str(e), reason="INVALID_FILE_PATH") from None
        _check_function_name(req.function_name)
        check_text(req.comment, "comment", MAX_COMMENT)
        _check_request_id(req.request_id)
        self._validate_deploy(req.deploy)
        deploy = req.deploy
        fp = _fingerprint(
            req.source_sha256,
            file_path,
            req.function_name,
            req.comment,
            None
            if deploy is None
            else (deploy.resources, dict(deploy.environment), dict(deploy.secret_environment)),
            *(["no_cache"] if req.no_cache else []),  # earlier requests' fingerprints hold
        )
        with self.db.write() as tx:
            c = self._changes(tx)
            first = self._replay(c, "CreateBuild", model_name, req.request_id, fp)
            if first is not None:
                return repo.to_operation(repo.operation_row(c.s, first))
            model = repo.model_row(c.s, model_name)
            if repo.source_row(c.s, model_name, req.source_sha256) is None:
                raise NotFound(
                    message=f"no source {req.source_sha256} was uploaded for {model_name}",
                    reason="SOURCE_NOT_FOUND",
                    metadata={"source_sha256": req.source_sha256},
                )
            if file_path not in self.sources.files(req.source_sha256):
                raise invalid_field(
                    "file_path",
                    f"{file_path!r} is not a file in the source",
                    reason="FILE_NOT_IN_SOURCE",
                )
            self._ensure_idle(model)
            version = model.next_build_version
            model.next_build_version = version + 1
            build_name = str(names.parse_model(model_name).build(version))
            build = BuildRow(
                name=build_name,
                model=model_name,
                version=version,
                source_sha256=req.source_sha256,
                file_path=file_path,
                function_name=req.function_name,
                comment=req.comment,
                state=st.BuildState.QUEUED.value,
                log_path=self._log_path(model_name, version),
                create_time=now(),
                no_cache=req.no_cache,
            )
            c.created(build)
            deployment = ""
            if deploy is not None:
                dep = self._deployment_row(
                    c,
                    model,
                    build_name,
                    deploy.resources,
                    dict(deploy.environment),
                    dict(deploy.secret_environment),
                    st.DeploymentState.PENDING,
                )
                deployment = dep.name
                state = st.ModelState(model.state)
                if not state.active:
                    c.model(model, st.ModelState.PENDING)
            op = self._operation(
                c, model, st.OperationKind.CREATE_BUILD, build_name, deployment=deployment
            )
            c.enqueue(JOB_BUILD, model_name, op.name, build_name)
            self._remember(c, "CreateBuild", model_name, req.request_id, fp, op.name)
            return repo.to_operation(op)

    def get_build(self, name: str) -> t.Build:
        names.parse_build(name)
        with self.db.read() as s:
            return repo.to_build(repo.build_row(s, name))

    def export_of(self, name: str, base_image: str, tag: str) -> OciExport:
        """What ExportBuild builds for ``name``: a BUILT build whose image is still there."""
        names.parse_build(name)
        check_text(base_image, "base_image", 500)
        if tag and not _TAG.fullmatch(tag):
            raise invalid_field("tag", f"{tag!r} is not a valid image tag", reason="INVALID_TAG")
        with self.db.read() as s:
            b = repo.build_row(s, name)
        _check_built(b, "exported")
        _check_image(b)
        built = parse_runtime(b.runtime)
        return OciExport(
            artifact_path=Path(b.artifact_path),
            file_path=b.file_path,
            function_name=b.function_name,
            build_name=b.name,
            image=b.image,
            python_version=built.python if built else DEFAULT_PYTHON,
            base_image=base_image,
            tag=tag or "latest",
        )

    def build_log_path(self, name: str) -> str:
        names.parse_build(name)
        with self.db.read() as s:
            return repo.build_row(s, name).log_path

    def list_builds(self, parent: str, size: int, token: str) -> t.Page[t.Build]:
        model = str(names.parse_model(parent, "parent"))
        n = repo.page_size(size)
        with self.db.read() as s:
            repo.model_row(s, model)
            rows, nxt = repo.page(
                s,
                BuildRow,
                [BuildRow.model == model],
                f"builds:{model}",
                n,
                token,
                newest_first=True,
            )
            return t.Page([repo.to_build(r) for r in rows], nxt)

    # ---- deployments -----------------------------------------------------------------------

    def create_deployment(
        self,
        parent: str,
        build: str,
        resources: t.Resources | None,
        environment: dict[str, str],
        request_id: str,
        secrets: dict[str, str] | None = None,
    ) -> t.Operation:
        secrets = secrets or {}
        model_name = str(names.parse_model(parent, "parent"))
        build_name = names.parse_build(build, "build")
        if str(build_name.parent) != model_name:
            raise invalid_field(
                "build", f"{build} is not a build of {model_name}", reason="BUILD_OF_ANOTHER_MODEL"
            )
        if resources is not None:
            resources.validate("resources")
        t.validate_environment(environment, "environment")
        _check_secrets(environment, secrets)
        _check_request_id(request_id)
        # A request without secrets keeps its old fingerprint (earlier ids still match).
        fp = _fingerprint(build, resources, environment, *([secrets] if secrets else []))
        with self.db.write() as tx:
            c = self._changes(tx)
            first = self._replay(c, "CreateDeployment", model_name, request_id, fp)
            if first is not None:
                return repo.to_operation(repo.operation_row(c.s, first))
            model = repo.model_row(c.s, model_name)
            b = repo.build_row(c.s, build)
            _check_built(b, "deployed")
            self._check_runtime(b)
            _check_image(b)
            self._ensure_idle(model)
            current = repo.maybe_deployment_row(c.s, model.active_deployment)
            if resources is None:
                resources = repo.resources_of(current) if current else t.Resources()
            dep = self._deployment_row(
                c, model, build, resources, environment, secrets, st.DeploymentState.PENDING
            )
            op = self._operation(
                c,
                model,
                st.OperationKind.CREATE_DEPLOYMENT,
                dep.name,
                deployment=dep.name,
                progress="deploying",
            )
            start_deploying(c, model, dep)
            c.enqueue(JOB_APPLY, model_name, op.name, dep.name)
            self._remember(c, "CreateDeployment", model_name, request_id, fp, op.name)
            return repo.to_operation(op)

    def _check_runtime(self, b: BuildRow) -> None:
        """A build deploys only on a cluster that runs its Python (major.minor, platform)."""
        built = parse_runtime(b.runtime)
        if built is not None and self.cluster_runtime is not None:
            why = runtime_mismatch(built, self.cluster_runtime)
            if why:
                raise FailedPrecondition(
                    message=f"build {b.name} cannot run on this cluster: {why}",
                    reason="RUNTIME_MISMATCH",
                    metadata={
                        "build": b.name,
                        "build_runtime": built.abi,
                        "cluster_runtime": self.cluster_runtime.abi,
                    },
                )

    def get_deployment(self, name: str) -> t.Deployment:
        names.parse_deployment(name)
        with self.db.read() as s:
            return repo.to_deployment(repo.deployment_row(s, name))

    def list_deployments(self, parent: str, size: int, token: str) -> t.Page[t.Deployment]:
        model = str(names.parse_model(parent, "parent"))
        n = repo.page_size(size)
        with self.db.read() as s:
            repo.model_row(s, model)
            rows, nxt = repo.page(
                s,
                DeploymentRow,
                [DeploymentRow.model == model],
                f"deployments:{model}",
                n,
                token,
                newest_first=True,
            )
            return t.Page([repo.to_deployment(r) for r in rows], nxt)

    # ---- stop and restart ------------------------------------------------------------------

    def stop_model(self, name: str, request_id: str) -> t.Operation:
        names.parse_model(name)
        _check_request_id(request_id)
        with self.db.write() as tx:
            c = self._changes(tx)
            first = self._replay(c, "StopModel", name, request_id, "")
            if first is not None:
                return repo.to_operation(repo.operation_row(c.s, first))
            model = repo.model_row(c.s, name)
            self._ensure_idle(model)
            state = st.ModelState(model.state)
            if state not in (st.ModelState.DEPLOYED, st.ModelState.FAILED):
                raise FailedPrecondition(
                    message=f"model {name} is {state.value}; only a DEPLOYED or FAILED model "
                    "can be stopped",
                    reason="MODEL_NOT_RUNNING",
                    metadata={"name": name, "state": state.value},
                )
            dep = repo.maybe_deployment_row(c.s, model.active_deployment)
            op = self._operation(
                c,
                model,
                st.OperationKind.STOP_MODEL,
                name,
                deployment=model.active_deployment,
                progress="stopping",
            )
            self._remember(c, "StopModel", name, request_id, "", op.name)
            if dep is None:  # its first deploy failed before anything ran: nothing to stop
                c.model(model, st.ModelState.STOPPED)
                c.operation_done(op, model, "stopped")
                return repo.to_operation(op)
            c.model(model, st.ModelState.STOPPING)
            if dep is not None and dep.state != st.DeploymentState.STOPPED.value:
                c.deployment(dep, st.DeploymentState.STOPPING, applied=False)
            c.enqueue(JOB_APPLY, name, op.name, name)
            return repo.to_operation(op)

    def restart_model(self, name: str, request_id: str) -> t.Operation:
        names.parse_model(name)
        _check_request_id(request_id)
        with self.db.write() as tx:
            c = self._changes(tx)
            first = self._replay(c, "RestartModel", name, request_id, "")
            if first is not None:
                return repo.to_operation(repo.operation_row(c.s, first))
            model = repo.model_row(c.s, name)
            self._ensure_idle(model)
            dep = repo.maybe_deployment_row(c.s, model.active_deployment)
            if dep is None:
                raise FailedPrecondition(
                    message=f"model {name} was never deployed: there is nothing to restart",
                    reason="MODEL_NEVER_DEPLOYED",
                    metadata={"name": name},
                )
            state = st.ModelState(model.state)
            if state not in (st.ModelState.DEPLOYED, st.ModelState.STOPPED, st.ModelState.FAILED):
                raise FailedPrecondition(
                    message=f"model {name} is {state.value} and cannot be restarted now",
                    reason="MODEL_NOT_RESTARTABLE",
                    metadata={"name": name, "state": state.value},
                )
            op = self._operation(
                c,
                model,
                st.OperationKind.RESTART_MODEL,
                name,
                deployment=dep.name,
                progress="restarting",
            )
            c.deployment(dep, restart_generation=dep.restart_generation + 1)
            start_deploying(c, model, dep)
            c.enqueue(JOB_APPLY, name, op.name, dep.name)
            self._remember(c, "RestartModel", name, request_id, "", op.name)
            return repo.to_operation(op)

    # ---- operations ------------------------------------------------------------------------

    def cancel_operation(self, name: str) -> t.Operation:
        """Stops a build or a deploy cleanly. A queued build ends at once; a running build
        is marked, and the server running its job stops it; a rollout ends at once and
        the model goes back to its last good deployment."""
        names.parse_operation(name)
        with self.db.write() as tx:
            c = self._changes(tx)
            op = repo.operation_row(c.s, name)
            if op.done:
                raise FailedPrecondition(
                    message=f"operation {name} is already done",
                    reason="OPERATION_DONE",
                    metadata={"operation": name},
                )
            if op.kind == st.OperationKind.STOP_MODEL.value:
                raise FailedPrecondition(
                    message=f"operation {name} stops a model, which cannot be undone halfway; "
                    "restart the model once it is STOPPED",
                    reason="NOT_CANCELLABLE",
                    metadata={"operation": name, "kind": op.kind},
                )
            model = repo.model_row(c.s, op.model)
            build = c.s.exec(select(BuildRow).where(BuildRow.name == op.target)).first()
            unfinished = (st.BuildState.QUEUED.value, st.BuildState.BUILDING.value)
            pending = c.s.exec(
                select(JobRow).where(
                    JobRow.operation == name, JobRow.kind == JOB_BUILD, JobRow.state == "pending"
                )
            ).all()
            if build is not None and build.state in unfinished and pending:
                # No server runs it now (queued, or handed back by a server that stopped).
                for job in pending:
                    job.state, job.error = "done", "cancelled before it ran"
                    c.s.add(job)
                started = build.state == st.BuildState.BUILDING.value
                why = "cancelled while building" if started else "cancelled before it started"
                rollouts.end_build_without_result(c, model, op, build, f"{why} ({name})")
            elif build is not None and build.state in unfinished:
                c.cancel_requested(op)  # the server running its job stops it
            else:
                dep = repo.maybe_deployment_row(c.s, op.deployment)
                if dep is None or dep.state != st.DeploymentState.DEPLOYING.value:
                    raise FailedPrecondition(
                        message=f"operation {name} has nothing running to cancel right now",
                        reason="NOTHING_TO_CANCEL",
                        metadata={"operation": name},
                    )
                rollouts.fail_rollout(
                    c,
                    model,
                    dep,
                    op,
                    f"cancelled on request ({name})",
                    "CANCELLED",
                    rollouts.CANCELLED_REASON,
                )
            return repo.to_operation(op)

    def get_operation(self, name: str) -> t.Operation:
        names.parse_operation(name)
        with self.db.read() as s:
            return repo.to_operation(repo.operation_row(s, name))

    def list_operations(self, parent: str, size: int, token: str) -> t.Page[t.Operation]:
        model = str(names.parse_model(parent, "parent"))
        n = repo.page_size(size)
        with self.db.read() as s:
            repo.model_row(s, model)
            rows, nxt = repo.page(
                s,
                OperationRow,
                [OperationRow.model == model],
                f"operations:{model}",
                n,
                token,
                newest_first=True,
            )
            return t.Page([repo.to_operation(r) for r in rows], nxt)


def start_deploying(c: Changes, model: ModelRow, dep: DeploymentRow) -> None:
    """The deployment and its model go DEPLOYING at once; the job applies it.

    What the rollout must replace is fixed here, from the records, not at apply time:
    any apply (another job's, a repair, another server's) may put the new spec on Serve
    before this rollout's own job runs, and replicas of the new spec must never count
    as the old ones. Replaced: the replicas last observed for the deployment serving
    now, when the change rolls (another build, resources, environment, or a restart).
    """
    before = repo.maybe_deployment_row(c.s, model.active_deployment)
    previous: list[str] = []
    roll = False
    if before is not None and before.state == st.DeploymentState.DEPLOYED.value:
        previous = [r["id"] for r in json.loads(before.observed_replicas)]
        after_spec = desired.app_spec(model, dep, repo.build_row(c.s, dep.build))
        roll = before is dep or rolls(
            desired.app_spec(model, before, repo.build_row(c.s, before.build)), after_spec
        )
    c.deployment(
        dep,
        st.DeploymentState.DEPLOYING,
        applied=False,
        message="",
        expect_roll=bool(previous) and roll,
        previous_replica_ids=json.dumps(previous if roll else []),
    )
    c.model(model, st.ModelState.DEPLOYING, active_deployment=dep.name, message="")
