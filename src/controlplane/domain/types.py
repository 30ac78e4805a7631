"""Plain resource types used everywhere inside (protobuf stays at the edge)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from controlplane.domain.errors import FieldViolation, InvalidArgument
from controlplane.domain.plan import Plan
from controlplane.domain.scaling import Autoscaling, Scale
from controlplane.domain.states import (
    BuildState,
    DeploymentState,
    EventType,
    ModelState,
    OperationKind,
    ReplicaState,
)
from controlplane.domain.traffic import RolloutRecord, Split

# Upper bounds that catch typos ("replicas: 10000") before they reach the cluster.
MAX_REPLICAS = 100
MAX_CPUS = 512.0
MAX_MEMORY_MIB = 4 * 1024 * 1024  # 4 TiB
MAX_GPUS = 64.0
MAX_ENV_VARS = 200
MAX_ENV_VALUE = 32 * 1024
MAX_ENV_NAME = 256


@dataclass(frozen=True)
class Resources:
    replicas: int = 1
    cpus: float = 0.0
    memory_mib: int = 0
    gpus: float = 0.0
    # Set: Serve's autoscaler keeps the count between its bounds; ``replicas`` is then
    # the count to start with (0: ``Autoscaling.initial``).
    autoscaling: Autoscaling | None = None

    @property
    def initial_replicas(self) -> int:
        a = self.autoscaling
        return self.replicas if a is None else a.initial(self.replicas)

    def violations(self, prefix: str) -> list[FieldViolation]:
        out: list[FieldViolation] = []

        def bad(name: str, msg: str) -> None:
            out.append(FieldViolation(f"{prefix}.{name}", msg))

        a = self.autoscaling
        if a is not None:
            out.extend(a.violations(f"{prefix}.autoscaling", MAX_REPLICAS))
            if self.replicas and not a.min_replicas <= self.replicas <= a.max_replicas:
                bad(
                    "replicas",
                    f"with autoscaling, 0 or within {a.min_replicas}..{a.max_replicas} "
                    f"(the count to start with), got {self.replicas}",
                )
        elif not 1 <= self.replicas <= MAX_REPLICAS:
            bad("replicas", f"must be between 1 and {MAX_REPLICAS}, got {self.replicas}")
        for name, value, top in (("cpus", self.cpus, MAX_CPUS), ("gpus", self.gpus, MAX_GPUS)):
            if math.isnan(value) or not 0 <= value <= top:
                bad(name, f"must be between 0 and {top:g}, got {value}")
        if not 0 <= self.memory_mib <= MAX_MEMORY_MIB:
            bad("memory_mib", f"must be between 0 and {MAX_MEMORY_MIB}, got {self.memory_mib}")
        return out

    def validate(self, prefix: str = "resources") -> Resources:
        found = self.violations(prefix)
        if found:
            raise InvalidArgument(
                message="; ".join(f"{v.field}: {v.description}" for v in found),
                reason="INVALID_RESOURCES",
                metadata={"field": found[0].field},
                violations=tuple(found),
            )
        return self


def validate_environment(env: Mapping[str, str], prefix: str = "environment") -> dict[str, str]:
    found: list[FieldViolation] = []
    if len(env) > MAX_ENV_VARS:
        found.append(FieldViolation(prefix, f"at most {MAX_ENV_VARS} variables"))
    for key, value in env.items():
        if len(key) > MAX_ENV_NAME:
            found.append(FieldViolation(prefix, f"a name over {MAX_ENV_NAME} characters"))
        elif (
            not key
            or not (key[0].isalpha() or key[0] == "_")
            or not all(c.isalnum() or c == "_" for c in key)
            or not key.isascii()
        ):
            found.append(FieldViolation(f"{prefix}[{key!r}]", "names are letters, digits and _"))
        elif key.startswith("CP_") or key.startswith("RAY_"):
            found.append(FieldViolation(f"{prefix}[{key!r}]", "CP_ and RAY_ names are reserved"))
        if len(value) > MAX_ENV_VALUE:
            found.append(FieldViolation(f"{prefix}[{key!r}]", f"value over {MAX_ENV_VALUE} bytes"))
    if found:
        raise InvalidArgument(
            message="; ".join(f"{v.field}: {v.description}" for v in found),
            reason="INVALID_ENVIRONMENT",
            metadata={"field": found[0].field},
            violations=tuple(found),
        )
    return dict(env)


@dataclass(frozen=True)
class Model:
    name: str
    display_name: str
    description: str
    state: ModelState
    active_deployment: str
    endpoint: str
    create_time: datetime
    update_time: datetime
    etag: str
    message: str = ""
    running_operation: str = ""
    health: str = ""  # what its signals say (domain/health.py); "" while it does not serve
    traffic: Split | None = None  # while two deployments are live
    scale: Scale | None = None  # while it is active: replicas wanted, running, last decision


@dataclass(frozen=True)
class Package:
    """A dependency installed into a build, as pip resolved it at build time."""

    name: str
    version: str
    sha256: str = ""
    requested: bool = False


@dataclass(frozen=True)
class Build:
    name: str
    version: int
    source_sha256: str
    file_path: str
    function_name: str
    comment: str
    state: BuildState
    image: str
    error: str
    create_time: datetime
    finish_time: datetime | None
    runtime: str = ""  # "cpython 3.11.7 linux-x86_64" once BUILT
    packages: tuple[Package, ...] = ()
    cache_hit: bool = False
    size_bytes: int = 0


@dataclass(frozen=True)
class Replica:
    id: str
    state: ReplicaState
    pid: int
    node: str
    start_time: datetime | None


@dataclass(frozen=True)
class Deployment:
    name: str
    build: str
    resources: Resources
    environment: Mapping[str, str]
    state: DeploymentState
    replicas: tuple[Replica, ...]
    message: str
    create_time: datetime
    update_time: datetime
    # Names only: the values of a deployment's secret environment are never returned.
    secret_environment_keys: tuple[str, ...] = ()
    creator: str = ""  # the token that asked for it


@dataclass(frozen=True)
class OperationError:
    """A failed operation's google.rpc.Status, as plain data."""

    code: str  # grpc.StatusCode name, e.g. "FAILED_PRECONDITION"
    message: str
    reason: str = ""


@dataclass(frozen=True)
class Operation:
    name: str
    kind: OperationKind
    target: str
    done: bool
    error: OperationError | None
    create_time: datetime
    update_time: datetime
    model: str
    progress: str = ""
    deployment: str = ""
    rollout: RolloutRecord | None = None  # a canary's or shadow's step and figures
    plan: Plan | None = None  # only in a validate_only answer (never recorded)


@dataclass(frozen=True)
class Source:
    sha256: str
    size_bytes: int


Resource = Model | Build | Deployment | Operation

T = TypeVar("T")


@dataclass(frozen=True)
class Event:
    revision: int
    time: datetime
    type: EventType
    resource: Resource | None = None
    model: str = ""


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str = ""


@dataclass(frozen=True)
class DeployOptions:
    resources: Resources
    environment: Mapping[str, str] = field(default_factory=dict)
    # For the replicas only; empty: the active deployment's secrets are kept.
    secret_environment: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LogLine:
    """One line a model's replica wrote, or its access line for one request."""

    id: int  # increases with each line of the model
    model: str
    replica: str
    seq: int  # the replica's own line number
    build: str
    node: str
    time: datetime
    stream: str  # stdout, stderr, log, access
    request_id: str
    text: str
