"""Use cases: validation, idempotency, conflicts. One transaction per mutation
writes the record, its Operation, the events and the job together.

Methods are synchronous (SQLModel); the API layer calls them in worker threads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import keyword
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlmodel import Session, SQLModel, col, select

from controlplane import capacity, lifecycle
from controlplane.build_logs import LogSource
from controlplane.domain import names, scaling
from controlplane.domain import traffic as tr
from controlplane.domain.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    check_text,
    invalid_field,
)
from controlplane.domain.plan import Plan
from controlplane.domain.redaction import redact
from controlplane.domain.states import BuildState, DeploymentState, ModelState, OperationKind
from controlplane.domain.traffic import Strategy
from controlplane.domain.transitions import Verb, check_verb
from controlplane.domain.types import (
    Build,
    Deployment,
    DeployOptions,
    LogLine,
    Model,
    Operation,
    Page,
    Resources,
    Source,
    validate_environment,
)
from controlplane.files import Files, log_path
from controlplane.lifecycle import traffic
from controlplane.sources import SourceStore
from controlplane.storage import model_logs, repo
from controlplane.storage.changes import Changes, now
from controlplane.storage.db import Database
from controlplane.storage.model_cache import HeadCheck, ModelCache, PostgresHead
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
from workers.backend import NodeResources
from workers.oci import OciExport
from workers.runtime import Runtime
from workers.runtime import mismatch as runtime_mismatch
from workers.runtime import parse as parse_runtime

MAX_DISPLAY_NAME = 200
MAX_DESCRIPTION = 10_000
MAX_COMMENT = 10_000
MAX_REQUEST_ID = 200
MAX_FUNCTION_NAME = 200  # the column's size
MAX_REPLICA_ID = 100  # the log table's column
METRICS_STEP_S = 10  # GetModelMetrics' finest step (controlplane/series.py)
METRICS_WINDOW_MAX_S = 3600  # and how far back it keeps
_REPLICA_ID = re.compile(r"[A-Za-z0-9_-]*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # an OCI reference name
DEFAULT_PYTHON = "3.11"  # base image of builds made before runtimes were recorded


T = TypeVar("T")
R = TypeVar("R", bound=SQLModel)


@dataclass(frozen=True)
class NewBuild:
    parent: str
    source_sha256: str
    file_path: str
    function_name: str
    comment: str = ""
    deploy: DeployOptions | None = None
    request_id: str = ""
    no_cache: bool = False
    creator: str = ""  # who asks (its deployment's creator)
    validate_only: bool = False  # only plan the deploy: nothing is written
    wait_for_capacity: bool = False  # start it even when the cluster has no room now


class _Planned(Exception):
    """Leaves a change's transaction without writing it: only its plan was asked for."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan.summary)
        self.plan = plan


def _planned(kind: OperationKind, target: str, model: str, plan: Plan) -> Operation:
    """A validate_only answer: an operation with no name, done, carrying the plan."""
    t = now()
    return Operation(
        name="",
        kind=kind,
        target=target,
        done=True,
        error=None,
        create_time=t,
        update_time=t,
        model=model,
        progress=plan.summary,
        plan=plan,
    )


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()


def metrics_window(window_s: float, step_s: float) -> tuple[int, int]:
    """GetModelMetrics' window and step in seconds (0: their defaults), checked."""
    window = int(window_s) if window_s else METRICS_WINDOW_MAX_S
    step = int(step_s) if step_s else METRICS_STEP_S
    if window_s and not METRICS_STEP_S <= window_s <= METRICS_WINDOW_MAX_S:
        raise invalid_field("window", "from 10s to 3600s (the last hour is kept)")
    if step_s and (step_s % METRICS_STEP_S or step_s > window or step_s < 0):
        raise invalid_field("step", "a multiple of 10s, at most the window")
    return window, step


def _check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID:
        raise invalid_field("request_id", f"at most {MAX_REQUEST_ID} characters")


def _check_function_name(value: str) -> str:
    if len(value) > MAX_FUNCTION_NAME:
        raise invalid_field("function_name", f"at most {MAX_FUNCTION_NAME} characters")
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
    validate_environment(secrets, f"{prefix}secret_environment")
    both = sorted(set(env) & set(secrets))
    if both:
        raise invalid_field(
            f"{prefix}secret_environment",
            f"{', '.join(both)} also in environment: a name is secret or not",
        )


def _check_built(b: BuildRow, verb: str) -> None:
    if b.state != BuildState.BUILT.value:
        raise FailedPrecondition(
            message=f"build {b.name} is {b.state}; only a BUILT build can be {verb}",
            reason="BUILD_NOT_BUILT",
            metadata={"build": b.name, "state": b.state},
        )


def _image_collected(b: BuildRow) -> FailedPrecondition:
    return FailedPrecondition(
        message=f"the image of build {b.name} ({b.image}) was removed as unused "
        "(garbage collection); build the same source again",
        reason="IMAGE_COLLECTED",
        metadata={"build": b.name, "image": b.image},
    )


class Service:
    def __init__(
        self,
        db: Database,
        sources: SourceStore,
        http_base: str,
        files: Files,
        cluster_runtime: Runtime | None = None,
        nodes: Callable[[], Sequence[NodeResources]] | None = None,
        cluster_up: Callable[[], bool] = lambda: True,
    ) -> None:
        """``nodes``: the cluster's nodes and what each has free (plans, capacity checks);
        None: not known, nothing is checked. ``cluster_up``: False while the cluster is
        gone (the backend connects again): changes that start work there are refused."""
        self.db = db
        self.nodes = nodes
        self.cluster_up = cluster_up
        self.sources = sources
        self.http_base = http_base
        self.files = files
        self.cluster_runtime = cluster_runtime  # None: not known, not checked
        self.models = ModelCache(db)
        # PostgreSQL: what is kept is checked against the head revision (model_cache.py).
        self.head_reader = None if db.is_sqlite else PostgresHead(db.url)
        self.head = None if self.head_reader is None else HeadCheck(self.head_reader)

    # ---- helpers ---------------------------------------------------------------------------

    def _idempotent(
        self,
        method: str,
        scope: str,
        request_id: str,
        fingerprint: str,
        replay: Callable[[Session, str], T],
        change: Callable[[Changes], tuple[T, str]],
    ) -> T:
        """Runs ``change`` in one write transaction, once per ``request_id`` (AIP-155).

        A repeated request_id returns the first call's result (``replay`` turns the name
        that call recorded back into it); the same id with a different request is
        INVALID_ARGUMENT. ``change`` returns its result and the name to record."""
        with self.db.write() as tx:
            c = Changes(tx, self.http_base)
            key = f"{method}:{scope}:{request_id}"
            first = c.session.get(RequestRow, key) if request_id else None
            if first is not None:
                if first.fingerprint != fingerprint:
                    raise InvalidArgument(
                        message=f"request_id {request_id!r} was already used for a "
                        "different request",
                        reason="REQUEST_ID_REUSED",
                        metadata={"request_id": request_id},
                    )
                return replay(c.session, first.result)
            result, recorded = change(c)
            if request_id:
                c.session.add(
                    RequestRow(key=key, result=recorded, fingerprint=fingerprint, create_time=now())
                )
            return result

    def _cluster(self, needed: bool) -> capacity.Cluster:
        """The nodes, read before a change's transaction (never while it holds the lock).
        Every change that starts work on the cluster comes here first: while the cluster
        is gone, UNAVAILABLE (nothing written), to be asked again once it is back."""
        if not self.cluster_up():
            raise Unavailable(
                message="the Ray cluster does not answer now (the server is connecting "
                "again); nothing was changed: try again shortly. Reads keep working.",
                reason="CLUSTER_UNAVAILABLE",
            )
        return capacity.read_cluster(self.nodes if needed else None)

    def _planning(
        self,
        validate_only: bool,
        kind: OperationKind,
        target: str,
        model: str,
        run: Callable[[], Operation],
    ) -> Operation:
        """Runs a change; with ``validate_only`` its transaction ends with its plan, and
        is rolled back."""
        try:
            return run()
        except _Planned as planned:
            if not validate_only:
                raise
            return _planned(kind, target, model, planned.plan)

    def _list(
        self,
        parent: str | None,
        table: type[R],
        where: Sequence[Any],
        scope: str,
        size: int,
        token: str,
        convert: Callable[[R], T],
        newest_first: bool = True,
    ) -> Page[T]:
        """One page of a list; ``parent`` (a model) must exist: asked only when the page is
        empty (a model's records name it, so a page with any proves it; one query less)."""
        size = repo.page_size(size)  # a bad size is refused before anything is read
        with self.db.read() as s:
            found = repo.list_page(s, table, where, scope, size, token, convert, newest_first)
            if parent is not None and not found.items:
                repo.model_row(s, parent)
            return found

    @staticmethod
    def _ensure_idle(model: ModelRow) -> None:
        if model.running_operation:
            raise Aborted(
                message=f"operation {model.running_operation} is running on {model.name}; "
                "wait for it to finish (WaitOperation) and try again",
                reason="OPERATION_IN_PROGRESS",
                metadata={"operation": model.running_operation, "model": model.name},
            )

    def _deployment_row(
        self,
        c: Changes,
        model: ModelRow,
        build: str,
        resources: Resources,
        environment: dict[str, str],
        secrets: dict[str, str],
        creator: str,
    ) -> DeploymentRow:
        """A new PENDING deployment record of ``model`` (its history keeps every one)."""
        ts = now()
        number = model.next_deployment_number
        # Keep the restart generation: a new deployment that only scales stays in place.
        current = repo.maybe_deployment_row(c.session, model.active_deployment)
        before = repo.secrets_of(current) if current is not None else {}
        # Not given: the current values, as stored (they cannot be read back to be sent
        # again); given: sealed, and a value equal to the current one keeps its stored form.
        sealed = self.db.secrets.seal_given(secrets, before) if secrets else before
        row = DeploymentRow(
            name=str(names.parse_model(model.name).deployment(number)),
            model=model.name,
            number=number,
            build=build,
            replicas=resources.initial_replicas,
            autoscaling=scaling.autoscaling_to_json(resources.autoscaling) or "",
            cpus=resources.cpus,
            memory_mib=resources.memory_mib,
            gpus=resources.gpus,
            environment=json.dumps(environment, sort_keys=True),
            secret_environment=json.dumps(sealed, sort_keys=True),
            state=DeploymentState.PENDING.value,
            restart_generation=current.restart_generation if current else 0,
            creator=creator,
            create_time=ts,
            update_time=ts,
        )
        model.next_deployment_number = number + 1
        c.created(row)
        return row

    # ---- models ----------------------------------------------------------------------------

    def create_model(
        self, parent: str, model_id: str, display_name: str, description: str, request_id: str
    ) -> Model:
        project = names.parse_project(parent, "parent")
        names.check_id(model_id, "model_id")
        check_text(display_name, "model.display_name", MAX_DISPLAY_NAME)
        check_text(description, "model.description", MAX_DESCRIPTION)
        _check_request_id(request_id)
        name = str(names.ModelName(project.project, model_id))

        def create(c: Changes) -> tuple[Model, str]:
            if c.session.exec(select(ModelRow).where(ModelRow.name == name)).first():
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
                state=ModelState.NOT_DEPLOYED.value,
                create_time=ts,
                update_time=ts,
            )
            c.created(row)
            return repo.to_model(row, self.http_base), name

        return self._idempotent(
            "CreateModel",
            parent,
            request_id,
            _fingerprint(model_id, display_name, description),
            lambda s, first: repo.to_model(repo.model_row(s, first), self.http_base),
            create,
        )

    def cached_model(self, name: str, head: int | None = None) -> Model | None:
        """The model if it is in memory (no thread, no database): else call get_model.
        On PostgreSQL, only with ``head``: the head revision from ``self.head.now()``."""
        if head is None:
            return self.models.get(name)
        return self.models.get_at(name, head)

    def get_model(self, name: str) -> Model:
        names.parse_model(name)
        generation = self.models.generation
        with self.db.read() as s:
            model = repo.model(s, name, self.http_base)
        self.models.put(model, generation)
        return model

    def serving_replicas(self, name: str) -> frozenset[str]:
        """The ids of the replicas Serve lists for the model's serving deployments now."""
        with self.db.read() as s:
            return repo.serving_replica_ids(s, name).get(name, frozenset())

    def log_query(
        self,
        name: str,
        replica: str = "",
        build: str = "",
        since: datetime | None = None,
        tail: int = 0,
    ) -> model_logs.LogQuery:
        """A StreamModelLogs request checked: the model exists (NOT_FOUND), the build is
        one of its builds' names, the replica id and tail are sensible."""
        self.get_model(name)
        if build and str(names.parse_build(build, "build").parent) != name:
            raise invalid_field("build", f"{build!r} is not a build of {name}")
        if len(replica) > MAX_REPLICA_ID or not _REPLICA_ID.fullmatch(replica):
            raise invalid_field("replica", "a replica id as GetDeployment lists it")
        if tail < 0:
            raise invalid_field("tail", "0 (every line kept) or the number of last lines")
        return model_logs.LogQuery(name, replica, build, since, tail=tail)

    def model_log_lines(self, query: model_logs.LogQuery) -> list[LogLine]:
        """A model's log lines (storage/model_logs.py), redacted with the secret values of
        every deployment it has now (lines are redacted when written too)."""
        with self.db.read() as s:
            secrets, unreadable = repo.secret_values(s, self.db.secrets, query.model)
            if unreadable:  # the lines could not be redacted: none is shown
                raise RuntimeError(f"{query.model}: a secret environment cannot be read")
            lines = model_logs.read(s, query)
        values = secrets.get(query.model, frozenset())
        return [replace(line, text=redact(line.text, values)) for line in lines]

    def list_models(self, parent: str, size: int, token: str) -> Page[Model]:
        project = names.parse_project(parent, "parent").project
        return self._list(
            None,
            ModelRow,
            [ModelRow.project == project],
            f"models:{parent}",
            size,
            token,
            lambda row: repo.to_model(row, self.http_base),
            newest_first=False,
        )

    def delete_model(self, name: str) -> None:
        names.parse_model(name)
        with self.db.write() as tx:
            c = Changes(tx, self.http_base)
            model = repo.model_row(c.session, name)
            self._ensure_idle(model)
            check_verb(Verb.DELETE, name, ModelState(model.state))
            # Its invocation keys go too: a model made again under the name starts keyless.
            tables = (BuildRow, DeploymentRow, OperationRow, SourceRow, JobRow, InvocationKeyRow)
            for table in tables:
                for row in c.session.exec(select(table).where(col(table.model) == name)).all():
                    c.session.delete(row)
            model_logs.delete_model(c.session, name)
            c.model_deleted(model)

    # ---- sources ---------------------------------------------------------------------------

    def model_exists(self, name: str) -> None:
        names.parse_model(name, "parent")
        with self.db.read() as s:
            repo.model_row(s, name)

    def record_source(self, model: str, sha256: str, size: int) -> Source:
        with self.db.write() as tx:
            s = tx.session
            repo.model_row(s, model)
            if repo.source_row(s, model, sha256) is None:
                s.add(SourceRow(model=model, sha256=sha256, size_bytes=size, create_time=now()))
            return Source(sha256=sha256, size_bytes=size)

    # ---- builds ----------------------------------------------------------------------------

    def _validate_deploy(self, deploy: DeployOptions | None) -> None:
        if deploy is not None:
            deploy.resources.validate("deploy.resources")
            validate_environment(deploy.environment, "deploy.environment")
            _check_secrets(deploy.environment, deploy.secret_environment, "deploy.")

    def create_build(self, req: NewBuild) -> Operation:
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
        self.sources.path(req.source_sha256)  # another server's upload: here before the write
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

        def create(c: Changes) -> tuple[Operation, str]:
            model = repo.model_row(c.session, model_name)
            if repo.source_row(c.session, model_name, req.source_sha256) is None:
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
            build = BuildRow(
                name=str(names.parse_model(model_name).build(version)),
                model=model_name,
                version=version,
                source_sha256=req.source_sha256,
                file_path=file_path,
                function_name=req.function_name,
                comment=req.comment,
                state=BuildState.QUEUED.value,
                log_path=str(log_path(self.files.logs_dir, model_name, version)),
                create_time=now(),
                no_cache=req.no_cache,
            )
            c.created(build)
            dep = None
            if deploy is not None:
                dep = self._deployment_row(
                    c,
                    model,
                    build.name,
                    deploy.resources,
                    dict(deploy.environment),
                    dict(deploy.secret_environment),
                    req.creator,
                )
            planned = None
            if dep is not None:
                before = repo.maybe_deployment_row(c.session, model.active_deployment)
                planned = capacity.plan_for(cluster, model, before, dep, rebuild=True)
            op = lifecycle.begin_build(c, model, build, dep)
            if planned is not None:
                if req.validate_only:  # once every check passed; nothing written is kept
                    raise _Planned(planned)
                capacity.refuse_unless_fits(planned, model_name, req.wait_for_capacity)
            return repo.to_operation(op), op.name

        if req.validate_only and deploy is None:
            raise invalid_field(
                "validate_only", "plans a deploy: give deploy options with it", "NOTHING_TO_PLAN"
            )
        cluster = self._cluster(
            deploy is not None and (req.validate_only or not req.wait_for_capacity)
        )
        return self._planning(
            req.validate_only,
            OperationKind.CREATE_BUILD,
            model_name,
            model_name,
            lambda: self._idempotent(
                "CreateBuild",
                model_name,
                "" if req.validate_only else req.request_id,
                fp,
                _replay_operation,
                create,
            ),
        )

    def get_build(self, name: str) -> Build:
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
        self._check_image(b)
        built = parse_runtime(b.runtime)
        return OciExport(
            artifact_path=self._artifact_here(b),
            file_path=b.file_path,
            function_name=b.function_name,
            build_name=b.name,
            image=b.image,
            python_version=built.python if built else DEFAULT_PYTHON,
            base_image=base_image,
            tag=tag or "latest",
        )

    def build_log_path(self, name: str) -> Path:
        """The build's log on this server's disk (fetched once the build finished when
        another server, with ``--artifact-store database``, ran it)."""
        names.parse_build(name)
        with self.db.read() as s:
            b = repo.build_row(s, name)
        return self.files.build_log(b.log_path, b.name, b.model, b.version)

    def build_log_source(self, name: str) -> LogSource:
        """Where a reader reads the build's log: this server's file (a finished build's
        fetched first when another server ran it), or while another server runs it
        (``--artifact-store database``), the parts that server shares as it goes."""
        names.parse_build(name)
        with self.db.read() as s:
            b = repo.build_row(s, name)
        recorded, model, version = b.log_path, b.model, b.version
        if b.state in (BuildState.BUILT, BuildState.FAILED) or not self.files.shared:
            path = self.files.build_log(recorded, b.name, model, version)
            return LogSource(lambda: path)
        parts = functools.partial(self.files.log_parts, b.name)
        return LogSource(lambda: self.files.log_here(recorded, model, version), parts)

    def _check_image(self, b: BuildRow) -> None:
        """The build's image is still there (garbage collection may have removed it)."""
        if b.artifact_path and not self.files.has_artifact(b.artifact_path):
            raise _image_collected(b)

    def _artifact_here(self, b: BuildRow) -> Path:
        folder = self.files.artifact(b.artifact_path)
        if folder is None:
            raise _image_collected(b)
        return folder

    def list_builds(self, parent: str, size: int, token: str) -> Page[Build]:
        model = str(names.parse_model(parent, "parent"))
        return self._list(
            model,
            BuildRow,
            [BuildRow.model == model],
            f"builds:{model}",
            size,
            token,
            repo.to_build,
        )

    # ---- deployments -----------------------------------------------------------------------

    def create_deployment(
        self,
        parent: str,
        build: str,
        resources: Resources | None,
        environment: dict[str, str],
        request_id: str,
        secrets: dict[str, str] | None = None,
        creator: str = "",
        strategy: Strategy | None = None,
        validate_only: bool = False,
        wait_for_capacity: bool = False,
    ) -> Operation:
        """``creator``: who asks (the deployment records it; not part of the request's
        fingerprint: a retry by another token is still the same request). ``strategy``:
        how it takes over (IMMEDIATE; CANARY or SHADOW: ``traffic.begin_rollout``)."""
        secrets = secrets or {}
        strategy = strategy or Strategy()
        found = strategy.violations("rollout")
        if found:
            raise InvalidArgument(
                message="; ".join(f"{v.field}: {v.description}" for v in found),
                reason="INVALID_ROLLOUT",
                metadata={"field": found[0].field},
                violations=tuple(found),
            )
        model_name = str(names.parse_model(parent, "parent"))
        build_name = names.parse_build(build, "build")
        if str(build_name.parent) != model_name:
            raise invalid_field(
                "build", f"{build} is not a build of {model_name}", reason="BUILD_OF_ANOTHER_MODEL"
            )
        if resources is not None:
            resources.validate("resources")
        validate_environment(environment, "environment")
        _check_secrets(environment, secrets)
        _check_request_id(request_id)
        # A request without secrets keeps its old fingerprint (earlier ids still match).
        fp = _fingerprint(
            build,
            resources,
            environment,
            *([secrets] if secrets else []),
            *([strategy] if strategy.judged else []),
        )

        def create(c: Changes) -> tuple[Operation, str]:
            model = repo.model_row(c.session, model_name)
            b = repo.build_row(c.session, build)
            _check_built(b, "deployed")
            self._check_runtime(b)
            self._check_image(b)
            self._ensure_idle(model)
            current = repo.maybe_deployment_row(c.session, model.active_deployment)
            wanted = resources
            if wanted is None:
                wanted = repo.resources_of(current) if current else Resources()
            dep = self._deployment_row(c, model, build, wanted, environment, secrets, creator)
            planned = capacity.plan_for(cluster, model, current, dep, candidate=strategy.judged)
            if strategy.judged:
                op = traffic.begin_rollout(c, model, dep, strategy)
            else:
                op = lifecycle.begin_deploy(c, model, dep)
            if validate_only:  # once every check passed; nothing written is kept
                raise _Planned(planned)
            capacity.refuse_unless_fits(planned, model_name, wait_for_capacity)
            return repo.to_operation(op), op.name

        cluster = self._cluster(validate_only or not wait_for_capacity)
        return self._planning(
            validate_only,
            OperationKind.CREATE_DEPLOYMENT,
            model_name,
            model_name,
            lambda: self._idempotent(
                "CreateDeployment",
                model_name,
                "" if validate_only else request_id,
                fp,
                _replay_operation,
                create,
            ),
        )

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

    def get_deployment(self, name: str) -> Deployment:
        names.parse_deployment(name)
        with self.db.read() as s:
            return repo.to_deployment(repo.deployment_row(s, name))

    def list_deployments(self, parent: str, size: int, token: str) -> Page[Deployment]:
        model = str(names.parse_model(parent, "parent"))
        return self._list(
            model,
            DeploymentRow,
            [DeploymentRow.model == model],
            f"deployments:{model}",
            size,
            token,
            repo.to_deployment,
        )

    # ---- stop and restart ------------------------------------------------------------------

    def stop_model(self, name: str, request_id: str, validate_only: bool = False) -> Operation:
        names.parse_model(name)
        _check_request_id(request_id)
        cluster = self._cluster(validate_only)

        def stop(c: Changes) -> tuple[Operation, str]:
            model = repo.model_row(c.session, name)
            self._ensure_idle(model)
            before = repo.maybe_deployment_row(c.session, model.active_deployment)
            planned = capacity.plan_for(cluster, model, before, None)
            op = lifecycle.begin_stop(c, model)  # its checks: a plan only of a valid stop
            if validate_only:
                raise _Planned(planned)
            return repo.to_operation(op), op.name

        return self._planning(
            validate_only,
            OperationKind.STOP_MODEL,
            name,
            name,
            lambda: self._idempotent(
                "StopModel", name, "" if validate_only else request_id, "", _replay_operation, stop
            ),
        )

    def restart_model(
        self,
        name: str,
        request_id: str,
        validate_only: bool = False,
        wait_for_capacity: bool = False,
    ) -> Operation:
        names.parse_model(name)
        _check_request_id(request_id)
        cluster = self._cluster(validate_only or not wait_for_capacity)

        def restart(c: Changes) -> tuple[Operation, str]:
            model = repo.model_row(c.session, name)
            self._ensure_idle(model)
            dep = repo.maybe_deployment_row(c.session, model.active_deployment)
            if dep is None:
                raise FailedPrecondition(
                    message=f"model {name} was never deployed: there is nothing to restart",
                    reason="MODEL_NEVER_DEPLOYED",
                    metadata={"name": name},
                )
            planned = capacity.plan_for(cluster, model, dep, dep, restart=True)
            op = lifecycle.begin_restart(c, model, dep)
            if validate_only:  # once every check passed; nothing written is kept
                raise _Planned(planned)
            capacity.refuse_unless_fits(planned, name, wait_for_capacity)
            return repo.to_operation(op), op.name

        return self._planning(
            validate_only,
            OperationKind.RESTART_MODEL,
            name,
            name,
            lambda: self._idempotent(
                "RestartModel",
                name,
                "" if validate_only else request_id,
                "",
                _replay_operation,
                restart,
            ),
        )

    # ---- traffic ---------------------------------------------------------------------------

    def set_traffic(
        self,
        name: str,
        weights: Sequence[tuple[str, int]],
        sticky_header: str,
        request_id: str,
        creator: str = "",
    ) -> Operation:
        """Splits a model's requests between two builds (``traffic.set_traffic``)."""
        model_name = str(names.parse_model(name))
        wanted = tr.check_weights(model_name, weights)
        if sticky_header and not tr.HEADER.fullmatch(sticky_header):
            raise invalid_field("sticky_header", "must be an HTTP header name")
        _check_request_id(request_id)
        fp = _fingerprint(sorted(wanted.items()), sticky_header)

        def change(c: Changes) -> tuple[Operation, str]:
            model = repo.model_row(c.session, model_name)
            self._ensure_idle(model)
            split = tr.split_from_json(model.traffic)
            live = {split.stable_build, split.candidate_build} if split else set()
            new = None
            if split is None:
                current = repo.maybe_deployment_row(c.session, model.active_deployment)
                others = [b for b in wanted if current is None or b != current.build]
                if current is None or len(wanted) != 2 or len(others) != 1:
                    serving = current.build if current is not None else "none"
                    raise FailedPrecondition(
                        message=f"{model_name} serves {serving}: name it and one other build, "
                        "with percents that add up to 100",
                        reason="NOT_A_SPLIT",
                        metadata={"name": model_name},
                    )
                b = repo.build_row(c.session, others[0])
                _check_built(b, "given traffic")
                self._check_runtime(b)
                self._check_image(b)
                new = self._deployment_row(
                    c,
                    model,
                    b.name,
                    repo.resources_of(current),
                    repo.environment_of(current),
                    {},
                    creator,
                )
            elif not set(wanted) <= live:
                raise FailedPrecondition(
                    message=f"{model_name} splits its traffic between "
                    f"{split.stable_build} and {split.candidate_build}: end that split first "
                    "(one of them at 100)",
                    reason="ANOTHER_SPLIT",
                    metadata={"name": model_name},
                )
            op = traffic.set_traffic(c, model, wanted, sticky_header, new)
            return repo.to_operation(op), op.name

        return self._idempotent("SetTraffic", model_name, request_id, fp, _replay_operation, change)

    def promote_rollout(self, name: str) -> Operation:
        """A canary's or shadow's new build takes over now (``traffic.promote_now``)."""
        names.parse_operation(name)
        with self.db.write() as tx:
            c = Changes(tx, self.http_base)
            op = repo.operation_row(c.session, name)
            traffic.promote_now(c, repo.model_row(c.session, op.model), op)
            return repo.to_operation(op)

    # ---- operations ------------------------------------------------------------------------

    def cancel_operation(self, name: str) -> Operation:
        """Stops a build or a deploy cleanly (``lifecycle.cancel``); a canary or shadow
        ends with all traffic back to the serving build (``traffic.abort``)."""
        names.parse_operation(name)
        with self.db.write() as tx:
            c = Changes(tx, self.http_base)
            op = repo.operation_row(c.session, name)
            model = repo.model_row(c.session, op.model)
            if not op.done and traffic.owns(model, op):
                traffic.abort(c, model, op)
            else:
                lifecycle.cancel(c, model, op)
            return repo.to_operation(op)

    def get_operation(self, name: str) -> Operation:
        names.parse_operation(name)
        with self.db.read() as s:
            return repo.to_operation(repo.operation_row(s, name))

    def list_operations(self, parent: str, size: int, token: str) -> Page[Operation]:
        model = str(names.parse_model(parent, "parent"))
        return self._list(
            model,
            OperationRow,
            [OperationRow.model == model],
            f"operations:{model}",
            size,
            token,
            repo.to_operation,
        )


def _replay_operation(s: Session, name: str) -> Operation:
    return repo.to_operation(repo.operation_row(s, name))
