"""Settings, from flags (cli.py) or code (tests). Injected, never global."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from controlplane.domain.health import HealthRules

MiB = 1024 * 1024
# --artifact-store: each server's disk, or the database for servers that share no disk.
DISK = "disk"
DATABASE = "database"
STORES = (DISK, DATABASE)
# `modelctl serve`'s data dir unless --data-dir says otherwise (relative: to the working dir).
DEFAULT_DATA_DIR = Path(".modelctl")
ADMIN_TOKEN_FILE = "admin.token"  # in the data dir: the first admin token (mode 0600)


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    database_url: str = ""  # empty: SQLite in data_dir
    ray_address: str | None = None  # None: start a local Ray
    num_cpus: float = 4
    num_gpus: float = 0
    backend: str = "ray"  # "ray" or "fake" (development and fast tests)
    max_source_bytes: int = 256 * MiB
    max_source_entries: int = 10_000
    max_unpacked_bytes: int = 1024 * MiB
    build_cpus: float = 0.25
    build_timeout_s: float = 900.0
    build_max_bytes: int = 4096 * MiB  # an artifact: code and installed requirements
    # Artifacts no deployment and none of a model's last builds use are removed this
    # often (0: never), once unused for gc_min_age_s (a build may be about to use one).
    gc_interval_s: float = 3600.0
    gc_keep_builds: int = 5
    gc_min_age_s: float = 3600.0
    deploy_timeout_s: float = 300.0  # start-up: replicas placed but never all healthy
    placement_timeout_s: float = 120.0  # replicas asking for more than the cluster has
    reconcile_interval_s: float = 0.5
    # A model's scale status (replicas wanted, running, last decision) is written at most
    # this often while replicas come and go: watchers see the settled count.
    scale_coalesce_s: float = 2.0
    reconcile_busy_interval_s: float = 0.1  # while a model is deploying, stopping, restarting
    dispatcher_concurrency: int = 8
    # A running job's lease, renewed every third of it; another server takes the job
    # over when its server stops renewing (it died).
    job_lease_s: float = 15.0
    wait_operation_max_s: float = 60.0
    watch_queue_size: int = 1000
    watch_bookmark_s: float = 30.0  # an idle watcher gets a BOOKMARK this often
    event_retention_count: int = 1000
    event_retention_s: float = 3600.0
    grace_s: float = 10.0
    server_id: str = field(default="")
    # Prometheus metrics at http://metrics_host:metrics_port/metrics (None: off; 0: any port).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Builds served to Ray nodes that do not share the data dir's disk, at
    # http://artifact_host:artifact_port/artifacts/ (None: off; 0: any free port), and
    # the address nodes reach it at ("": http://artifact_host:artifact_port).
    artifact_port: int | None = None
    artifact_host: str = "127.0.0.1"
    artifact_url: str = ""
    # Where builds, uploads and build logs are kept for the other servers: "disk" (each
    # server's data dir: one server, or several on one shared volume) or "database"
    # (several servers that share no disk; controlplane/files.py).
    artifact_store: str = DISK
    # OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces ("": no tracing).
    otlp_endpoint: str = ""
    # Every RPC but health wants a token (docs/security.md); True: none does (demos only).
    insecure_no_auth: bool = False
    # gRPC over TLS with this certificate and key (PEM); with a client CA, mutual TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # What replicas report (controlplane/signals.py): read this often (0: never), health
    # judged this often with these rules (docs/metrics.md), the newest log bytes kept.
    # Requests Serve queues per model while every replica is busy; more get HTTP 503 and
    # count as refused. -1: no limit (they wait).
    max_queued_requests: int = -1
    signals_interval_s: float = 1.0
    rollout_interval_s: float = 1.0  # how often canary and shadow steps are judged
    health_interval_s: float = 10.0
    health_rules: HealthRules = field(default_factory=HealthRules)
    model_log_bytes: int = 10 * MiB

    @property
    def db_url(self) -> str:
        from controlplane.storage.db import Database  # the CLI's client commands need none

        return self.database_url or Database.sqlite_url(self.data_dir)

    @property
    def sources_dir(self) -> Path:
        return self.data_dir / "sources"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"


def default(name: str) -> Any:
    """The default of a ``Settings`` field: the CLI's flags take theirs from here, so that
    each default is written once."""
    value = next(f.default for f in fields(Settings) if f.name == name)
    if value is MISSING:
        raise KeyError(f"Settings.{name} has no default")
    return value
