"""Rows -> domain resources, and the read queries."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlmodel import Session, SQLModel, col, select

from controlplane.domain import scaling, traffic
from controlplane.domain.decisions import compose_message
from controlplane.domain.errors import invalid_field, not_found
from controlplane.domain.states import (
    BuildState,
    DeploymentState,
    EventType,
    ModelState,
    OperationKind,
    ReplicaState,
    ResourceKind,
)
from controlplane.domain.types import (
    Build,
    Deployment,
    Event,
    Model,
    Operation,
    OperationError,
    Page,
    Replica,
    Resources,
)
from controlplane.storage import codec, secretbox
from controlplane.storage.secretbox import SecretBox, SecretKeyError
from controlplane.storage.tables import (
    BuildRow,
    DeploymentRow,
    EventRow,
    ModelRow,
    OperationRow,
    SourceRow,
)

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

R = TypeVar("R", bound=SQLModel)


# A model is active while it is deploying, serving or stopping: it shows its scale.
ACTIVE_MODELS = (ModelState.DEPLOYING.value, ModelState.DEPLOYED.value, ModelState.STOPPING.value)


def endpoint_for(http_base: str, model_name: str) -> str:
    _, project, _, model = model_name.split("/")
    return f"{http_base}/{project}/{model}"


class ModelColumns(Protocol):
    """A model's columns: an ORM row, or a Core row of the models table."""

    name: str
    display_name: str
    description: str
    state: str
    active_deployment: str
    message: str
    running_operation: str
    health: str
    traffic: str
    scale: str
    revision: int
    create_time: datetime
    update_time: datetime


def to_model(row: ModelColumns, http_base: str) -> Model:
    return Model(
        name=row.name,
        display_name=row.display_name,
        description=row.description,
        state=ModelState(row.state),
        active_deployment=row.active_deployment,
        endpoint=endpoint_for(http_base, row.name),
        create_time=codec.utc(row.create_time),
        update_time=codec.utc(row.update_time),
        etag=f'"{row.revision}"',
        message=row.message,
        running_operation=row.running_operation,
        health=row.health,
        traffic=traffic.split_from_json(row.traffic),
        scale=scaling.scale_from_json(row.scale) if row.state in ACTIVE_MODELS else None,
    )


def to_build(row: BuildRow) -> Build:
    return Build(
        name=row.name,
        version=row.version,
        source_sha256=row.source_sha256,
        file_path=row.file_path,
        function_name=row.function_name,
        comment=row.comment,
        state=BuildState(row.state),
        image=row.image,
        error=row.error,
        create_time=codec.utc(row.create_time),
        finish_time=codec.utc(row.finish_time) if row.finish_time else None,
        runtime=row.runtime,
        packages=codec.packages_from_json(row.packages),
        cache_hit=row.cache_hit,
        size_bytes=row.size_bytes,
    )


def resources_of(row: DeploymentRow) -> Resources:
    return Resources(
        replicas=row.replicas,
        cpus=row.cpus,
        memory_mib=row.memory_mib,
        gpus=row.gpus,
        autoscaling=scaling.autoscaling_from_json(row.autoscaling),
    )


def environment_of(row: DeploymentRow) -> dict[str, str]:
    env: dict[str, str] = json.loads(row.environment)
    return env


def replicas_of(row: DeploymentRow) -> tuple[Replica, ...]:
    return tuple(codec.replica_from_dict(r) for r in json.loads(row.observed_replicas))


def to_deployment(row: DeploymentRow) -> Deployment:
    return Deployment(
        name=row.name,
        build=row.build,
        resources=resources_of(row),
        environment=environment_of(row),
        state=DeploymentState(row.state),
        replicas=replicas_of(row),
        message=compose_message(row.message, row.serve_health),
        create_time=codec.utc(row.create_time),
        update_time=codec.utc(row.update_time),
        secret_environment_keys=tuple(sorted(secrets_of(row))),
        creator=row.creator,
    )


def secrets_of(row: DeploymentRow) -> dict[str, str]:
    """Each secret's name and its stored (sealed) value: ``secretbox`` opens them, for the
    replicas alone (desired.py); never in a resource."""
    secrets: dict[str, str] = json.loads(row.secret_environment)
    return secrets


def secret_ids(row: DeploymentRow) -> dict[str, str]:
    """Each secret's name and value id: equal ids, equal values (plans compare them)."""
    return {name: secretbox.value_id(v) or v for name, v in secrets_of(row).items()}


def secrets_version(row: DeploymentRow) -> str:
    """Changes when a secret value does (never because the key did)."""
    return secretbox.version_of(secrets_of(row))


def reseal_secrets(s: Session, box: SecretBox) -> int:
    """Every stored secret value sealed under the box's current key (values from before
    encryption sealed at all): how many changed."""
    changed = 0
    rows = s.exec(select(DeploymentRow).where(col(DeploymentRow.secret_environment) != "{}"))
    for dep in rows.all():
        stored = secrets_of(dep)
        try:
            resealed = secretbox.reseal_map(box, stored)
        except SecretKeyError as e:  # another key's: every server of a database needs it
            log.error("deployment %s: %s", dep.name, e)
            continue
        if resealed != stored:
            changed += sum(resealed[k] != stored[k] for k in stored)
            dep.secret_environment = json.dumps(resealed, sort_keys=True)
            s.add(dep)
    return changed


def to_operation(row: OperationRow) -> Operation:
    error = None
    if row.error_code:
        error = OperationError(
            code=row.error_code, message=row.error_message, reason=row.error_reason
        )
    return Operation(
        name=row.name,
        kind=OperationKind(row.kind),
        target=row.target,
        done=row.done,
        error=error,
        create_time=codec.utc(row.create_time),
        update_time=codec.utc(row.update_time),
        model=row.model,
        progress=row.progress,
        deployment=row.deployment,
        rollout=traffic.record_from_json(row.rollout),
    )


def to_event(row: EventRow) -> Event:
    kind = ResourceKind(row.kind)
    return Event(
        revision=row.revision,
        time=codec.utc(row.time),
        type=EventType(row.type),
        resource=codec.loads(kind, row.body),
        model=row.model,
    )


# ---- lookups -------------------------------------------------------------------------------


def _one(s: Session, table: type[R], name: str) -> R | None:
    return s.exec(select(table).where(col(table.name) == name)).first()  # type: ignore[attr-defined]


def model(s: Session, name: str, http_base: str) -> Model:
    """One model, read with a Core select: no ORM instance to build (GetModel's path)."""
    table = ModelRow.__table__  # type: ignore[attr-defined]
    row = s.connection().execute(select(table).where(table.c.name == name)).first()
    if row is None:
        raise not_found("model", name)
    return to_model(cast(ModelColumns, row), http_base)


def model_row(s: Session, name: str) -> ModelRow:
    row = _one(s, ModelRow, name)
    if row is None:
        raise not_found("model", name)
    return row


def build_row(s: Session, name: str) -> BuildRow:
    row = _one(s, BuildRow, name)
    if row is None:
        raise not_found("build", name)
    return row


def deployment_row(s: Session, name: str) -> DeploymentRow:
    row = _one(s, DeploymentRow, name)
    if row is None:
        raise not_found("deployment", name)
    return row


def maybe_model_row(s: Session, name: str) -> ModelRow | None:
    return _one(s, ModelRow, name) if name else None


def maybe_deployment_row(s: Session, name: str) -> DeploymentRow | None:
    return _one(s, DeploymentRow, name) if name else None


def maybe_operation_row(s: Session, name: str) -> OperationRow | None:
    return _one(s, OperationRow, name) if name else None


def operation_row(s: Session, name: str) -> OperationRow:
    row = _one(s, OperationRow, name)
    if row is None:
        raise not_found("operation", name)
    return row


def source_row(s: Session, model: str, sha256: str) -> SourceRow | None:
    return s.exec(
        select(SourceRow).where(SourceRow.model == model, SourceRow.sha256 == sha256)
    ).first()


# ---- pagination (keyset on id; tokens are opaque) --------------------------------------------


def _encode_token(scope: str, last_id: int) -> str:
    raw = json.dumps({"s": scope, "i": last_id}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, scope: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data: dict[str, Any] = json.loads(raw)
        if data["s"] != scope or not isinstance(data["i"], int):
            raise ValueError
        return data["i"]
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        raise invalid_field(
            "page_token",
            "not a token this list returned (or for another list)",
            reason="INVALID_PAGE_TOKEN",
        ) from None


def page_size(requested: int) -> int:
    if requested < 0:
        raise invalid_field("page_size", f"must be >= 0, got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def page(
    s: Session,
    table: type[R],
    where: Sequence[Any],
    scope: str,
    size: int,
    token: str,
    newest_first: bool = False,
) -> tuple[list[R], str]:
    """Rows as plain tuples read by column name (a Core select: no ORM objects to build
    and track for a page only read; every converter reads attributes alone)."""
    ident = col(table.id)  # type: ignore[attr-defined]
    query = sa_select(table.__table__).where(*where)  # type: ignore[attr-defined]
    if token:
        last = _decode_token(token, scope)
        query = query.where(ident < last if newest_first else ident > last)
    query = query.order_by(ident.desc() if newest_first else ident).limit(size + 1)
    rows = cast(list[R], list(s.execute(query).all()))
    more = len(rows) > size
    rows = rows[:size]
    next_token = _encode_token(scope, rows[-1].id) if more and rows else ""  # type: ignore[attr-defined]
    return rows, next_token


T = TypeVar("T")


def list_page(
    s: Session,
    table: type[R],
    where: Sequence[Any],
    scope: str,
    size: int,
    token: str,
    convert: Callable[[R], T],
    newest_first: bool = False,
) -> Page[T]:
    """One page of a List call: ``size`` as the request gave it (0: the default; checked
    and capped here), ``token`` as the request gave it (checked against ``scope``), each
    row converted to what the call returns."""
    rows, next_token = page(
        s, table, where, scope, page_size(size), token, newest_first=newest_first
    )
    return Page([convert(r) for r in rows], next_token)


# ---- events ---------------------------------------------------------------------------------


def events_after(
    s: Session, model: str | None, revision: int, limit: int = 500, project: str | None = None
) -> list[EventRow]:
    """Events after ``revision`` in order: all, one model's, or one project's."""
    query = select(EventRow).where(EventRow.revision > revision)
    if model is not None:
        query = query.where(EventRow.model == model)
    if project is not None:
        query = query.where(EventRow.project == project)
    return list(s.exec(query.order_by(col(EventRow.revision)).limit(limit)).all())


# ---- figures for metrics --------------------------------------------------------------------


def models_by_state(s: Session) -> dict[ModelState, int]:
    """How many models are in each state (every state present, zeros included)."""
    counts = {state: 0 for state in ModelState}
    query = select(ModelRow.state, func.count()).group_by(ModelRow.state)
    for state, n in s.exec(query).all():
        counts[ModelState(state)] = int(n)
    return counts


SERVING_STATES = (ModelState.DEPLOYING.value, ModelState.DEPLOYED.value)
# A deployment in one of these states should have its replicas running (or starting).
SERVING_DEPLOYMENTS = (DeploymentState.DEPLOYING.value, DeploymentState.DEPLOYED.value)


def serving_replica_ids(s: Session, model: str | None = None) -> dict[str, frozenset[str]]:
    """Each model (or ``model`` alone): the ids of the replicas Serve lists for its serving
    deployments. A deployment whose replicas cannot be read counts none (logged)."""
    query = select(DeploymentRow).where(col(DeploymentRow.state).in_(SERVING_DEPLOYMENTS))
    if model is not None:
        query = query.where(col(DeploymentRow.model) == model)
    out: dict[str, set[str]] = {}
    for dep in s.exec(query).all():
        try:
            ids = {r.id for r in replicas_of(dep)}
        except (ValueError, KeyError, TypeError):  # one unreadable row: counted as none
            log.warning("deployment %s: its replicas cannot be read; counted as none", dep.name)
            continue
        out.setdefault(dep.model, set()).update(ids)
    return {m: frozenset(ids) for m, ids in out.items()}


def secret_values(
    s: Session, box: SecretBox, model: str | None = None
) -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    """Each model (or ``model`` alone): every non-empty secret value of its deployments, for
    redaction; and the models with a secret environment that cannot be read (logged)."""
    query = select(DeploymentRow).where(col(DeploymentRow.secret_environment) != "{}")
    if model is not None:
        query = query.where(col(DeploymentRow.model) == model)
    values: dict[str, set[str]] = {}
    unreadable: set[str] = set()
    for dep in s.exec(query).all():
        try:
            found = {v for v in box.open_all(secrets_of(dep)).values() if v}
        except (ValueError, AttributeError, SecretKeyError) as e:
            log.error("deployment %s: its secret environment cannot be read (%s)", dep.name, e)
            unreadable.add(dep.model)
            continue
        values.setdefault(dep.model, set()).update(found)
    return {m: frozenset(v) for m, v in values.items()}, frozenset(unreadable)


def replicas_by_model(s: Session) -> dict[str, tuple[int, int]]:
    """Each model with an active deployment: (replicas wanted, replicas RUNNING). Only a
    DEPLOYING or DEPLOYED model wants replicas: a stopped one wants none."""
    query = select(ModelRow.name, ModelRow.state, DeploymentRow).join(
        DeploymentRow, col(DeploymentRow.name) == col(ModelRow.active_deployment)
    )
    out: dict[str, tuple[int, int]] = {}
    for name, state, dep in s.exec(query).all():
        try:
            running = sum(1 for r in replicas_of(dep) if r.state is ReplicaState.RUNNING)
        except (ValueError, KeyError, TypeError):  # one unreadable row: counted as none
            log.warning("deployment %s: its replicas cannot be read; counted as 0", dep.name)
            running = 0
        out[name] = (dep.replicas if state in SERVING_STATES else 0, running)
    return out
