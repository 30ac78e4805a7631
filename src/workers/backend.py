"""What the control plane needs from a compute backend, and nothing more.

Two implementations: ``ray_backend.RayBackend`` (the only module that imports
ray) and ``fake_backend.FakeBackend`` (in-process, for fast tests). The control
plane drives them declaratively: ``apply`` receives the *whole* desired set of
applications each time (as Ray Serve's declarative config does); anything not in
it is removed. ``observe`` reports what actually runs, from the backend's own
details, so that states come from observation and never from sleeps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from workers.runtime import Runtime
from workers.signals import Batch


@dataclass(frozen=True)
class BuildSpec:
    """One build: turn an uploaded zip into an immutable, content-addressed artifact."""

    build_name: str  # projects/p/models/m/builds/3
    source_zip: Path  # the uploaded zip (already validated at upload)
    file_path: str  # relative path of the module inside the zip
    function_name: str
    artifacts_dir: Path  # where content-addressed artifacts live (<dir>/<hex>/)
    log_path: Path  # the build log, appended to line by line while the build runs
    timeout_s: float = 600.0
    source_sha256: str = ""  # the zip's, known from its upload ("" : computed)
    max_size_bytes: int = 0  # of the artifact, code and dependencies; 0: no limit
    no_cache: bool = False  # build even when an artifact for the same inputs exists


@dataclass(frozen=True)
class ResolvedPackage:
    """One distribution pip installed into a build, as it resolved it."""

    name: str
    version: str
    sha256: str = ""  # of the file installed, when the index gave one
    requested: bool = False  # named in the model's requirements, not only a dependency


@dataclass(frozen=True)
class BuildOutcome:
    ok: bool
    image: str = ""  # content-addressed reference, e.g. "artifact://sha256:<hex>"
    artifact_path: str = ""  # absolute path of the artifact folder on the shared disk
    error: str = ""  # one line naming the cause; empty when ok
    runtime: str = ""  # runtime.Runtime.text() of the worker that built it
    packages: tuple[ResolvedPackage, ...] = ()
    cache_hit: bool = False  # the artifact existed for the same inputs: nothing was built
    size_bytes: int = 0
    disk_full: bool = False  # it failed because the artifacts' disk was full (ENOSPC)


@dataclass(frozen=True)
class EndpointAccess:
    """Who may call a model's endpoint: anyone (``open``), or a request whose
    ``Authorization: Bearer <key>`` hashes (SHA-256) to one of ``key_hashes``."""

    open: bool = True
    key_hashes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrafficShare:
    """What replicas of ``from_build`` do with ``percent`` of their requests: send them to
    ``to_app`` (the other live build's application) and return its answer, or, with
    ``shadow``, answer themselves and send a copy there, its answer discarded. With
    ``sticky_header``, requests with the same value of that header go the same way."""

    from_build: str
    to_app: str
    percent: int
    shadow: bool = False
    sticky_header: str = ""


@dataclass(frozen=True)
class AutoscalingSpec:
    """Serve's autoscaler keeps the replica count within the bounds, aiming at
    ``target_ongoing_requests`` in flight per replica."""

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float
    upscale_delay_s: float
    downscale_delay_s: float


@dataclass(frozen=True)
class AppSpec:
    """One model's Serve application as the control plane wants it."""

    app_name: str  # unique per model: app_name_for(project, model); candidate_app_for
    route_prefix: str | None  # "/{project}/{model}"; None: reached only from the model's app
    model_name: str  # projects/p/models/m
    deployment_name: str  # projects/p/models/m/deployments/4
    build_name: str
    artifact_path: str
    file_path: str
    function_name: str
    replicas: int  # with autoscaling: the count a new application starts with
    cpus: float
    memory_mib: int
    gpus: float
    environment: Mapping[str, str] = field(default_factory=dict)
    # Secret values: handed to the replicas by a path of their own (never in the
    # application's config, where Ray logs and Serve's API show it); compared by
    # ``secrets_version``, which changes when a value does.
    secrets: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    secrets_version: str = ""
    # Set: the count follows the load (changed in place, like ``replicas``).
    autoscaling: AutoscalingSpec | None = None
    # Bumped by RestartModel: a change here replaces every replica.
    restart_generation: int = 0
    # Updated on the running replicas, never a reason to replace them.
    access: EndpointAccess = field(default_factory=EndpointAccess)
    share: TrafficShare | None = None
    # The application its replicas' figures and lines are reported under ("": app_name):
    # a candidate's are its model's, told apart by build.
    signals_app: str = ""


class AppStatus(StrEnum):
    DEPLOYING = "DEPLOYING"
    RUNNING = "RUNNING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


class ReplicaStatus(StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    FAILED = "FAILED"


@dataclass(frozen=True)
class ReplicaObservation:
    id: str  # the backend's replica id; the same id the replica reports in responses
    state: ReplicaStatus
    pid: int
    node: str
    start_time: datetime | None


@dataclass(frozen=True)
class AppObservation:
    app_name: str
    status: AppStatus
    message: str  # the backend's own words when deploying failed or is unhealthy
    replicas: tuple[ReplicaObservation, ...]
    # Non-empty when replicas can never be placed (they ask for more than the cluster has).
    unplaceable: str = ""
    # The replicas Serve wants now (its autoscaler's decision); None: not reported.
    target_replicas: int | None = None
    # Nodes (as replicas name theirs) the cluster has lost: dead now, and not back.
    lost_nodes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class NodeResources:
    """One live node of the cluster: what it has, and what is not reserved now."""

    node: str  # its address (as replicas report theirs), or its id
    cpus_total: float
    cpus_free: float
    gpus_total: float
    gpus_free: float
    memory_total_mib: int
    memory_free_mib: int


class ClusterUnavailable(RuntimeError):
    """The cluster does not answer now (Ray stopped or restarting): the backend connects
    again by itself; what needs the cluster waits, or is refused with a retry hint."""


class Backend(Protocol):
    @property
    def http_base(self) -> str:
        """Base URL of the HTTP proxy, e.g. http://127.0.0.1:8000 (no trailing slash)."""
        ...

    async def start(self) -> None:
        """Connects to (or starts) the cluster and the HTTP proxy."""
        ...

    async def close(self) -> None: ...

    def available(self) -> bool:
        """False while the cluster is gone and the backend connects again."""
        ...

    def on_reconnected(self, callback: Callable[[], Awaitable[None]]) -> None:
        """``callback`` runs once the backend is connected again after an outage (a new
        cluster knows nothing: every model is to be applied again)."""
        ...

    async def build(self, spec: BuildSpec) -> BuildOutcome:
        """Runs the build on the cluster. Never raises for a failed build: ok=False."""
        ...

    async def runtime(self) -> Runtime:
        """The runtime the cluster's workers run (builds and replicas)."""
        ...

    async def until_built(self) -> int:
        """Waits, for a bounded time, until the cluster is building (importing) none of
        the model applications: an apply that hands one over again meanwhile would
        restart its build. Returns how many it waited for."""
        ...

    async def apply(self, apps: Sequence[AppSpec]) -> None:
        """Makes the running applications exactly ``apps`` (declarative, returns at once)."""
        ...

    async def observe(self) -> Mapping[str, AppObservation]:
        """What runs now, by app name. An app being deleted may still appear as DELETING."""
        ...

    async def nodes(self) -> Sequence[NodeResources]:
        """The cluster's live nodes and what each has free now."""
        ...

    async def signals(self, epoch: str, cursor: int) -> Batch:
        """What replicas reported after ``cursor`` (of collector ``epoch``; another epoch:
        from the start): every replica's latest figures, their new lines, and requests
        refused before a replica saw them (``workers.signals``)."""
        ...


def app_name_for(project: str, model: str) -> str:
    """Serve application name of a model; ids never contain '.', so this is unambiguous."""
    return f"{project}.{model}"


CANDIDATE_SUFFIX = ".candidate"


def candidate_app_for(project: str, model: str) -> str:
    """The application of a model's second live build (a canary, a shadow, a split)."""
    return app_name_for(project, model) + CANDIDATE_SUFFIX


def model_app(app_name: str) -> str:
    """The model's own application name, for either of its applications."""
    return app_name.removesuffix(CANDIDATE_SUFFIX)


def rolls(before: AppSpec, after: AppSpec) -> bool:
    """Whether going from ``before`` to ``after`` replaces every replica.

    Only ``replicas``, ``autoscaling``, the endpoint's keys and the traffic share change
    in place; any other change (build, resources, environment, restart generation)
    rolls. The deployment record's name is bookkeeping and never reaches the replicas.
    """
    same = {
        "replicas": 0,
        "autoscaling": None,
        "deployment_name": "",
        "access": EndpointAccess(),
        "share": None,
    }
    return replace(before, **same) != replace(after, **same)  # type: ignore[arg-type]
