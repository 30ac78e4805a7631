"""`modelctl serve`: run the control plane until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
import uuid
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane import logs, tracing
from controlplane.config import DATABASE, DEFAULT_DATA_DIR, STORES, MiB, Settings, default
from controlplane.domain.health import HealthRules
from controlplane.storage.secretbox import SecretKeyError

if TYPE_CHECKING:
    from controlplane.console.web import ConsoleServer

CONSOLE_PORT = 8070


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every default is Settings' own (config.default), shown by --help."""
    p.add_argument(
        "--grpc-port",
        type=int,
        default=default("grpc_port"),
        help="gRPC port (0: any free port; default: %(default)s)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=default("http_port"),
        help="HTTP port of the model endpoints (default: %(default)s)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="this server's files: the SQLite database (without --database-url), uploaded "
        "sources, build artifacts (replicas load them from here), build logs, the first "
        "admin token (admin.token), exports' scratch folders, the secret values' key "
        "(secrets.key) and, for a local Ray, Ray's own files (ray/) (default: %(default)s)",
    )
    p.add_argument(
        "--database-url",
        default=default("database_url"),
        help="e.g. postgresql+psycopg://user@host:5432/db (default: SQLite in DIR)",
    )
    p.add_argument(
        "--ray-address",
        default=default("ray_address"),
        help="an existing Ray cluster (default: start a local one)",
    )
    p.add_argument(
        "--num-cpus",
        type=float,
        default=default("num_cpus"),
        help="logical CPUs of the local Ray (default: %(default)s)",
    )
    p.add_argument(
        "--num-gpus",
        type=float,
        default=default("num_gpus"),
        help="logical GPUs of the local Ray (GPU placement works without GPUs; "
        "default: %(default)s)",
    )
    p.add_argument(
        "--host",
        default=default("grpc_host"),
        help="address gRPC and HTTP listen on (default: %(default)s)",
    )
    p.add_argument(
        "--deploy-timeout",
        "--startup-timeout",
        dest="deploy_timeout",
        type=float,
        default=default("deploy_timeout_s"),
        help="seconds a rollout's replicas may take to all run (placed but never healthy) "
        "before it FAILS (STARTUP_TIMEOUT) and the model goes back to its last good "
        "deployment (default: %(default)s)",
    )
    p.add_argument(
        "--placement-timeout",
        type=float,
        default=default("placement_timeout_s"),
        help="seconds a rollout may wait for replicas that cannot be placed (more GPUs or "
        "CPUs than the cluster has) before it FAILS (PLACEMENT_TIMEOUT) (default: %(default)s)",
    )
    p.add_argument(
        "--build-timeout",
        type=float,
        default=default("build_timeout_s"),
        help="seconds a build may take, waiting for the cluster included (default: %(default)s)",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=default("max_queued_requests"),
        help="requests Serve queues per model (on each proxy) while every replica is busy; "
        "more are refused with HTTP 503 and counted as refused (GetModelMetrics, health). "
        "-1: no limit, requests wait (default: %(default)s)",
    )
    p.add_argument(
        "--health-rules",
        type=Path,
        default=None,
        help="a JSON file of the health rules' thresholds (docs/metrics.md), e.g. "
        '{"error_ratio": 0.02, "idle_ratio": 0.05}; unnamed ones keep their defaults',
    )
    p.add_argument(
        "--build-cpus",
        type=float,
        default=default("build_cpus"),
        help="CPUs a build task reserves on the cluster (builds of different models run "
        "at once while CPUs are free; default: %(default)s)",
    )
    p.add_argument(
        "--build-max-mib",
        type=int,
        default=default("build_max_bytes") // MiB,
        help="size limit of a build: its code and installed requirements (default: %(default)s)",
    )
    p.add_argument(
        "--max-source-mib",
        type=int,
        default=default("max_source_bytes") // MiB,
        help="upload size limit (default: %(default)s)",
    )
    p.add_argument(
        "--max-unpacked-mib",
        type=int,
        default=default("max_unpacked_bytes") // MiB,
        help="size limit of an upload's files once unpacked (default: %(default)s)",
    )
    p.add_argument(
        "--gc-interval",
        type=float,
        default=default("gc_interval_s"),
        help="seconds between collections of unused build artifacts (0: never; "
        "default: %(default)s)",
    )
    p.add_argument(
        "--gc-keep-builds",
        type=int,
        default=default("gc_keep_builds"),
        help="artifacts of each model's newest N builds are kept (and of every deployed "
        "build; default: %(default)s)",
    )
    p.add_argument(
        "--gc-min-age",
        type=float,
        default=default("gc_min_age_s"),
        help="an artifact is removed only after it was unused this many seconds "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--server-id",
        default=default("server_id"),
        help="stable name of this server (e.g. its pod): restarted with the same id it takes "
        "its unfinished jobs back at once; others wait for their lease (default: random)",
    )
    p.add_argument(
        "--job-lease",
        type=float,
        default=default("job_lease_s"),
        help="seconds a running job's lease lasts without renewal before another server "
        "takes it over (default: %(default)s)",
    )
    t = p.add_argument_group("security (docs/security.md)")
    t.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="no tokens for RPCs and no keys for model endpoints: anyone who reaches the "
        "ports is an admin (local demos only)",
    )
    t.add_argument("--tls-cert", type=Path, help="serve gRPC over TLS with this certificate (PEM)")
    t.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    t.add_argument(
        "--tls-client-ca",
        type=Path,
        help="mutual TLS: accept only clients whose certificate this CA (PEM) signed",
    )
    c = p.add_argument_group("a Ray cluster whose nodes do not share this disk")
    c.add_argument(
        "--artifact-port",
        type=int,
        default=default("artifact_port"),
        help="serve builds to Ray nodes that do not see --data-dir, by content hash, at "
        "http://ARTIFACT_HOST:PORT/artifacts/ (0: any free port; default: off, every node "
        "reads the artifact folder itself: one machine, or a shared disk)",
    )
    c.add_argument(
        "--artifact-host",
        default=default("artifact_host"),
        help="the address the artifact port listens on (default: %(default)s; 0.0.0.0 "
        "for nodes on other machines)",
    )
    c.add_argument(
        "--artifact-url",
        default=default("artifact_url"),
        help="the artifact port's URL as Ray's nodes reach it, e.g. http://10.0.0.5:8071 "
        "(default: http://ARTIFACT_HOST:PORT)",
    )
    c.add_argument(
        "--artifact-store",
        choices=STORES,
        default=default("artifact_store"),
        help="where uploads, builds and build logs are kept for the other servers of this "
        "database: disk (each server's --data-dir: one server, or several on one shared "
        "volume) or database (servers that share no disk: each fetches what another "
        "made; needs --artifact-port with the Ray backend; default: %(default)s)",
    )
    o = p.add_argument_group("observability (docs/operators.md)")
    o.add_argument(
        "--metrics-port",
        type=int,
        default=default("metrics_port"),
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; "
        "default: off)",
    )
    o.add_argument(
        "--otlp-endpoint",
        default=tracing.endpoint_from_env(),
        help="send OpenTelemetry traces (OTLP over HTTP) here, e.g. "
        "http://127.0.0.1:4318/v1/traces (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_ENDPOINT if set; else no tracing)",
    )
    o.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one object per line, with the model, operation, RPC and trace id",
    )
    o.add_argument(
        "--log-level",
        choices=("debug", "info", "warning"),
        default="info",
        help="debug adds, for a model that changes, each reconciler look (what Serve says "
        "of its replicas) and each apply's steps: the timeline of a slow change "
        "(default: %(default)s)",
    )
    c = p.add_argument_group("web console (docs/console.md)")
    c.add_argument(
        "--console-port",
        type=int,
        default=CONSOLE_PORT,
        help="port of the web console (0: any free port; -1: no console; default: %(default)s)",
    )
    c.add_argument(
        "--console-ca-file",
        type=Path,
        default=None,
        help="under TLS: the CA the console trusts when it calls this server's gRPC port "
        "(default: --tls-cert itself, enough for a self-signed certificate or a file "
        "holding the whole chain)",
    )
    c.add_argument(
        "--console-host",
        default="127.0.0.1",
        help="address the console listens on (default: %(default)s, this machine only)",
    )
    p.add_argument(
        "--backend", choices=("ray", "fake"), default=default("backend"), help=argparse.SUPPRESS
    )  # fake: development and fast tests only


def flags_problem(args: argparse.Namespace) -> str:
    """What is wrong with the TLS flags, or with the artifact store's ("" when nothing)."""
    if args.artifact_store == DATABASE and args.artifact_port is None and args.backend == "ray":
        return (
            "--artifact-store database needs --artifact-port: servers that share no disk "
            "share none with Ray's nodes either, which fetch their builds from it"
        )
    if (args.tls_cert is None) != (args.tls_key is None):
        return "--tls-cert and --tls-key go together"
    if args.tls_client_ca is not None and args.tls_cert is None:
        return "--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)"
    for flag in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            return f"--{flag.replace('_', '-')} {path}: no such file"
    return ""


def health_rules(path: Path | None) -> HealthRules:
    """The rules in ``path`` (JSON), or the defaults; a bad file stops the server, saying why."""
    if path is None:
        return HealthRules()
    try:
        given = json.loads(path.read_text())
        if not isinstance(given, dict):
            raise ValueError("it must hold one JSON object")
        known = {f.name for f in fields(HealthRules)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown rules {unknown}; known: {sorted(known)}")
        return HealthRules(**given)
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"modelctl serve: --health-rules {path}: {e}") from e


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        data_dir=args.data_dir.resolve(),
        grpc_host=args.host,
        grpc_port=args.grpc_port,
        http_host=args.host,
        http_port=args.http_port,
        database_url=args.database_url,
        ray_address=args.ray_address,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        backend=args.backend,
        deploy_timeout_s=args.deploy_timeout,
        placement_timeout_s=args.placement_timeout,
        build_timeout_s=args.build_timeout,
        build_max_bytes=args.build_max_mib * MiB,
        max_unpacked_bytes=args.max_unpacked_mib * MiB,
        build_cpus=args.build_cpus,
        max_queued_requests=args.max_queued_requests,
        health_rules=health_rules(args.health_rules),
        gc_interval_s=args.gc_interval,
        gc_keep_builds=args.gc_keep_builds,
        gc_min_age_s=args.gc_min_age,
        max_source_bytes=args.max_source_mib * MiB,
        server_id=args.server_id or f"cp-{uuid.uuid4().hex[:12]}",
        job_lease_s=args.job_lease,
        metrics_port=args.metrics_port,
        metrics_host=args.host,
        artifact_port=args.artifact_port,
        artifact_host=args.artifact_host,
        artifact_url=args.artifact_url,
        artifact_store=args.artifact_store,
        otlp_endpoint=args.otlp_endpoint,
        insecure_no_auth=args.insecure_no_auth,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
    )


def console_for(
    settings: Settings, grpc_address: str, host: str, port: int, ca: Path | None = None
) -> ConsoleServer:
    """The console in this process: a client of this server's own gRPC port, over TLS
    when the server has TLS (trusting ``ca``, default the server's certificate), and then
    served as HTTPS with that certificate too."""
    from controlplane.api.client import Client
    from controlplane.console.web import ConsoleServer

    _, _, grpc_port = grpc_address.rpartition(":")
    local = settings.grpc_host if settings.grpc_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    target = f"{local}:{grpc_port}"
    tls = (str(ca or settings.tls_cert), None, None) if settings.tls_cert else None
    cert = (settings.tls_cert, settings.tls_key) if settings.tls_cert and settings.tls_key else None
    return ConsoleServer(
        lambda token: Client(target, tls=tls, token=token), host, port, target, tls=cert
    )


async def serve(
    settings: Settings,
    console_host: str = "",
    console_port: int = -1,
    console_ca: Path | None = None,
) -> int:
    from controlplane.server import Server

    server = Server(settings)
    stop = asyncio.Event()
    await server.start()
    console = None
    if console_port >= 0:
        if settings.tls_client_ca is not None:
            logging.getLogger(__name__).warning(
                "no console in this process under mutual TLS (it has no client "
                "certificate): run `modelctl console --client-cert ...` apart"
            )
        else:
            console = console_for(
                settings, server.grpc_address, console_host, console_port, console_ca
            )
            try:
                await console.start()
            except OSError as e:
                await server.stop()
                print(f"modelctl serve: error: {e.strerror or e}", file=sys.stderr)
                return 1
    # SIGTERM and SIGINT drain in-flight RPCs and stop Ray's driver (and a local Ray) in
    # order, exiting 0.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    freeze_startup_heap()
    metrics = f" metrics={server.metrics_address}" if server.metrics_address else ""
    web = f" console={console.address}" if console else ""
    print(f"ready grpc={server.grpc_address} http={server.http_address}{metrics}{web}", flush=True)
    await stop.wait()
    logging.getLogger(__name__).info("shutting down: draining in-flight RPCs")
    if console is not None:
        await console.stop()
    await server.stop()
    return 0


def freeze_startup_heap() -> None:
    """Moves what the server holds once started (modules, the ORM's mappings, gRPC's and
    Ray's clients: well over a million objects) out of the cyclic collector's sight.
    They live as long as the process, and every full collection would walk them all again:
    under a thousand streams' fan-out, that walk was a sixth of the server's CPU."""
    gc.collect()
    gc.freeze()


def run(args: argparse.Namespace) -> int:
    problem = flags_problem(args)
    if problem:
        print(f"modelctl serve: error: {problem}", file=sys.stderr)
        return 2
    settings = settings_from(args)
    logs.setup(args.log_format, settings.server_id, getattr(logging, args.log_level.upper()))
    try:
        code = asyncio.run(
            serve(settings, args.console_host, args.console_port, args.console_ca_file)
        )
    except SecretKeyError as e:  # a key file others can read, a bad MODELCTL_SECRET_KEYS
        print(f"modelctl serve: error: {e}", file=sys.stderr)
        return 1
    return code
