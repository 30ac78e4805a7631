"""The Ray backend: builds as Ray tasks, models as Ray Serve applications.

This is the only module that imports ray. It drives Serve declaratively: every
``apply`` hands the controller the *whole* multi-application config (as
``serve deploy`` does), so that Serve itself decides what changes in place and
what rolls:

- the replica count is a lightweight config change: kept replicas keep their
  actors (ids and pids). Every deployment has an ``autoscaling_config`` (a fixed
  count is min = max), so that autoscaling bounds, and switching between a fixed
  count and autoscaling, are lightweight too;
- ``ray_actor_options`` (cpus, memory, gpus) and the application's code version
  (import path, args, runtime env, into which the build, environment and
  restart generation go) restart every replica, with ``max_surge_percent=100``
  so new replicas start before old ones stop and serving never pauses.

The deployment record's name never reaches Serve, so re-deploying the same build
with only a new replica count changes nothing else.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import random
import socket
import threading
import time
import urllib.request
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ray.serve._private import api as serve_api
from ray.serve.schema import (
    ApplicationDetails,
    ReplicaDetails,
    ServeDeploySchema,
    ServeInstanceDetails,
)
from starlette.requests import Request
from starlette.responses import Response

import ray
from ray import serve
from workers import artifact_archive
from workers.backend import (
    AppObservation,
    AppSpec,
    AppStatus,
    BuildOutcome,
    BuildSpec,
    ClusterUnavailable,
    NodeResources,
    ReplicaObservation,
    ReplicaStatus,
)
from workers.loader import reason_in
from workers.model_app import (
    UNAUTHORIZED,
    KeyCheck,
    LoadError,
    ModelFunction,
    invoke,
    load_function,
)
from workers.releasing import Releasing, Seen
from workers.remote_build import BuildResult, append_log, build_streamed, keep
from workers.runtime import Runtime
from workers.runtime import current as current_runtime
from workers.secret_broker import ActorInfo, SecretBroker
from workers.signals import (
    Batch,
    Collector,
    Identity,
    ProxyFigures,
    ProxyPace,
    Pusher,
    ReplicaSignals,
    Report,
    answered,
    answering,
    capture_output,
    proxy_figures,
)

if TYPE_CHECKING:
    from ray.serve._private.client import ServeControllerClient

log = logging.getLogger(__name__)
T = TypeVar("T")


def _ray_logs_through_root() -> None:
    """Ray's and Serve's own log lines go through the root logger's handlers, so they are
    in the server's format (``--log-format json``: one object per line). Importing ray
    gives the ``ray`` logger, and importing ray.serve the ``ray.serve`` logger, a
    plain-text stderr handler of their own and stops their propagation; those console
    handlers go (any ``ray.*`` logger's; handlers writing to files stay)."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.partition(".")[0] != "ray":
            continue
        console = [
            h
            for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        for handler in console:
            logger.removeHandler(handler)
        if console:
            logger.propagate = True


_ray_logs_through_root()  # before ray.init, which already logs (its SIGTERM warning)

DEPLOYMENT = "model"  # the one Serve deployment of every model application
RESTART_ENV = "CP_RESTART_GENERATION"  # in a replica's environment, not the build's check
IMPORT_PATH = f"{__name__}:build_app"  # every model application's, and no one else's
SECRETS_BROKER = "modelctl-secrets"  # the detached actor holding secret values
CLAIM_TIMEOUT_S = 30.0
# How long an apply waits for Serve to finish building (importing) the applications it
# would hand over again (``until_built``), and how it looks at Serve meanwhile.
BUILD_WAIT_S = 30.0
BUILD_LOOK_S = 0.3  # it takes the reconciler's looks meanwhile; its own after this long
BUILD_POLL_S = 0.02
LOOK_REUSE_S = 0.5  # how old that wait's last look may be for the apply after it to use it
MiB = 1024 * 1024
OBJECT_STORE_MIB = 256  # of a local cluster this backend starts (Ray's default: 30% of memory)
MAX_ONGOING = 16  # requests one replica takes at once; more wait in Serve's queue
# Serve's own metrics reach each node's metrics agent this often (Ray's default: 10 s);
# a cluster this backend joins should be started with RAY_metrics_report_interval_ms too.
METRICS_REPORT_MS = 1000
COLLECTOR = "modelctl-signals"  # the detached actor replicas report to
NAMESPACE = "modelctl"
PROXY_METRICS = ("ray_serve_num_http_requests_total", "ray_serve_deployment_queued_queries")

_APP_STATUS = {
    "NOT_STARTED": AppStatus.DEPLOYING,
    "DEPLOYING": AppStatus.DEPLOYING,
    "RUNNING": AppStatus.RUNNING,
    "DEPLOY_FAILED": AppStatus.DEPLOY_FAILED,
    "UNHEALTHY": AppStatus.UNHEALTHY,
    "DELETING": AppStatus.DELETING,
}
_REPLICA_STATUS = {
    "STARTING": ReplicaStatus.STARTING,
    "UPDATING": ReplicaStatus.STARTING,
    "RECOVERING": ReplicaStatus.STARTING,
    "RUNNING": ReplicaStatus.RUNNING,
    "PENDING_MIGRATION": ReplicaStatus.RUNNING,
    "STOPPING": ReplicaStatus.STOPPING,
    "STOPPED": ReplicaStatus.STOPPING,
}


def _collector() -> Any:
    return ray.get_actor(COLLECTOR, namespace=NAMESPACE)


class _Send:
    """Hands a replica's report to the collector and waits for it to be taken (in the
    pusher's thread), finding the collector again when it was started anew."""

    def __init__(self) -> None:
        self._actor: Any = None

    def __call__(self, report: Report) -> None:
        if self._actor is None:
            self._actor = _collector()
        try:
            ray.get(self._actor.push.remote([report]), timeout=10)
        except Exception:
            self._actor = None
            raise


def _gpu_probe(gpu_ids: list[Any]) -> Any:
    """GPUs' worth in use by the replica's GPUs (NVML utilisation), or None where NVML or a
    GPU is missing (logical GPUs): then the figures say "not measured"."""
    if not gpu_ids:
        return None
    try:
        import importlib

        pynvml: Any = importlib.import_module("ray._private.thirdparty.pynvml")
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(int(i)) for i in gpu_ids]
    except Exception:
        return None

    def used() -> float:
        try:
            return float(sum(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles)) / 100
        except Exception:
            return -1.0

    return used


def _node_address() -> str:
    """The address the replica's node has in the cluster, as Serve's replica details give it
    (``ray.util.get_node_ip_address`` guesses one from the routes instead)."""
    try:
        from ray._private.worker import global_worker

        return str(global_worker.node_ip_address)
    except Exception:
        return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


def _identity(build: str, app: str) -> Identity:
    replica = serve.get_replica_context()
    assigned = ray.get_runtime_context().get_assigned_resources()  # type: ignore[no-untyped-call]
    return Identity(
        app=app or replica.app_name,
        replica=replica.replica_id.unique_id,
        build=build,
        node=_node_address(),
        busy_limit=MAX_ONGOING,
        requested_cpus=float(assigned.get("CPU", 0.0)),
        requested_memory_bytes=int(assigned.get("memory", 0)),
        requested_gpus=float(assigned.get("GPU", 0.0)),
        gpu_probe=_gpu_probe(ray.get_gpu_ids()),
    )


def _request_id(request: Request) -> str:
    try:  # Serve's id of the request: the caller's X-Request-Id, or one it made
        from ray.serve.context import _get_serve_request_context

        return str(_get_serve_request_context().request_id)
    except Exception:
        return request.headers.get("x-request-id", "")


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=MAX_ONGOING)
class ModelServer:
    """One replica: loads the build's function once, answers POST with JSON, counts each
    request and collects its output (``workers.signals``) unless ``signals`` is False.
    While its model splits traffic, it sends its share of requests to the other build's
    application (``_Share``) and returns that answer, or sends it a copy (a shadow)."""

    def __init__(
        self,
        artifact_path: str,
        file_path: str,
        function_name: str,
        build: str,
        signals: bool = True,
        signals_app: str = "",
        archive: tuple[str, ...] = (),
        secrets_version: str = "",
        restart_generation: int = 0,
    ):
        # The model's code can tell a replica from the build's import check by this, set
        # before it is imported (how many times the model was restarted).
        os.environ[RESTART_ENV] = str(restart_generation)
        _claim_secrets(secrets_version)  # before the model's code runs: it may read them
        self._signals: ReplicaSignals | None = None
        if signals:
            self._signals = ReplicaSignals(_identity(build, signals_app))
            capture_output(self._signals)  # from the model's import on
            self._pusher = Pusher(self._signals, _Send())
            self._pusher.start()
        try:
            artifact_path = _artifact_here(artifact_path, archive)
            self._fn: ModelFunction = load_function(artifact_path, file_path, function_name)
        except Exception as e:
            # The whole traceback stays in the replica's log (Serve's user logger); the
            # deployment's message shows only the LoadError's one line (_observation).
            logging.getLogger("ray.serve").exception(
                "cannot load %s:%s from %s", file_path, function_name, artifact_path
            )
            if self._signals is not None:  # and the model's log says why, before it goes
                self._signals.line("stderr", f"the replica cannot start: {e}")
                self._pusher.stop()
                self._pusher.push_now()
            raise
        self._build = build
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._keys = KeyCheck()
        self._share = _Share(build)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve calls it at start and whenever the keys or the traffic share change (no
        restart)."""
        self._keys.configure(config)
        self._share.configure(config.get("share"))

    def __del__(self) -> None:
        if self._signals is not None:
            self._pusher.stop()
            self._pusher.push_now()  # the last lines, when the replica stops cleanly

    async def __call__(self, request: Request) -> Response:
        request_id = _request_id(request)
        if not self._keys.allows(request.headers.get("authorization")):
            await self._counted(request_id, self._unauthorized())
            return Response(
                UNAUTHORIZED.body,
                status_code=UNAUTHORIZED.status,
                media_type="application/json",
                headers={"WWW-Authenticate": "Bearer"},
            )
        raw = await request.body()
        to = self._share.route(request.headers)
        if to is not None and not self._share.shadow:
            answer = await self._share.forward(to, raw, request_id)
            if answer is not None:  # None: the other build is gone; answered here
                return Response(answer[1], status_code=answer[0], media_type="application/json")
        elif to is not None:
            self._share.copy(to, raw, request_id)
        status, body = await self._counted(request_id, self._invoke(raw))
        return Response(body, status_code=status, media_type="application/json")

    async def answer(self, raw: bytes, request_id: str) -> tuple[int, bytes]:
        """A request another build's replica sent here (its key was checked there)."""
        return await self._counted(request_id, self._invoke(raw))

    async def _invoke(self, raw: bytes) -> tuple[int, bytes]:
        # The user's function may block (NumPy, I/O): keep the replica's loop free.
        reply = await asyncio.to_thread(invoke, self._fn, raw, self._replica_id, self._build)
        return reply.status, reply.body

    @staticmethod
    async def _unauthorized() -> tuple[int, bytes]:
        return UNAUTHORIZED.status, UNAUTHORIZED.body

    async def _counted(
        self, request_id: str, answering_it: Coroutine[Any, Any, tuple[int, bytes]]
    ) -> tuple[int, bytes]:
        signals = self._signals
        if signals is None:
            return await answering_it
        started = time.perf_counter()
        signals.started()
        token = answering(request_id)
        status = 500
        try:
            result = await answering_it
            status = result[0]
            return result
        finally:
            answered(token)
            signals.finished(status, time.perf_counter() - started, request_id)


class _Share:
    """A replica's part in its model's traffic split (``TrafficShare``, in its user_config):
    which requests go to the other build's application, by a header's hash or at random,
    through a Serve handle. A failed hand-over (the other application going away as the
    split ends) is answered by this replica: the split never fails a request itself."""

    def __init__(self, build: str) -> None:
        self._build = build
        self._to = ""
        self._percent = 0
        self.shadow = False
        self._header = ""
        self._handles: dict[str, Any] = {}
        self._copies: set[asyncio.Future[Any]] = set()

    def configure(self, share: Mapping[str, Any] | None) -> None:
        share = share or {}
        mine = share.get("from_build") == self._build
        self._to = str(share.get("to_app", "")) if mine else ""
        self._percent = int(share.get("percent", 0)) if mine else 0
        self.shadow = bool(share.get("shadow", False))
        self._header = str(share.get("sticky_header", "")).lower()

    def route(self, headers: Mapping[str, str]) -> str | None:
        """The application this request goes to, or None: answered here."""
        if not self._to or self._percent <= 0:
            return None
        value = headers.get(self._header) if self._header else None
        if value is not None:
            picked = zlib.crc32(value.encode()) % 100 < self._percent
        else:
            picked = random.random() * 100 < self._percent
        return self._to if picked else None

    def _handle(self, app: str) -> Any:
        handle = self._handles.get(app)
        if handle is None:
            handle = self._handles[app] = serve.get_deployment_handle(DEPLOYMENT, app_name=app)
        return handle

    async def forward(self, app: str, raw: bytes, request_id: str) -> tuple[int, bytes] | None:
        try:
            answer: tuple[int, bytes] = await self._handle(app).answer.remote(raw, request_id)
            return answer
        except Exception as e:  # gone with the split's end: answered here
            log.warning("the other build (%s) did not answer (%s); answering here", app, e)
            self._handles.pop(app, None)
            return None

    def copy(self, app: str, raw: bytes, request_id: str) -> None:
        task = asyncio.ensure_future(self.forward(app, raw, request_id))
        self._copies.add(task)
        task.add_done_callback(self._copies.discard)


def _claim_secrets(version: str) -> None:
    """A replica's secret values, claimed once from the broker (``workers.secret_broker``)
    and put into its own environment; nothing when its application has none."""
    if not version:
        return
    app = serve.get_replica_context().app_name
    actor_id = ray.get_runtime_context().get_actor_id()
    broker = ray.get_actor(SECRETS_BROKER, namespace=NAMESPACE)
    claimed: Any = broker.claim.remote(app, version, actor_id)
    values = cast(dict[str, str], ray.get(claimed, timeout=CLAIM_TIMEOUT_S))
    os.environ.update(values)


def _artifact_here(path: str, archive: tuple[str, ...]) -> str:
    """The artifact folder on this replica's node: ``path`` where the node sees it, else
    the node's cached copy, fetched from the control plane (``workers.artifact_archive``)
    where the broker says, by the digest and SHA-256 ``archive`` names."""
    digest, sha256 = archive if len(archive) == 2 else (Path(path).name, "")

    def remote() -> list[artifact_archive.Remote]:
        if not sha256:
            return []
        app = serve.get_replica_context().app_name
        actor_id = ray.get_runtime_context().get_actor_id()
        broker = ray.get_actor(SECRETS_BROKER, namespace=NAMESPACE)
        asked: Any = broker.source.remote(app, digest, actor_id)
        found = cast(list[tuple[str, str]], ray.get(asked, timeout=CLAIM_TIMEOUT_S))
        return [artifact_archive.Remote(digest, sha256, url, token) for url, token in found]

    try:
        return artifact_archive.local_copy(path, digest, remote)
    except artifact_archive.FetchFailed as e:
        raise LoadError(str(e)) from e


def _actor_info(actor_id: str) -> ActorInfo | None:
    """What the cluster's actor table says of an actor (the broker's check of a claim)."""
    found = ray._private.state.actors(actor_id=actor_id)
    if not found:
        return None
    return ActorInfo(
        name=str(found.get("Name", "")),
        alive=found.get("State") in ("ALIVE", "PENDING_CREATION"),
    )


# Ray's socket paths (TEMP/session_<time>_<pid>/sockets/plasma_store) must fit in 107 bytes.
MAX_RAY_TEMP = 40


def _private_temp_dir(wanted: Path) -> Path:
    """A folder in ``wanted`` (made mode 0700): Ray makes its temp dir and the folders in
    it 0777 on every start, so they sit in a folder of ours that nobody else can enter.
    Where that path is too long for Ray's sockets: a private folder of this user's under
    the system temp dir instead (said in the log)."""
    if len(str(wanted)) + 2 > MAX_RAY_TEMP:
        import tempfile

        short = Path(tempfile.mkdtemp(prefix="modelctl-ray-"))  # 0700
        log.warning(
            "Ray's files go to %s, not %s: that path is too long for Ray's sockets "
            "(%d characters at most); use a shorter --data-dir to keep them there",
            short,
            wanted,
            MAX_RAY_TEMP,
        )
        wanted = short
    wanted.mkdir(mode=0o700, parents=True, exist_ok=True)
    wanted.chmod(0o700)
    return wanted / "r"


RAY_THREADS = 8  # calls into Ray at once (their own threads, apart from the server's)
WATCH_S = 1.0  # how often the cluster is asked whether it is there
PROBE_TIMEOUT_S = 2.0
LOST_AFTER = 2  # misses in a row: the cluster is gone
RECONNECT_S = 2.0  # between tries to connect again
CLUSTER_FACTS_S = 1.0  # how old the cluster's totals and lost nodes an observation uses may be
GCS_PATIENCE_S = 86400  # how long Ray lets this driver wait for a GCS that went away


def _closed_ok(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``; a call into Ray that was waiting when the connection was closed
    (Ray raises SystemExit in it, which would end the server's event loop) becomes
    ClusterUnavailable."""
    try:
        return fn(*args)
    except SystemExit as e:
        raise ClusterUnavailable(f"the connection to the Ray cluster was closed ({e})") from None


async def _streamed(spec: BuildSpec, stream: Any) -> BuildResult:
    """What the build task yields (``remote_build.build_streamed``): log bytes, appended
    to the build's log as they come, then the result. A task that failed yields its error
    (raised here as the RayError it is)."""
    result: BuildResult | None = None
    async for ref in stream:
        item = await _result(asyncio.wrap_future(ref.future()))
        if isinstance(item, bytes):
            await asyncio.to_thread(append_log, spec, item)
        elif isinstance(item, BuildResult):
            result = item
    if result is None:
        raise ray.exceptions.RayError("the build task ended without its result")
    return result


async def _result(future: Awaitable[T]) -> T:
    """An ObjectRef's future, awaited; its SystemExit (the connection closed) becomes
    ClusterUnavailable."""
    try:
        return await future
    except SystemExit as e:
        raise ClusterUnavailable(f"the connection to the Ray cluster was closed ({e})") from None


def _cluster_ready(address: str) -> None:
    """Raises unless the cluster at ``host:port`` is up: its GCS listens and lists a live
    node. ray.init blocks for minutes on a closed port, and fails inside Ray (killing
    the process) when it joins a GCS whose head node has not registered yet."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host or "127.0.0.1", int(port)), timeout=PROBE_TIMEOUT_S):
        pass
    from ray._raylet import GcsClient  # type: ignore[attr-defined]

    nodes = GcsClient(address=address).get_all_node_info(timeout=PROBE_TIMEOUT_S)
    if not any(getattr(n, "state", None) == 0 for n in nodes.values()):  # 0: ALIVE
        raise ClusterUnavailable(f"no live node at {address} yet")


def _gcs_answers() -> None:
    """Raises unless the cluster's GCS answers within PROBE_TIMEOUT_S."""
    gcs = ray._private.worker.global_worker.gcs_client  # type: ignore[attr-defined]
    gcs.internal_kv_get(b"modelctl-probe", namespace=None, timeout=PROBE_TIMEOUT_S)


def _lost_nodes(nodes: list[_Node]) -> frozenset[str]:
    """Addresses of the nodes Ray lists as dead (and not alive again at that address)."""
    alive = {n.address for n in nodes if n.alive}
    return frozenset(n.address for n in nodes if not n.alive) - alive


def _running_broker() -> Any:
    try:
        return ray.get_actor(SECRETS_BROKER, namespace=NAMESPACE)
    except ValueError:  # none on this cluster
        return None


def _start_broker() -> Any:
    """The cluster's secret broker: found where it runs, or started (detached, no CPU).
    A restarted one is empty until the control plane's next apply fills it."""
    return _detached(SecretBroker, SECRETS_BROKER, _actor_info)


def build_app(args: dict[str, Any]) -> Any:
    """Serve's application builder (``import_path`` of every model application)."""
    return ModelServer.bind(  # type: ignore[attr-defined]
        args["artifact_path"],
        args["file_path"],
        args["function_name"],
        args["build"],
        bool(args.get("signals", True)),
        str(args.get("signals_app", "")),
        tuple(args.get("archive") or ()),
        str(args.get("secrets_version", "")),
        int(args.get("restart_generation", 0)),
    )


def _app_config(
    spec: AppSpec,
    max_queued_requests: int = -1,
    new: bool = True,
    archive: tuple[str, str] | None = None,
    path_on_nodes: bool = True,
) -> dict[str, Any]:
    """``archive``: (digest, SHA-256) of the build's archive, for a replica on a node that
    does not see ``artifact_path`` (None: every node does). ``path_on_nodes``: False when
    no node is expected to see it (servers that share no disk): the config names the
    build by its archive alone, the same whichever server applies it."""
    path = spec.artifact_path if path_on_nodes or archive is None else ""
    actor_options: dict[str, Any] = {"num_cpus": spec.cpus, "num_gpus": spec.gpus}
    if spec.memory_mib:
        actor_options["memory"] = spec.memory_mib * MiB
    # What the replicas need besides the user's variables goes in the args: they are in
    # Serve's code version (a new generation or secrets version replaces every replica),
    # and a runtime_env is left out when the user sets no variable, so that Ray starts a
    # replica in one of its ready worker processes (a runtime_env of any kind needs a new
    # one: ~0.4 s more per replica, measured with bench/models.py's anchor).
    config: dict[str, Any] = {
        "name": spec.app_name,
        "route_prefix": spec.route_prefix,
        "import_path": IMPORT_PATH,
        "args": {
            "artifact_path": path,
            "file_path": spec.file_path,
            "function_name": spec.function_name,
            "build": spec.build_name,
            "signals_app": spec.signals_app,
            "restart_generation": spec.restart_generation,
            # The version the replica claims its values with; they go through the broker,
            # never the config.
            **({"secrets_version": spec.secrets_version} if spec.secrets_version else {}),
            **({"archive": list(archive)} if archive else {}),
        },
        "deployments": [
            {
                "name": DEPLOYMENT,
                "autoscaling_config": _autoscaling(spec, new),
                "ray_actor_options": actor_options,
                "user_config": {
                    "open": spec.access.open,
                    "keys": list(spec.access.key_hashes),
                    "share": asdict(spec.share) if spec.share is not None else None,
                },
                "max_queued_requests": max_queued_requests,
                "max_surge_percent": 100,
                "graceful_shutdown_timeout_s": 10,
                "graceful_shutdown_wait_loop_s": 0.5,
            }
        ],
    }
    if spec.environment:
        config["runtime_env"] = {"env_vars": dict(spec.environment)}
    return config


def _autoscaling(spec: AppSpec, new: bool) -> dict[str, Any]:
    """Serve's autoscaling config, for a fixed count too (min = max = the count): the
    count, the bounds and fixed versus autoscaled then all change in place. Serve puts
    whether a deployment has an ``autoscaling_config`` into the application's code
    version, so switching between ``num_replicas`` and ``autoscaling_config`` would
    restart every replica. Serve also sets the count to ``initial_replicas`` whenever
    the config changes: an autoscaled application that runs already gets none (it keeps
    the count it has, within the new bounds); a ``new`` one starts with ``replicas``."""
    a = spec.autoscaling
    if a is None:
        n = spec.replicas
        return {"min_replicas": n, "max_replicas": n, "initial_replicas": n}
    config: dict[str, Any] = {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
    }
    if new:
        config["initial_replicas"] = min(max(spec.replicas, a.min_replicas), a.max_replicas)
    return config


def _replica(r: ReplicaDetails) -> ReplicaObservation:
    return ReplicaObservation(
        id=r.replica_id,
        state=_REPLICA_STATUS.get(r.state.value, ReplicaStatus.STARTING),
        pid=r.pid or 0,
        node=r.node_ip or r.node_id or "",
        start_time=datetime.fromtimestamp(r.start_time_s, UTC) if r.start_time_s else None,
    )


def _unplaceable(required: Mapping[str, Any], cluster: Mapping[str, float]) -> str:
    """Why a replica can never be placed, or "" (Serve itself says so only after 30s)."""
    short = [r for r, amount in required.items() if float(amount) > cluster.get(r, 0.0)]
    if not short:
        return ""
    need = ", ".join(f"{float(required[r]):g} {r}" for r in short)
    have = ", ".join(f"{cluster.get(r, 0.0):g} {r}" for r in short)
    return f"replicas cannot be placed: each needs {need}; the cluster has {have} in all"


def _observation(
    name: str, app: ApplicationDetails, cluster: Mapping[str, float]
) -> AppObservation:
    replicas: list[ReplicaObservation] = []
    messages: list[str] = []
    unplaceable: list[str] = []
    target: int | None = None
    for d in app.deployments.values():
        replicas.extend(_replica(r) for r in d.replicas)
        target = d.target_num_replicas
        why = _unplaceable(d.required_resources, cluster) if cluster else ""
        if why:
            unplaceable.append(why)
        if d.message:
            messages.append(d.message)
        elif why:
            messages.append(why)
    status = _APP_STATUS.get(app.status.value, AppStatus.DEPLOYING)
    # The deployment's message carries the cause (the user's exception, what could
    # not be scheduled); the application's only says which deployment failed.
    message = reason_in(" ".join(messages) or app.message)  # a failed load: its one line
    return AppObservation(
        app_name=name,
        status=status,
        message=message,
        replicas=tuple(replicas),
        unplaceable=" ".join(unplaceable),
        target_replicas=target,
    )


class _Serve:
    """The three private Ray Serve calls this backend makes, and only here. Serve's public
    API deploys a whole multi-application config only through the dashboard's REST API
    (``serve deploy``), and its ``serve.status()`` leaves out the replicas (ids, pids,
    nodes) and the resources each needs; the controller's client does both, and the
    private ``serve_start`` (unlike ``serve.start``) returns it. The details come back
    parsed into Serve's public schema, ``ServeInstanceDetails``."""

    def __init__(self, client: ServeControllerClient) -> None:
        self._client = client
        # Each application's details as last received and as parsed: parsing is costly
        # (Serve's schema pickles each deployment's request router class on the way), and
        # with hundreds of settled applications almost none changes between two looks.
        self._parsed: dict[str, tuple[Any, ApplicationDetails]] = {}
        self._parsing = threading.Lock()
        self.releasing = Releasing()  # what replicas stopping hold, as the looks saw them

    @classmethod
    def start(cls, http_host: str, http_port: int) -> _Serve:
        """Starts Serve on the connected cluster, or connects to the Serve running there."""
        return cls(serve_api.serve_start(http_options={"host": http_host, "port": http_port}))

    def deploy(self, config: ServeDeploySchema) -> None:
        """Hands the controller the whole config, as ``serve deploy`` does (returns at once)."""
        self._client.deploy_apps(config)

    def details(self) -> ServeInstanceDetails:
        # A dict of Serve's own schema (dumped with exclude_unset; enums as members). Only
        # the applications whose details changed since the last look are parsed again.
        raw = dict(self._client.get_serve_details())
        apps: dict[str, Any] = raw.pop("applications", None) or {}
        parsed: dict[str, tuple[Any, ApplicationDetails]] = {}
        # One parse at a time: Serve's schema registers and unregisters its autoscaling
        # policy's module with cloudpickle as it parses, and two threads at once (a look
        # and an apply) fail with "not registered for pickle by value".
        with self._parsing:
            for name, app in apps.items():
                kept = self._parsed.get(name)
                if kept is None or kept[0] != app:
                    kept = (app, ApplicationDetails.model_validate(_router_not_pickled(app)))
                parsed[name] = kept
            self._parsed = parsed
        details = ServeInstanceDetails.model_validate({**raw, "applications": {}})
        details = details.model_copy(
            update={"applications": {n: p for n, (_, p) in parsed.items()}}
        )
        self.releasing.saw(_replicas(details))
        return details


# What a parsed deployment says its request-router class was serialized as: never read.
_ROUTER_NOT_PICKLED = b"not serialized by the control plane"


def _router_not_pickled(app: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an application's details in which each deployment's request-router
    config says its class is serialized already. Otherwise Serve's schema, for every
    deployment it parses, imports the router class and cloudpickles its module by value
    (~8 ms each here: most of the driver's CPU while a model changes); this backend reads
    nothing of it, and never hands a parsed deployment back to Serve."""
    deployments = {}
    for name, d in (app.get("deployments") or {}).items():
        if isinstance(d, Mapping) and isinstance(d.get("deployment_config"), Mapping):
            config = dict(d["deployment_config"])
            router = dict(config.get("request_router_config") or {})
            router.setdefault("_serialized_request_router_cls", _ROUTER_NOT_PICKLED)
            config["request_router_config"] = router
            d = {**d, "deployment_config": config}
        deployments[name] = d
    return {**app, "deployments": deployments}


def _building(running: Mapping[str, ApplicationDetails]) -> list[str]:
    """The model applications Serve is building (importing): none of its deployments
    listed yet, neither failed nor being deleted."""
    out = []
    for name, app in running.items():
        config = app.deployed_app_config
        if (
            config is not None
            and config.import_path == IMPORT_PATH
            and not app.deployments
            and app.status.value in ("NOT_STARTED", "DEPLOYING")
        ):
            out.append(name)
    return out


class ForeignApplications(RuntimeError):
    """Serve runs applications of someone else's that a whole config would delete."""


def _others(running: Mapping[str, ApplicationDetails], ours: set[str]) -> list[dict[str, Any]]:
    """The applications on this Serve that are not the control plane's (another import
    path), each as its owner deployed it: handed back unchanged with every apply, since
    Serve's declarative config is the whole set and would delete what it leaves out. One
    deployed through Serve's Python API (no config to hand back) stops every apply,
    saying which, rather than being deleted."""
    kept: list[dict[str, Any]] = []
    imperative: list[str] = []
    for name, app in sorted(running.items()):
        config = app.deployed_app_config
        if config is not None and config.import_path == IMPORT_PATH:
            continue  # ours: kept when wanted, deleted when not (a stopped model)
        if config is None:
            if name not in ours and app.status.value != "DELETING":
                imperative.append(name)
            continue
        if name in ours:
            raise ForeignApplications(
                f"Serve application {name!r} is someone else's (import path "
                f"{config.import_path}); a model cannot take its name"
            )
        kept.append(config.model_dump(mode="json", exclude_unset=True))
    if imperative:
        raise ForeignApplications(
            "Serve runs applications deployed through its Python API that this control "
            f"plane does not own ({', '.join(imperative)}): applying would delete them. "
            "Delete them, or deploy them with `serve deploy`, whose config is kept"
        )
    return kept


def _replicas(details: ServeInstanceDetails) -> dict[str, Seen]:
    """Every replica Serve lists, by id: its node, whether it stops, and what its
    deployment asks of a replica now."""
    out: dict[str, Seen] = {}
    for app in details.applications.values():
        for d in app.deployments.values():
            need = {k: float(v) for k, v in d.required_resources.items()}
            for r in d.replicas:
                if r.node_ip:
                    out[r.replica_id] = Seen(r.node_ip, r.state.value == "STOPPING", need)
    return out


@dataclass(frozen=True)
class _Node:
    id: str
    address: str
    alive: bool
    metrics_port: int
    total: Mapping[str, float]


def _node_table() -> list[_Node]:
    """The cluster's nodes, from its GCS within PROBE_TIMEOUT_S. Never ``ray.nodes()``:
    that call waits for a GCS that went away, and once a new one answers at the address
    it fails inside Ray (wrong cluster id) and takes the whole process with it."""
    gcs = ray._private.worker.global_worker.gcs_client  # type: ignore[attr-defined]
    return [
        _Node(
            id=n.node_id.hex(),
            address=str(n.node_manager_address),
            alive=n.state == 0,  # GcsNodeInfo.ALIVE
            metrics_port=int(n.metrics_export_port),
            total=dict(n.resources_total),
        )
        for n in gcs.get_all_node_info(timeout=PROBE_TIMEOUT_S).values()
    ]


def _free_per_node() -> dict[str, dict[str, float]]:
    gcs = ray._private.worker.global_worker.gcs_client  # type: ignore[attr-defined]
    usage = gcs.get_all_resource_usage(timeout=PROBE_TIMEOUT_S).resource_usage_data
    return {u.node_id.hex(): dict(u.resources_available) for u in usage.batch}


def _cluster_totals(nodes: list[_Node]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for node in nodes:
        if node.alive:
            for resource, amount in node.total.items():
                totals[resource] = totals.get(resource, 0.0) + amount
    return totals


def _cluster_facts() -> tuple[dict[str, float], frozenset[str]]:
    """The live nodes' resources in all, and the nodes lost: one read of the node table."""
    nodes = _node_table()
    return _cluster_totals(nodes), _lost_nodes(nodes)


def _nodes(releasing: Mapping[str, Mapping[str, float]]) -> list[NodeResources]:
    """Every live node, its resources and what is not reserved now (Ray's own view, which
    lags a moment behind actors starting and stopping), counting what ``releasing``
    replicas reserve (by node address) as free: they give it back within moments."""
    free = _free_per_node()
    out = []
    for node in _node_table():
        if not node.alive:
            continue
        address = node.address or node.id
        total = node.total
        have = dict(free.get(node.id, {}))
        for resource, amount in releasing.get(address, {}).items():
            have[resource] = min(total.get(resource, 0.0), have.get(resource, 0.0) + amount)
        out.append(
            NodeResources(
                node=address,
                cpus_total=float(total.get("CPU", 0.0)),
                cpus_free=float(have.get("CPU", 0.0)),
                gpus_total=float(total.get("GPU", 0.0)),
                gpus_free=float(have.get("GPU", 0.0)),
                memory_total_mib=int(total.get("memory", 0.0) // MiB),
                memory_free_mib=int(have.get("memory", 0.0) // MiB),
            )
        )
    return sorted(out, key=lambda n: n.node)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class RayBackend:
    def __init__(
        self,
        address: str | None,
        http_host: str,
        http_port: int,
        num_cpus: float,
        num_gpus: float,
        build_cpus: float = 0.25,
        max_queued_requests: int = -1,
        temp_dir: Path | None = None,
        artifact_url: str = "",
        artifact_key: bytes = b"",
        shared_disk: bool = True,
    ) -> None:
        """``temp_dir``: where a local Ray this backend starts keeps its files (sessions,
        logs, sockets), made private to this user (default: Ray's, under /tmp).
        ``artifact_url``: the control plane's artifact endpoint, for replicas on nodes
        that do not see the artifact folder (its tokens made with ``artifact_key``); "":
        every node reads the folder itself. ``shared_disk``: False when the control plane's
        servers share no disk (each has its own data dir): an application's config then
        names its build by digest alone, so that every server applies the same config,
        and every replica fetches its build."""
        self._artifact_url = artifact_url.rstrip("/")
        self._artifact_key = artifact_key
        self._shared_disk = shared_disk
        self._address = address
        self._temp_dir = temp_dir
        self._http_host = http_host
        self._http_port = http_port or _free_port(http_host)
        self._num_cpus = num_cpus
        self._num_gpus = num_gpus
        self._build_cpus = build_cpus
        self._max_queued = max_queued_requests
        self._owns_ray = False
        self._serve: _Serve | None = None
        # until_built's last look at Serve's applications, and when: the next apply's.
        self._looked: tuple[float, Mapping[str, ApplicationDetails]] | None = None
        self._seen: tuple[float, Mapping[str, ApplicationDetails]] = (0.0, {})  # any look's
        self._lock = asyncio.Lock()
        self._runtime: Runtime | None = None
        self._collector: Any = None
        self._broker: Any = None
        self._watchdog: asyncio.Future[None] | None = None
        self._suspect = False  # the last look at the cluster got no answer
        self._pool = ThreadPoolExecutor(RAY_THREADS, thread_name_prefix="ray-call")
        self._down_since: float | None = None  # the cluster is gone: connecting again
        self._lost_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._reconnected: list[Callable[[], Awaitable[None]]] = []
        self._joining: asyncio.Future[None] | None = None
        self._metrics_ports: list[str] = []
        self._metrics_ports_at = 0.0
        self._proxy_pace = ProxyPace()  # how often the proxies' metrics pages are read
        # The cluster's totals and lost nodes, and when they were read (observe).
        self._facts: tuple[dict[str, float], frozenset[str]] = ({}, frozenset())
        self._facts_at = -CLUSTER_FACTS_S
        # Each application's last observation, and the details and facts it was made of.
        self._observed: dict[str, tuple[Any, object, AppObservation]] = {}

    @property
    def http_base(self) -> str:
        return f"http://{self._http_host}:{self._http_port}"

    def _started(self) -> _Serve:
        if self._serve is None or self._suspect:
            if self._down_since is not None or self._suspect:
                raise ClusterUnavailable(
                    f"the Ray cluster ({self._address or 'local'}) does not answer since "
                    f"{time.strftime('%H:%M:%S', time.localtime(self._down_since))}; "
                    "connecting again"
                )
            raise RuntimeError("the Ray backend is not started")
        return self._serve

    def available(self) -> bool:
        return self._serve is not None and not self._suspect

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn`` in a thread of the backend's own: a Ray call that hangs while the
        cluster is gone never takes a thread the rest of the server needs."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(_closed_ok, fn, *args))

    def on_reconnected(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Runs once a backend started while its cluster did not answer has joined it (a
        lost cluster is joined again by a new driver process: ``on_lost``)."""
        self._reconnected.append(callback)

    def on_lost(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Runs once the cluster is gone (LOST_AFTER probes in a row got no answer)."""
        self._lost_callbacks.append(callback)

    async def start(self) -> None:
        """Connects, or with ``--ray-address`` of a cluster that does not answer now,
        starts without it: calls that need it raise ClusterUnavailable until it answers
        and is joined (``on_reconnected``'s callbacks then run)."""
        async with self._lock:
            if self._serve is None:
                if self._address and not await self._ready_now():
                    self._down_since = time.time()
                    self._joining = asyncio.ensure_future(self._join_when_ready())
                    return
                self._serve = await self._call(self._start)
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch())

    async def _ready_now(self) -> bool:
        try:
            await self._call(_cluster_ready, self._address)
            return True
        except Exception as e:
            log.error(
                "the Ray cluster at %s does not answer (%s): waiting for it", self._address, e
            )
            return False

    async def _join_when_ready(self) -> None:
        """Joins the cluster once it answers (this process never joined another, so
        ray.init is safe), then says so to ``on_reconnected``'s callbacks."""
        while True:
            if await self._ready_now():
                break
            await asyncio.sleep(RECONNECT_S)
        async with self._lock:
            self._serve = await self._call(self._start)
            took = time.time() - (self._down_since or time.time())
            self._down_since = None
        log.warning("joined the Ray cluster (after %.0f s): applying every model", took)
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch())
        for callback in self._reconnected:
            try:
                await callback()
            except Exception:
                log.exception("after joining the cluster")

    async def _watch(self) -> None:
        """Asks the cluster's GCS every WATCH_S whether it is there; after LOST_AFTER
        misses in a row the cluster is gone (``_lost``: calls into it stop, and
        ``on_lost``'s callbacks run)."""
        misses = 0
        while True:
            await asyncio.sleep(WATCH_S)
            if self._serve is None:
                continue
            try:
                await asyncio.wait_for(self._call(_gcs_answers), PROBE_TIMEOUT_S + 1)
                misses = 0
                self._suspect = False
            except Exception as e:
                misses += 1
                self._suspect = True  # no new call into Ray until it answers again
                log.warning("the Ray cluster does not answer (%s), %d time(s)", e, misses)
                if misses >= LOST_AFTER:
                    misses = 0
                    await self._lost()

    async def _lost(self) -> None:
        """The cluster is gone. Ray's driver cannot let go of a lost cluster in process
        (``ray.shutdown`` then waits for minutes or ends the process from inside Ray, and
        the old connection ends it once a new cluster answers at the address), so nothing
        more is asked of it: calls raise ClusterUnavailable, and ``on_lost``'s callbacks
        run. The server's ``workers.driver`` then replaces this whole process with a new
        driver, which joins the cluster when it answers (a local one: starts a new one)."""
        async with self._lock:
            if self._serve is None:
                return  # closed meanwhile
            self._serve = None
            self._down_since = time.time()
            self._collector = self._broker = None
            log.error("the Ray cluster (%s) is gone", self._address or "local")
        for callback in self._lost_callbacks:
            try:
                await callback()
            except Exception:
                log.exception("after the cluster went away")

    def _start(self) -> _Serve:
        # Ray ends a driver whose cluster is away for 60 s; this server waits for it.
        os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(GCS_PATIENCE_S))
        if not ray.is_initialized():
            # Workers' and actors' output stays in Ray's log files (the session dir's
            # logs/), not streamed to this process's stderr as plain text.
            if self._address:
                ray.init(address=self._address, logging_level=logging.WARNING, log_to_driver=False)
            else:
                self._start_local()
                self._owns_ray = True
        started = _Serve.start(self._http_host, self._http_port)
        options = started.details().http_options
        running = options.port if options is not None else None
        if running and running != self._http_port:
            # Serve has one HTTP proxy port per cluster, set by whoever started it: this
            # server answers with that one (its model URLs, every config it hands Serve).
            log.warning(
                "Serve already runs on this cluster with its HTTP proxy on port %d, not "
                "--http-port %d: using %d (give every server of a cluster the same port)",
                running,
                self._http_port,
                running,
            )
            self._http_port = running
        self._collector = _start_collector()
        _ray_logs_through_root()  # and any Ray logger that got its own handler since
        return started

    def _start_local(self) -> None:
        """A local Ray of this process's own. Its raylet sometimes fails to register within
        Ray's 30 s on a busy 2-core machine ("timed out during startup"): what was started
        is stopped, and it is tried once more before the error stands."""
        temp = _private_temp_dir(self._temp_dir) if self._temp_dir else None
        for attempt in (1, 2):
            # Ray's processes inherit the mask: their logs, sockets and spill files too.
            mask = os.umask(0o077)
            try:
                ray.init(
                    _temp_dir=str(temp) if temp else None,
                    num_cpus=int(self._num_cpus) if self._num_cpus >= 1 else 1,
                    num_gpus=int(self._num_gpus),
                    include_dashboard=False,
                    object_store_memory=OBJECT_STORE_MIB * MiB,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    _system_config={"metrics_report_interval_ms": METRICS_REPORT_MS},
                )
                return
            except Exception as e:
                ray.shutdown()  # the GCS and whatever else did start
                if attempt == 2 or "timed out during startup" not in str(e):
                    raise
                log.warning("the local Ray did not start (%s); starting it again", e)
            finally:
                os.umask(mask)

    async def close(self) -> None:
        if self._joining is not None:
            self._joining.cancel()
            await asyncio.gather(self._joining, return_exceptions=True)
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        if self._down_since is not None:
            # The cluster is gone: ray.shutdown (ours, or Ray's own at exit) would wait for
            # it for minutes. The process is stopping; Ray's leftovers go with it.
            atexit.unregister(ray.shutdown)
            log.warning("not waiting for the Ray cluster that is gone")
            return
        async with self._lock:
            if self._serve is None:
                return
            self._serve = None
            if self._owns_ray:
                await self._call(self._shutdown)

    @staticmethod
    def _shutdown() -> None:
        # The local cluster is ours: stopping it stops Serve's controller, proxy and
        # replicas with it (serve.shutdown() first would only wait on the controller).
        ray.shutdown()

    async def build(self, spec: BuildSpec) -> BuildOutcome:
        self._started()
        # The source goes with the task (Ray's object store), for a node that does not
        # see the data dir; one that does builds there (``remote_build``).
        try:
            source = await asyncio.to_thread(spec.source_zip.read_bytes)
        except OSError as e:
            return BuildOutcome(ok=False, error=f"cannot read the source: {e}")
        task = ray.remote(num_cpus=self._build_cpus, max_retries=0, num_returns="streaming")(
            build_streamed
        )
        # Submitting puts the source into the object store: a call that can hang while
        # the cluster goes away, so never on the event loop (the watchdog runs there).
        submitting = asyncio.ensure_future(self._call(task.remote, spec, source))
        try:
            stream = await asyncio.shield(submitting)
        except asyncio.CancelledError:  # cancelled while submitting: the task goes too
            with contextlib.suppress(Exception):
                ray.cancel(await submitting, force=False, recursive=True)
            raise
        running = asyncio.ensure_future(_streamed(spec, stream))
        running.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            result = await _result(asyncio.shield(running))
        except asyncio.CancelledError:
            # Interrupt the task (KeyboardInterrupt in the worker: the build's cleanup runs
            # and its staging folder goes), then wait a little for it to end.
            ray.cancel(stream, force=False, recursive=True)
            await asyncio.wait([running], timeout=10)
            if not running.done():  # stuck where no interrupt reaches: kill its worker
                log.warning("build %s did not stop when interrupted; killing it", spec.build_name)
                ray.cancel(stream, force=True)
            raise
        except ray.exceptions.RayError as e:  # the worker died, not the build's own failure
            if not self.available():  # with the cluster: the job waits for it, and runs again
                raise ClusterUnavailable(f"the build's worker went with the cluster: {e}") from e
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return BuildOutcome(ok=False, error=f"the build worker failed: {first}")
        return await asyncio.to_thread(keep, spec, result)

    async def runtime(self) -> Runtime:
        if self._runtime is None:
            self._started()
            # What a worker runs, asked of a worker (the driver may differ on a remote cluster).
            probe = ray.remote(num_cpus=0, max_retries=1)(current_runtime)
            ref = await self._call(probe.remote)
            self._runtime = await _result(asyncio.wrap_future(ref.future()))
        return self._runtime

    async def apply(self, apps: Sequence[AppSpec]) -> None:
        started = time.monotonic()
        # The look of the wait for Serve's builds just before, if any: at 50 applications
        # each look is 20-90 ms of the change's time here.
        looked, self._looked = self._looked, None
        if looked is not None and started - looked[0] <= LOOK_REUSE_S:
            running = looked[1]
        else:
            running = await self._applications()
        read_s = time.monotonic()
        kept = _others(running, {a.app_name for a in apps})
        archives = await asyncio.to_thread(self._archives, apps) if self._artifact_url else {}
        await self._hand_secrets(apps, archives)
        handed_s = time.monotonic()
        config = ServeDeploySchema.model_validate(
            {
                "http_options": {"host": self._http_host, "port": self._http_port},
                "applications": [
                    *(
                        _app_config(
                            a,
                            self._max_queued,
                            new=a.app_name not in running,
                            archive=archives.get(a.app_name),
                            path_on_nodes=self._shared_disk,
                        )
                        for a in apps
                    ),
                    *kept,
                ],
            }
        )
        await self._call(self._started().deploy, config)
        log.debug(
            "apply: %d applications; Serve's details read in %.0f ms, archives and secrets "
            "%.0f ms, config built and handed to Serve %.0f ms",
            len(apps) + len(kept),
            (read_s - started) * 1000,
            (handed_s - read_s) * 1000,
            (time.monotonic() - handed_s) * 1000,
        )

    async def _applications(self) -> Mapping[str, ApplicationDetails]:
        apps = (await self._call(self._started().details)).applications
        self._seen = (time.monotonic(), apps)
        return apps

    async def _look_after(self, moment: float) -> Mapping[str, ApplicationDetails]:
        """Serve's applications as a look that ended after ``moment`` saw them: the
        reconciler's (10 a second while a model changes) if one comes within
        BUILD_LOOK_S, else a look of its own. Each look at Serve's details is work for
        its controller, which is what builds the applications meanwhile."""
        deadline = time.monotonic() + BUILD_LOOK_S
        while time.monotonic() < deadline:
            at, apps = self._seen
            if at > moment:
                return apps
            await asyncio.sleep(BUILD_POLL_S)
        return await self._applications()

    async def until_built(self) -> int:
        """Waits (up to BUILD_WAIT_S) until Serve builds none of the model applications.
        Serve compares an application's code version only once its build is done: one
        handed over again while it builds has its build cancelled and started over,
        even unchanged (a change to one model would restart another's deploy; many at
        once, each apply restarting every build, keep all of them from starting). Called
        before an apply reads what it hands over, so that it carries every change
        committed meanwhile. Returns how many it waited for."""
        started = time.monotonic()
        applications = await self._applications()
        building = _building(applications)
        first = len(building)
        while building and time.monotonic() - started < BUILD_WAIT_S:
            applications = await self._look_after(time.monotonic())
            building = _building(applications)
        self._looked = (time.monotonic(), applications)
        if building:
            log.warning(
                "Serve still builds %s after %.0f s: the apply goes on (restarting it)",
                ", ".join(building),
                BUILD_WAIT_S,
            )
        elif first:
            log.debug(
                "apply: waited %.0f ms for Serve to build %d applications",
                (time.monotonic() - started) * 1000,
                first,
            )
        return first

    def _archives(self, apps: Sequence[AppSpec]) -> dict[str, tuple[str, str]]:
        """Each application's artifact as a node that does not see it fetches it: app ->
        (digest, SHA-256 of its archive), the archive made now if it has none yet."""
        out: dict[str, tuple[str, str]] = {}
        for a in apps:
            folder = Path(a.artifact_path)
            if folder.is_dir():
                out[a.app_name] = (folder.name, artifact_archive.pack(folder.parent, folder.name))
        return out

    async def _hand_secrets(
        self, apps: Sequence[AppSpec], archives: Mapping[str, tuple[str, str]]
    ) -> None:
        """Every application's secret values, and where its replicas fetch their build, to
        the broker, before Serve starts a replica that asks for them."""
        wanted = {a.app_name: (a.secrets_version, dict(a.secrets)) for a in apps if a.secrets}
        # A version without values: they could not be opened; what the broker has stays.
        keep = [a.app_name for a in apps if a.secrets_version and not a.secrets]
        sources = {
            app: (
                digest,
                f"{self._artifact_url}/artifacts/{digest}.tar",
                artifact_archive.token(self._artifact_key, digest),
            )
            for app, (digest, _) in archives.items()
        }
        if self._broker is None:  # none needed and none running: nothing to hand over
            find = _start_broker if wanted or sources else _running_broker
            self._broker = await self._call(find)
            if self._broker is None:
                return
        try:
            given = sources if self._artifact_url else None
            put = await self._call(self._broker.put.remote, wanted, keep, given)
            await _result(asyncio.wrap_future(put.future()))
        except Exception:
            self._broker = None  # gone with its node or with Ray: started again next time
            raise

    async def observe(self) -> Mapping[str, AppObservation]:
        apps = await self._applications()
        cluster: Mapping[str, float] = {}
        lost: frozenset[str] = frozenset()
        if apps:
            # Read at most every CLUSTER_FACTS_S: a look every 0.1 s while a model changes
            # would read the node table from the GCS each time (a quarter of this
            # process's time with 50 models idle).
            if time.monotonic() - self._facts_at >= CLUSTER_FACTS_S:
                self._facts = await self._call(_cluster_facts)
                self._facts_at = time.monotonic()
            cluster, lost = self._facts
        # An application whose parsed details are the same object as at the last look
        # (_Serve.details parses only what changed), under the same cluster facts, keeps
        # its observation object: what is sent on is only what changed (observations.py).
        kept, self._observed = self._observed, {}
        for name, app in apps.items():
            was = kept.get(name)
            if was is None or was[0] is not app or was[1] is not self._facts:
                was = (app, self._facts, replace(_observation(name, app, cluster), lost_nodes=lost))
            self._observed[name] = was
        return {name: obs for name, (_, _, obs) in self._observed.items()}

    async def nodes(self) -> Sequence[NodeResources]:
        started = self._started()
        await self._call(started.details)  # and so what replicas are stopping now
        return await self._call(_nodes, started.releasing.held())

    async def signals(self, epoch: str, cursor: int) -> Batch:
        """The replicas' reports after ``cursor`` (workers.signals.Collector.read) and what
        Serve's proxies on every node say of requests they refused or queue."""
        self._started()
        if self._collector is None:
            self._collector = await self._call(_start_collector)
        try:
            ref = await self._call(self._collector.read.remote, epoch, cursor)
            batch: Batch = await _result(asyncio.wrap_future(ref.future()))
        except Exception:
            # Gone with its node, or Ray itself restarted: found or started again (a new
            # one has a new epoch, and readers start over) at the next reading.
            self._collector = None
            raise
        proxies: list[ProxyFigures] = []
        now = time.monotonic()
        if self._proxy_pace.due(now, batch.replicas):
            proxies = await self._call(self._proxy_figures)
            self._proxy_pace.read(now, proxies)
        return replace(batch, proxies=tuple(proxies))

    def _proxy_figures(self) -> list[ProxyFigures]:
        now = time.monotonic()
        if now - self._metrics_ports_at > 10 or not self._metrics_ports:
            self._metrics_ports = [
                f"http://{n.address}:{n.metrics_port}/metrics"
                for n in _node_table()
                if n.alive and n.metrics_port
            ]
            self._metrics_ports_at = now
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for url in self._metrics_ports:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                continue  # a node going away; its proxy's figures return with it or never
            for line in text.splitlines():
                if line.startswith(PROXY_METRICS):
                    name, labels, value = _sample(line)
                    samples.setdefault(name, []).append((labels, value))
        return proxy_figures(samples)


def _sample(line: str) -> tuple[str, dict[str, str], float]:
    """One Prometheus text sample: ``name{a="x",b="y"} 3.0``."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(line + "\n"):
        for sample in family.samples:
            return sample.name, dict(sample.labels), float(sample.value)
    return "", {}, 0.0


def _start_collector() -> Any:
    """The cluster's collector: found where it runs, or started (detached, no CPU)."""
    return _detached(Collector, COLLECTOR)


def _detached(cls: type, name: str, *args: Any) -> Any:
    """The cluster's actor ``name`` of ours: found where it runs, or started (detached,
    no CPU, started again wherever it can be when its node goes)."""
    actor: Any = ray.remote(cls).options(
        name=name,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
    )
    return actor.remote(*args)
