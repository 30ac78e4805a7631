"""`modelctl`: parse the command line, run one command, map failures to exit codes.

Exit codes: 0 done; 1 the operation failed or the server refused (the reason is
printed); 2 bad usage or not confirmed; 3 the server cannot be reached, or with --dry-run
the change does not fit the cluster (the plan says why); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from controlplane import config, local_cmd, serve_cmd
from controlplane.api.client import Client, ClientError
from controlplane.cli import commands as cmd
from controlplane.cli import inputs
from controlplane.cli.inputs import UsageError
from controlplane.cli.output import Printer, seconds
from controlplane.domain import scaling
from controlplane.domain.access import Role

EXIT_UNREACHABLE = 3
# `modelctl serve`'s gRPC address when started without --host and --grpc-port.
SERVE_ADDRESS = f"{config.default('grpc_host')}:{config.default('grpc_port')}"
Handler = Callable[[Client, argparse.Namespace, Printer], Awaitable[int]]


def _add_resources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources (re-deploys keep the active deployment's when not given)")
    g.add_argument(
        "--replicas", type=int, help="number of replicas (with autoscaling: to start with)"
    )
    g.add_argument("--cpus", type=float, help="CPUs per replica (e.g. 0.5)")
    g.add_argument("--memory", help="memory per replica (e.g. 512MiB, 2GiB)")
    g.add_argument("--gpus", type=float, help="GPUs per replica (fractions allowed)")
    g.add_argument("--env", action="append", metavar="NAME=VALUE", help="environment (repeat)")
    g.add_argument(
        "--secret-env",
        action="append",
        metavar="NAME=VALUE",
        help="environment for the replicas only, never shown again (repeat; re-deploys keep "
        "the active deployment's secrets when none is given)",
    )
    a = p.add_argument_group(
        "autoscaling (any of these turns it on, and needs --max-replicas; re-deploys keep "
        "the active deployment's when none is given)"
    )
    a.add_argument("--min-replicas", type=int, metavar="N", help="fewest replicas (1; 0 allowed)")
    a.add_argument("--max-replicas", type=int, metavar="N", help="most replicas")
    a.add_argument(
        "--target-ongoing-requests",
        type=float,
        metavar="X",
        help=f"requests in flight per replica it aims at ({scaling.DEFAULT_TARGET:g})",
    )
    a.add_argument(
        "--upscale-delay",
        metavar="DUR",
        help="load above the target this long adds replicas "
        f"({seconds(scaling.DEFAULT_UPSCALE_DELAY_S)})",
    )
    a.add_argument(
        "--downscale-delay",
        metavar="DUR",
        help="load below the target this long removes replicas "
        f"({seconds(scaling.DEFAULT_DOWNSCALE_DELAY_S)})",
    )
    a.add_argument(
        "--no-autoscaling",
        action="store_true",
        help="back to a fixed count: --replicas (default: as many as it starts with now)",
    )


_DRY_RUN_HELP = (
    "only show the plan: the change class and its causes, the replicas kept, replaced, "
    "removed and added, and whether the cluster has room; nothing changes. Exit code 0 when "
    f"it fits, {cmd.EXIT_NO_ROOM} when it does not"
)


def _add_capacity(p: argparse.ArgumentParser, wait: bool = True, note: str = "") -> None:
    p.add_argument("--dry-run", action="store_true", help=_DRY_RUN_HELP + note)
    if wait:
        p.add_argument(
            "--wait-for-capacity",
            action="store_true",
            help="start it even when the cluster has no room now (refused otherwise): its "
            "replicas wait for room until the server's placement deadline",
        )


def _add_rollout(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "rollout (default: at once): a canary takes a growing share of requests, a shadow a "
        "copy of them; each step is judged on the gates and rolled back when one fails"
    )
    g.add_argument("--canary", metavar="STEPS", help="percent at each step, e.g. 10,50,100")
    g.add_argument("--bake", default="60s", help="how long each canary step runs (60s)")
    g.add_argument("--shadow", type=int, metavar="PERCENT", help="copy this share of requests")
    g.add_argument("--shadow-for", default="60s", help="how long the shadow runs (60s)")
    g.add_argument("--max-error-rate", help="gate: e.g. 1%% (model errors and 5xx)")
    g.add_argument("--max-p99", help="gate: e.g. 250ms")
    g.add_argument("--max-p99-ratio", type=float, help="gate: p99 against the serving build's")
    g.add_argument(
        "--min-requests", type=int, default=20, help="answered before a step is judged (20)"
    )


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=float, default=900.0, help="seconds to follow (default 900)")


def _common(defaults: bool) -> argparse.ArgumentParser:
    """--server, --project, --output: before the command (with defaults) or after it."""
    p = argparse.ArgumentParser(add_help=False)

    def default(value: str) -> str:
        return value if defaults else argparse.SUPPRESS

    p.add_argument(
        "--server",
        default=default(os.environ.get("MODELCTL_SERVER", SERVE_ADDRESS)),
        help=f"gRPC address of `modelctl serve` (env MODELCTL_SERVER; default {SERVE_ADDRESS})",
    )
    p.add_argument(
        "--project",
        default=default(os.environ.get("MODELCTL_PROJECT", "default")),
        help="project of bare model ids (env MODELCTL_PROJECT; default 'default')",
    )
    p.add_argument("--output", "-o", choices=("table", "json"), default=default("table"))
    p.add_argument(
        "--token",
        default=default(os.environ.get("MODELCTL_TOKEN", "")),
        help="bearer token (env MODELCTL_TOKEN; else --token-file)",
    )
    p.add_argument(
        "--token-file",
        default=default(os.environ.get("MODELCTL_TOKEN_FILE", "")),
        help="file holding the token (env MODELCTL_TOKEN_FILE; default .modelctl/admin.token, "
        "what `modelctl serve` writes at its first start, when it exists)",
    )
    tls = (
        ("--ca-file", "MODELCTL_CA_FILE", "use TLS, trusting this CA (PEM)"),
        ("--client-cert", "MODELCTL_CLIENT_CERT", "mutual TLS: this client's certificate"),
        ("--client-key", "MODELCTL_CLIENT_KEY", "mutual TLS: the certificate's key"),
    )
    for flag, env, text in tls:
        p.add_argument(flag, default=default(os.environ.get(env, "")), help=f"{text} (env {env})")
    return p


_AFTER = _common(defaults=False)


def _sub(
    parent: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: Handler | None,
    help_text: str,
) -> argparse.ArgumentParser:
    parents = [_AFTER] if handler is not None else []
    p = parent.add_parser(name, help=help_text, description=help_text, parents=parents)
    if handler is not None:
        p.set_defaults(handler=handler)
    return p


def _resource_group(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    list_handler: Handler,
    get_handler: Handler,
    what: str,
    more: str = "",
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    group = _sub(sub, name, None, f"list and show a model's {what}")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="{list,get" + more + "}")
    ls = _sub(verbs, "list", list_handler, f"a model's {what}, newest first")
    ls.add_argument("model")
    ls.add_argument("--limit", type=int, default=50)
    get = _sub(verbs, "get", get_handler, f"one of a model's {what}")
    get.add_argument("model")
    get.add_argument("ref", help="its number (3) or full name")
    return verbs


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="modelctl",
        description="Control plane for models served on Ray Serve: build, deploy, scale, "
        "roll back, stop, restart, watch.",
        parents=[_common(defaults=True)],
    )
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _sub(sub, "serve", None, "run the control plane server")
    serve_cmd.add_arguments(serve)
    local_cmd.add_secrets(sub)
    local_cmd.add_backup(sub)

    console = sub.add_parser(
        "console",
        parents=[_AFTER],
        help="run the web console apart, as a client of --server",
        description="The web console on its own (`modelctl serve` runs one too, on "
        "--console-port): a client of the gRPC API at --server; people sign in with their "
        "own API tokens. --ca-file, --client-cert and --client-key reach a TLS server.",
    )
    console.add_argument("--port", type=int, default=8070, help="(0: any free port)")
    console.add_argument("--host", default="127.0.0.1", help="address to listen on")
    console.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate")
    console.add_argument("--tls-key", type=Path, help="the certificate's private key")

    models = _sub(sub, "models", None, "create, list, show, delete models")
    verbs = models.add_subparsers(dest="verb", required=True, metavar="{create,list,get,delete}")
    create = _sub(verbs, "create", cmd.models_create, "create a model (a name for an endpoint)")
    create.add_argument("model", help="model id: lowercase letters, digits, '-'")
    create.add_argument("--display-name", default="")
    create.add_argument("--description", default="")
    _sub(verbs, "list", cmd.models_list, "the project's models")
    _sub(verbs, "get", cmd.models_get, "one model").add_argument("model")
    delete = _sub(verbs, "delete", cmd.models_delete, "delete a model that is not active")
    delete.add_argument("model")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask to confirm")

    b = _sub(sub, "build", cmd.build, "upload DIR, build it, and with --deploy deploy it")
    b.add_argument("directory", metavar="DIR", help="the model's code (zipped and uploaded)")
    b.add_argument("--model", "-m", required=True, help="model id or full name")
    b.add_argument("--file", required=True, help="the Python file, relative to DIR")
    b.add_argument("--function", required=True, help="the function called for each request")
    b.add_argument("--comment", default="")
    b.add_argument("--deploy", action="store_true", help="deploy the build once built")
    b.add_argument(
        "--no-cache",
        action="store_true",
        help="build even if these inputs were built before (to resolve requirements again)",
    )
    b.add_argument("--quiet", "-q", action="store_true", help="do not show the build's log")
    _add_resources(b)
    _add_capacity(b, note=" (with --deploy: the deploy's plan; the source is uploaded, not built)")
    _add_wait(b)

    d = _sub(sub, "deploy", cmd.deploy, "re-deploy a build: new resources, or roll back")
    d.add_argument("model")
    d.add_argument("--build", required=True, help="build number (3) or full name")
    _add_resources(d)
    _add_rollout(d)
    _add_capacity(d)
    _add_wait(d)

    tr = _sub(
        sub,
        "traffic",
        cmd.traffic,
        "split a model's requests between two builds (4=90 5=10), end a split (4=100), or "
        "show the split (no weights)",
    )
    tr.add_argument("model")
    tr.add_argument("weights", nargs="*", metavar="BUILD=PERCENT")
    tr.add_argument(
        "--sticky-header", default="", help="requests with the same value of it: same build"
    )
    _add_wait(tr)
    for name, handler, text in (
        ("promote", cmd.promote, "the running canary's or shadow's build takes over now"),
        ("abort", cmd.abort, "cancel the running operation (a canary: all traffic back)"),
    ):
        p = _sub(sub, name, handler, text)
        p.add_argument("model")
        _add_wait(p)

    for name, handler, text in (
        ("stop", cmd.stop, "stop every replica; the endpoint stops answering"),
        ("restart", cmd.restart, "replace every replica (same build and resources)"),
    ):
        p = _sub(sub, name, handler, text)
        p.add_argument("model")
        p.add_argument("--yes", "-y", action="store_true", help="do not ask to confirm")
        _add_capacity(p, wait=name == "restart")
        _add_wait(p)

    verbs = _resource_group(
        sub, "builds", cmd.builds_list, cmd.builds_get, "builds", ",logs,export"
    )
    logs = _sub(verbs, "logs", cmd.builds_logs, "a build's log (with --follow, live)")
    logs.add_argument("model")
    logs.add_argument("ref", help="its number (3) or full name")
    logs.add_argument("--follow", "-f", action="store_true", help="until the build ends")
    export = _sub(
        verbs,
        "export",
        cmd.builds_export,
        "write a build as an OCI image layout (also: modelctl build export MODEL BUILD --oci DIR)",
    )
    export.add_argument("model")
    export.add_argument("ref", help="its number (3) or full name")
    export.add_argument("--oci", required=True, metavar="DIR", help="the layout's directory")
    export.add_argument(
        "--base",
        default="",
        help="base image (default: python:<the build's Python>-slim; 'scratch': none)",
    )
    export.add_argument("--tag", default="latest", help="reference name inside the layout")
    _resource_group(sub, "deployments", cmd.deployments_list, cmd.deployments_get, "deployments")
    ops = _sub(sub, "operations", None, "list and show operations")
    verbs = ops.add_subparsers(dest="verb", required=True, metavar="{list,get}")
    ls = _sub(verbs, "list", cmd.operations_list, "a model's operations, newest first")
    ls.add_argument("model")
    ls.add_argument("--limit", type=int, default=50)
    _sub(verbs, "get", cmd.operations_get, "one operation").add_argument("name")

    tok = _sub(sub, "tokens", None, "access tokens (admins): create, list, revoke")
    verbs = tok.add_subparsers(dest="verb", required=True, metavar="{create,list,revoke}")
    create = _sub(verbs, "create", cmd.tokens_create, "a new token; its secret is shown once")
    create.add_argument(
        "--role", required=True, choices=[r.label for r in Role], help="what it may do"
    )
    create.add_argument(
        "--all-projects", action="store_true", help="valid in every project, not --project's"
    )
    create.add_argument("--ttl", default="", help="expires after e.g. 3600s, 90m, 12h, 30d")
    create.add_argument("--description", default="")
    ls = _sub(verbs, "list", cmd.tokens_list, "--project's tokens (never their secrets)")
    ls.add_argument("--all-projects", action="store_true", help="the every-project tokens")
    ls.add_argument("--limit", type=int, default=50)
    _sub(verbs, "revoke", cmd.tokens_revoke, "stop a token working").add_argument("name")
    keys = _sub(sub, "keys", None, "invocation keys of a model's endpoint")
    verbs = keys.add_subparsers(dest="verb", required=True, metavar="{create,list,revoke}")
    create = _sub(verbs, "create", cmd.keys_create, "a new key; its secret is shown once")
    create.add_argument("model")
    create.add_argument("--description", default="")
    ls = _sub(verbs, "list", cmd.keys_list, "a model's keys (never their secrets)")
    ls.add_argument("model")
    ls.add_argument("--limit", type=int, default=50)
    _sub(verbs, "revoke", cmd.keys_revoke, "stop a key working").add_argument("name")
    audit = _sub(sub, "audit", cmd.audit_list, "who changed what (admins), newest first")
    audit.add_argument("--all-projects", action="store_true", help="every project's records")
    audit.add_argument("--limit", type=int, default=50)

    w = _sub(
        sub,
        "watch",
        cmd.watch,
        "follow a model's (or, without MODEL, every model of --project's) state and every "
        "change, live",
    )
    w.add_argument("model", nargs="?", default="")
    w.add_argument(
        "--filter", default="", help="with no MODEL: e.g. 'kind=model model=iris' (all must hold)"
    )
    w.add_argument("--since", type=int, default=0, help="resume after this revision")
    w.add_argument("--count", type=int, default=0, help="stop after this many events")

    lg = _sub(
        sub,
        "logs",
        cmd.logs,
        "a model's replicas' output and access lines, from every replica, gone ones too "
        "(with --follow, live)",
    )
    lg.add_argument("model")
    lg.add_argument("--replica", default="", help="only this replica's lines (its id)")
    lg.add_argument("--build", default="", help="only this build's lines: its number or name")
    lg.add_argument(
        "--since", default="", help="only lines since: 10m or 2h ago, or a time 2025-01-31T12:00"
    )
    lg.add_argument("--tail", type=int, default=0, help="only the last N lines (0: all kept)")
    lg.add_argument("--follow", "-f", action="store_true", help="then each new line, live")

    m = _sub(
        sub,
        "metrics",
        cmd.metrics,
        "a model's requests, errors, latency, CPU, memory and GPU: in all, per build and per "
        "replica, with its health",
    )
    m.add_argument("model")
    m.add_argument("--window", default="1h", help="how far back: 10s to 1h (default 1h)")
    m.add_argument(
        "--step",
        default="",
        help="each point's length, a multiple of 10s (default 1m, or the window when shorter)",
    )

    t = _sub(
        sub,
        "top",
        cmd.top,
        "every model of --project: state, health, and the last minute's requests/s, errors, "
        "refused, p99, CPU and replicas, refreshed until Ctrl-C",
    )
    t.add_argument("--interval", default="2s", help="refresh every (default 2s)")
    t.add_argument("--once", action="store_true", help="print one table and exit")
    return root


async def run(argv: Sequence[str]) -> int:
    """Runs one client command (not `serve`) in the running event loop; returns the exit code."""
    args = parser().parse_args(_aliases(list(argv)))
    handler: Handler = args.handler
    tls = (args.ca_file, args.client_cert, args.client_key)
    try:
        token = inputs.token(args.token, args.token_file)
        client = Client(args.server, tls=tls if any(tls) else None, token=token)
    except (ValueError, UsageError) as e:  # unreadable CA, certificate, key or token file
        print(f"modelctl: {e}", file=sys.stderr)
        return cmd.EXIT_USAGE
    try:
        async with client:
            return await handler(client, args, Printer(args.output))
    except UsageError as e:
        print(f"modelctl: {e}", file=sys.stderr)
        return cmd.EXIT_USAGE
    except ClientError as e:
        if e.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and not e.reason:
            print(f"modelctl: cannot reach {args.server}: {e.message}", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"modelctl: {e}", file=sys.stderr)
        for field, description in e.violations:
            print(f"  {field}: {description}", file=sys.stderr)
        if e.reason == "INSUFFICIENT_CAPACITY":
            print(
                "  (--dry-run shows the plan; --wait-for-capacity starts it anyway)",
                file=sys.stderr,
            )
        return cmd.EXIT_FAILED
    except TimeoutError as e:
        print(f"modelctl: {e} (it goes on; see `modelctl operations get`)", file=sys.stderr)
        return cmd.EXIT_FAILED


def _aliases(argv: list[str]) -> list[str]:
    """``build export MODEL BUILD --oci DIR`` is ``builds export``: ``build`` itself takes a
    directory, so the export is told apart by its ``--oci``."""
    for i, word in enumerate(argv[:-1]):
        if word == "build" and argv[i + 1] == "export" and "--oci" in argv[i + 2 :]:
            return [*argv[:i], "builds", *argv[i + 1 :]]
    return argv


def _console(args: argparse.Namespace) -> int:
    from controlplane.console.web import run_apart

    if (args.tls_cert is None) != (args.tls_key is None):
        print("modelctl console: error: --tls-cert and --tls-key go together", file=sys.stderr)
        return cmd.EXIT_USAGE
    tls = (args.ca_file, args.client_cert, args.client_key)
    cert = (args.tls_cert, args.tls_key) if args.tls_cert else None
    try:
        return asyncio.run(
            run_apart(args.server, args.host, args.port, tls if any(tls) else None, cert)
        )
    except OSError as e:
        print(f"modelctl console: error: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = _aliases(list(sys.argv[1:] if argv is None else argv))
    args = parser().parse_args(argv)  # usage errors exit 2 here, with argparse's message
    if args.command == "serve":
        return serve_cmd.run(args)
    if args.command == "console":
        return _console(args)
    if args.command == "secrets":
        return local_cmd.secrets_rotate(args)
    if args.command == "backup":
        return local_cmd.run_backup(args)
    if args.command == "restore":
        return local_cmd.run_restore(args)
    try:
        return asyncio.run(run(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
