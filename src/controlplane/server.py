"""The server: starts its parts in order, stops them in reverse, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace

import grpc
from grpc_health.v1 import health

from controlplane import logs, tracing
from controlplane.access import Access
from controlplane.api import transport, wiring
from controlplane.api.auth import AuthInterceptor
from controlplane.api.interceptor import TelemetryInterceptor
from controlplane.api.servicer import ModelLifecycleServicer
from controlplane.artifact_endpoint import ArtifactEndpoint, artifact_key
from controlplane.config import DATABASE, DISK, Settings
from controlplane.dispatcher import Dispatcher
from controlplane.exports import Exporter
from controlplane.files import Files
from controlplane.gc import Collector
from controlplane.metrics import Figures, Metrics, MetricsEndpoint
from controlplane.reconciler import Reconciler
from controlplane.rollouts import Rollouts
from controlplane.service import Service
from controlplane.signals import Signals
from controlplane.sources import SourceStore
from controlplane.storage import jobs, repo
from controlplane.storage.blobs import BlobStore
from controlplane.storage.db import Database, FinishedOperation
from controlplane.storage.secretbox import SecretBox
from controlplane.watch import EventHub
from workers.backend import Backend, ClusterUnavailable, NodeResources
from workers.runtime import Runtime

log = logging.getLogger(__name__)

MAX_MESSAGE = 8 * 1024 * 1024
NODES_TIMEOUT_S = 10.0  # a plan waits this long for the cluster to list its nodes


def make_backend(settings: Settings, artifacts: ArtifactEndpoint | None = None) -> Backend:
    """``artifacts``: where nodes that do not see the data dir fetch builds."""
    if settings.backend == "fake":
        from workers.fake_backend import FakeBackend

        return FakeBackend(
            num_gpus=settings.num_gpus,
            http_base=f"http://{settings.http_host}:{settings.http_port}",
            # Its simulated cluster outlives the server, as a real Ray cluster would.
            state_file=settings.data_dir / "fake-cluster.json",
        )
    from workers.driver import DriverBackend, free_port

    # Ray's driver in a process of its own, replaced when its cluster is gone.
    port = settings.http_port or free_port(settings.http_host)
    return DriverBackend(
        f"http://{settings.http_host}:{port}",
        address=settings.ray_address,
        http_host=settings.http_host,
        http_port=port,
        num_cpus=settings.num_cpus,
        num_gpus=settings.num_gpus,
        build_cpus=settings.build_cpus,
        max_queued_requests=settings.max_queued_requests,
        temp_dir=settings.data_dir / "ray",
        artifact_url=(settings.artifact_url or artifacts.url) if artifacts else "",
        artifact_key=artifact_key(settings.data_dir) if artifacts else b"",
        shared_disk=settings.artifact_store == DISK,
    )


class Server:
    def __init__(
        self, settings: Settings, backend: Backend | None = None, owns_backend: bool = True
    ) -> None:
        """``backend``: a started or unstarted backend to use; the server closes it at stop
        only when it ``owns_backend`` (tests share one Ray cluster across servers)."""
        if not settings.server_id:
            settings = replace(settings, server_id=f"cp-{uuid.uuid4().hex[:12]}")
        self.settings = settings
        self.db = Database(settings.db_url, secrets=SecretBox.for_data_dir(settings.data_dir))
        shared = BlobStore(self.db.engine) if settings.artifact_store == DATABASE else None
        self.files = Files(settings.artifacts_dir, settings.logs_dir, shared)
        self.artifacts: ArtifactEndpoint | None = None
        if settings.artifact_port is not None:  # bound now: the backend needs its URL
            self.artifacts = ArtifactEndpoint(
                self.files.archive,
                artifact_key(settings.data_dir),
                settings.artifact_host,
                settings.artifact_port,
            )
        self.backend = backend or make_backend(settings, self.artifacts)
        self.owns_backend = owns_backend or backend is None
        self.grpc_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.hub: EventHub | None = None
        self.service: Service | None = None
        self.dispatcher: Dispatcher | None = None
        self.reconciler: Reconciler | None = None
        self.collector: Collector | None = None
        self.signals: Signals | None = None
        self.rollouts: Rollouts | None = None
        self.metrics: Metrics | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._stop_tracing: Callable[[], None] | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self.settings.grpc_host}:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return self.backend.http_base.removeprefix("http://")

    @property
    def metrics_address(self) -> str:
        """host:port of /metrics ("" when metrics are off)."""
        return self._metrics_endpoint.address if self._metrics_endpoint else ""

    def _seal_secrets(self) -> None:
        """Secret values stored before encryption, or under a key that is no longer the
        first, sealed under the current one."""
        with self.db.write() as tx:
            changed = repo.reseal_secrets(tx.session, self.db.secrets)
        if changed:
            log.info("%d secret value(s) sealed under the current key", changed)

    async def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # private when made here
        for d in (s.sources_dir, s.artifacts_dir, s.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.artifacts is not None:  # before any apply: replicas may fetch at once
            self.artifacts.start()
        if s.otlp_endpoint:
            self._stop_tracing = tracing.configure(
                tracing.otlp_exporter(s.otlp_endpoint), server_id=s.server_id
            )
            log.info("tracing: spans go to %s", s.otlp_endpoint)
        if s.metrics_port is not None:
            self.metrics = Metrics()
        self.db.on_operation_finished(self._operation_finished)
        await asyncio.to_thread(self.db.migrate)
        await asyncio.to_thread(self._seal_secrets)
        await asyncio.to_thread(self.db.listen)
        await self.backend.start()
        http_base = self.backend.http_base
        sources = SourceStore(
            s.sources_dir,
            s.max_source_bytes,
            s.max_source_entries,
            s.max_unpacked_bytes,
            shared=self.files if self.files.shared else None,
        )
        loop = asyncio.get_running_loop()
        backend = self.backend

        def nodes() -> Sequence[NodeResources]:
            """The cluster's nodes, for a plan (asked from a worker thread)."""
            asked = asyncio.run_coroutine_threadsafe(backend.nodes(), loop)
            try:
                return asked.result(NODES_TIMEOUT_S)
            except BaseException:  # a cluster that does not answer: the plan says so
                asked.cancel()
                raise

        self.service = service = Service(
            self.db,
            sources,
            http_base,
            self.files,
            await self._cluster_runtime(),
            nodes=nodes,
            cluster_up=backend.available,
        )
        backend.on_reconnected(self._cluster_back)
        self.hub = EventHub(
            self.db,
            http_base,
            s.watch_queue_size,
            s.event_retention_count,
            s.event_retention_s,
            bookmark_s=s.watch_bookmark_s,
        )
        await self.hub.start()
        await asyncio.to_thread(self._enqueue_sync)
        self.dispatcher = Dispatcher(self.db, self.backend, s, http_base, sources, self.files)
        await self.dispatcher.start()
        self.signals = Signals(self.db, self.backend, s)
        await self.signals.start()
        self.reconciler = Reconciler(
            self.db, self.backend, s, http_base, load=self.signals.in_flight
        )
        await self.reconciler.start()
        self.collector = Collector(self.db, s, self.files, sources)
        await self.collector.start()
        self.rollouts = Rollouts(self.db, self.signals, http_base, s.rollout_interval_s)
        await self.rollouts.start()

        access = Access(self.db)
        if s.insecure_no_auth:
            log.warning(
                "--insecure-no-auth: every caller is an admin and model endpoints need no key; "
                "for local demos only, never on a network others can reach"
            )
        else:
            await asyncio.to_thread(access.ensure_admin_token, s.data_dir)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
            ],
        )
        telemetry = TelemetryInterceptor(self.metrics)
        auth = AuthInterceptor(access, enabled=not s.insecure_no_auth)
        checker = wiring.register(
            server,
            ModelLifecycleServicer(
                service,
                sources,
                self.hub,
                s.wait_operation_max_s,
                Exporter(s.data_dir / "exports"),
                access,
                self.signals,
            ),
            lambda method, handler: telemetry.wrap(method, auth.wrap(method, handler)),
        )
        self._health = checker
        address = f"{s.grpc_host}:{s.grpc_port}"
        if s.tls_cert is not None and s.tls_key is not None:
            creds = transport.server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca)
            self.grpc_port = server.add_secure_port(address, creds)
        else:
            self.grpc_port = server.add_insecure_port(address)
        if self.grpc_port == 0:
            raise OSError(f"cannot listen on {s.grpc_host}:{s.grpc_port}")
        await server.start()
        self._grpc = server
        if self.metrics is not None:
            assert s.metrics_port is not None  # metrics exist only with a port
            self.metrics.read_state_from(self._figures)
            self._metrics_endpoint = MetricsEndpoint(self.metrics, s.metrics_host, s.metrics_port)
            await asyncio.to_thread(self._metrics_endpoint.start)
        await wiring.set_serving(checker, True)

    def _operation_finished(self, op: FinishedOperation) -> None:
        with logs.about(model=op.model, operation=op.name):
            if op.error_code:
                log.info("%s ended %s after %.2f s", op.kind, op.error_code, op.seconds)
            else:
                log.info("%s succeeded in %.2f s", op.kind, op.seconds)
        if self.metrics is not None:
            self.metrics.operation_finished(op.kind, op.error_code, op.seconds)

    def _figures(self) -> Figures:
        """Read at each scrape, in the metrics endpoint's thread."""
        with self.db.read() as s:
            models = repo.models_by_state(s)
            replicas = repo.replicas_by_model(s)
            queue = {state.value: n for state, n in jobs.counts(s).items()}
        watchers = self.hub.watchers if self.hub is not None else 0
        invocations, use = self.signals.exported() if self.signals is not None else ((), ())
        return Figures(
            models=models,
            replicas=replicas,
            jobs=queue,
            watchers=watchers,
            invocations=invocations,
            use=use,
        )

    async def _cluster_runtime(self) -> Runtime | None:
        """What the cluster's workers run; None (not checked) while it does not answer."""
        try:
            return await self.backend.runtime()
        except ClusterUnavailable:
            return None

    async def _cluster_back(self) -> None:
        """The cluster answers again after an outage (a new one knows nothing): every
        model is applied again, and returns to its recorded state."""
        await asyncio.to_thread(self._enqueue_sync)

    def _enqueue_sync(self) -> None:
        """At start, bring the backend to what the records ask for (e.g. after a Ray restart)."""
        with self.db.write() as tx:
            jobs.enqueue(tx.session, jobs.JobKind.APPLY, "")

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.grace_s if grace is None else grace
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)  # drains in-flight RPCs
        parts = (self.rollouts, self.signals, self.collector, self.reconciler, self.dispatcher)
        for part in (*parts, self.hub):
            if part is not None:
                await part.stop()
        if self._metrics_endpoint is not None:
            await asyncio.to_thread(self._metrics_endpoint.stop)
        if self.owns_backend:
            await self.backend.close()
        if self.service is not None and self.service.head_reader is not None:
            await self.service.head_reader.close()
        if self.artifacts is not None:
            await asyncio.to_thread(self.artifacts.stop)
        await asyncio.to_thread(self.db.close)
        if self._stop_tracing is not None:
            await asyncio.to_thread(self._stop_tracing)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
