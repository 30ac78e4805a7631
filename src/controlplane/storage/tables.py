"""SQLModel tables. Times are stored in UTC; JSON columns hold plain data."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, DateTime, Integer, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def _time(nullable: bool = False, index: bool = False) -> datetime:
    return Field(  # type: ignore[no-any-return]
        default=None if nullable else ...,
        sa_column=Column(DateTime(timezone=True), nullable=nullable, index=index),
    )


def _text(default: str = "") -> str:
    return Field(default=default, sa_column=Column(Text, nullable=False, default=default))  # type: ignore[no-any-return]


class ModelRow(SQLModel, table=True):
    __tablename__ = "models"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, max_length=200)
    project: str = Field(index=True, max_length=63)
    display_name: str = Field(default="", max_length=200)
    description: str = _text()
    state: str = Field(max_length=20)
    active_deployment: str = Field(default="", max_length=250)
    message: str = _text()
    running_operation: str = Field(default="", max_length=80)
    health: str = _text()  # for people: what the model's signals say (domain/health.py)
    traffic: str = _text()  # JSON of domain.traffic.Split while two deployments are live
    scale: str = _text()  # JSON of domain.scaling.Scale: replicas wanted, running, last decision
    next_build_version: int = 1
    next_deployment_number: int = 1
    revision: int = Field(default=0, sa_type=BigInteger)
    create_time: datetime = _time()
    update_time: datetime = _time()


class SourceRow(SQLModel, table=True):
    __tablename__ = "sources"
    __table_args__ = (UniqueConstraint("model", "sha256"),)

    id: int | None = Field(default=None, primary_key=True)
    model: str = Field(index=True, max_length=200)
    sha256: str = Field(max_length=64)
    size_bytes: int = Field(sa_type=BigInteger)
    create_time: datetime = _time()


class BuildRow(SQLModel, table=True):
    __tablename__ = "builds"
    __table_args__ = (UniqueConstraint("model", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, max_length=250)
    model: str = Field(index=True, max_length=200)
    version: int = Field(sa_type=BigInteger)
    source_sha256: str = Field(max_length=64)
    file_path: str = Field(max_length=1024)
    function_name: str = Field(max_length=200)
    comment: str = _text()
    state: str = Field(max_length=20)
    image: str = Field(default="", max_length=200)
    artifact_path: str = _text()
    error: str = _text()
    log_path: str = _text()
    revision: int = Field(default=0, sa_type=BigInteger)
    create_time: datetime = _time()
    finish_time: datetime | None = _time(nullable=True)
    runtime: str = Field(default="", max_length=100)
    packages: str = _text("[]")  # JSON: [{name, version, sha256, requested}]
    cache_hit: bool = False
    size_bytes: int = Field(default=0, sa_type=BigInteger)
    no_cache: bool = False  # asked to build even when the cache has these inputs


class DeploymentRow(SQLModel, table=True):
    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("model", "number"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, max_length=250)
    model: str = Field(index=True, max_length=200)
    number: int = Field(sa_type=BigInteger)
    build: str = Field(max_length=250)
    replicas: int
    cpus: float
    memory_mib: int = Field(sa_type=BigInteger)
    gpus: float
    autoscaling: str = _text()  # JSON of domain.scaling.Autoscaling; "": a fixed count
    environment: str = _text("{}")  # JSON object
    # JSON object given to the replicas only: no API returns it, no log shows it.
    secret_environment: str = _text("{}")
    state: str = Field(max_length=20)
    observed_replicas: str = _text("[]")  # JSON list of replicas as Serve reports them
    ran_replica_ids: str = _text("[]")  # JSON list: those of them seen RUNNING
    # JSON list of replicas that stopped unexpectedly; Serve has not listed their
    # replacement yet.
    awaiting_replacement: str = _text("[]")
    message: str = _text()  # for people: what happened last
    serve_health: str = _text()  # for people: Serve's report while the app is unhealthy
    # Bumped by RestartModel: replaces every replica.
    restart_generation: int = 0
    creator: str = Field(default="", max_length=250)  # the token that asked for it
    # Set when the job applies the deployment: the rollout is judged from then on.
    applied: bool = False
    apply_time: datetime | None = _time(nullable=True)
    # True when the rollout must replace every replica (new build/resources/env, restart).
    expect_roll: bool = False
    previous_replica_ids: str = _text("[]")  # JSON list
    revision: int = Field(default=0, sa_type=BigInteger)
    create_time: datetime = _time()
    update_time: datetime = _time()


class OperationRow(SQLModel, table=True):
    __tablename__ = "operations"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, max_length=80)
    model: str = Field(index=True, max_length=200)
    kind: str = Field(max_length=40)
    target: str = Field(max_length=250)
    deployment: str = Field(default="", max_length=250)
    done: bool = False
    error_code: str = Field(default="", max_length=40)
    error_message: str = _text()
    error_reason: str = Field(default="", max_length=80)
    progress: str = _text()
    # CancelOperation asked; the server running the job stops it (it may be another one).
    cancel_requested: bool = False
    rollout: str = _text()  # JSON of domain.traffic.RolloutRecord: a judged rollout's step
    revision: int = Field(default=0, sa_type=BigInteger)
    create_time: datetime = _time()
    update_time: datetime = _time()


class EventRow(SQLModel, table=True):
    """The change log: one row per change, revision assigned in commit order."""

    __tablename__ = "events"

    revision: int = Field(
        sa_type=BigInteger, primary_key=True, sa_column_kwargs={"autoincrement": False}
    )
    model: str = Field(index=True, max_length=200)
    project: str = Field(index=True, max_length=63)
    time: datetime = _time(index=True)
    type: str = Field(max_length=20)
    kind: str = Field(max_length=20)
    body: str = _text("{}")  # the resource as it was after the change (JSON)


class JobRow(SQLModel, table=True):
    """Work for the dispatcher, written in the same transaction as the change that needs it."""

    __tablename__ = "jobs"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=20)
    model: str = Field(index=True, max_length=200)
    operation: str = Field(default="", max_length=80)
    target: str = Field(default="", max_length=250)
    state: str = Field(default="pending", index=True, max_length=20)  # pending|running|done
    attempts: int = 0
    claimed_by: str = Field(default="", max_length=100)
    lease_until: datetime | None = _time(nullable=True)
    # A pending job is not claimed before this (an apply retried after a pause).
    not_before: datetime | None = _time(nullable=True)
    error: str = _text()
    # The W3C traceparent of the RPC or job that made it: its run continues that trace.
    trace_parent: str = Field(default="", max_length=64)
    create_time: datetime = _time()
    update_time: datetime = _time()


class CounterRow(SQLModel, table=True):
    """Named counters; 'revision' orders every write (its row lock serializes writers)."""

    __tablename__ = "counters"

    name: str = Field(primary_key=True, max_length=40)
    value: int = Field(default=0, sa_type=BigInteger)


class RequestRow(SQLModel, table=True):
    """request_id -> the first call's result, so a retried mutation does the work once."""

    __tablename__ = "requests"

    key: str = Field(primary_key=True, max_length=400)
    result: str = Field(max_length=250)
    fingerprint: str = Field(max_length=64)
    create_time: datetime = _time()


class TokenRow(SQLModel, table=True):
    """An access token: only the SHA-256 of its secret is kept."""

    __tablename__ = "tokens"

    id: int | None = Field(default=None, primary_key=True)
    token_id: str = Field(unique=True, index=True, max_length=32)
    project: str = Field(index=True, max_length=63)  # "-": every project
    role: int
    secret_hash: str = Field(max_length=64)
    description: str = _text()
    creator: str = Field(default="", max_length=120)
    revoked: bool = False
    create_time: datetime = _time()
    expire_time: datetime | None = _time(nullable=True)


class AuditRow(SQLModel, table=True):
    """One mutation: who, what, when, from where, and how it ended."""

    __tablename__ = "audit_records"

    id: int | None = Field(default=None, primary_key=True)
    time: datetime = _time(index=True)
    principal: str = Field(max_length=120)
    project: str = Field(index=True, max_length=63)
    method: str = Field(max_length=120)
    resource: str = Field(default="", max_length=250)
    code: str = Field(max_length=40)
    peer: str = Field(default="", max_length=120)
    operation: str = Field(default="", max_length=80)


class InvocationKeyRow(SQLModel, table=True):
    """A key that calls one model's endpoint: only the SHA-256 of its secret is kept."""

    __tablename__ = "invocation_keys"

    id: int | None = Field(default=None, primary_key=True)
    key_id: str = Field(unique=True, index=True, max_length=32)
    model: str = Field(index=True, max_length=200)
    secret_hash: str = Field(max_length=64)
    description: str = _text()
    creator: str = Field(default="", max_length=120)
    revoked: bool = False
    create_time: datetime = _time()


class ModelLogLineRow(SQLModel, table=True):
    """One line of a replica's output, or its access line for one request. The newest
    ``model_log_bytes`` of each model are kept (storage/model_logs.py)."""

    __tablename__ = "model_log_lines"
    __table_args__ = (UniqueConstraint("model", "replica", "seq"),)

    # 64-bit on PostgreSQL (a busy model writes many lines); SQLite's rowid is already.
    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    )
    model: str = Field(index=True, max_length=200)
    replica: str = Field(max_length=100)
    seq: int = Field(sa_type=BigInteger)  # the replica's own line number
    build: str = Field(max_length=250)
    node: str = Field(default="", max_length=100)
    time: datetime = _time()
    stream: str = Field(max_length=10)
    request_id: str = Field(default="", max_length=100)
    text: str = _text()


class BlobRow(SQLModel, table=True):
    """A file every server may need, kept in the database when the servers share no disk
    (``--artifact-store database``): an upload, an artifact's archive, a build's log. Its
    bytes are in ``blob_chunks``; this row is added in the same transaction as the last
    of them, so a blob that has a row is whole (storage/blobs.py)."""

    __tablename__ = "blobs"

    key: str = Field(primary_key=True, max_length=300)  # e.g. artifact/<digest>
    sha256: str = Field(max_length=64)
    size_bytes: int = Field(sa_type=BigInteger)
    chunks: int
    create_time: datetime = _time()


class BlobChunkRow(SQLModel, table=True):
    __tablename__ = "blob_chunks"

    key: str = Field(primary_key=True, max_length=300)
    seq: int = Field(primary_key=True)
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
