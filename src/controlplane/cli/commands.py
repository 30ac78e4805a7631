"""What each `modelctl` command does, on the typed client. Each returns an exit code."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime
from pathlib import Path

from controlplane.api.client import Client, ClientError
from controlplane.cli import inputs
from controlplane.cli.output import (
    Printer,
    TopRow,
    plan_text,
    resources,
    seconds,
    short,
    traffic_text,
    when,
)
from controlplane.domain.access import Role
from controlplane.domain.scaling import Autoscaling
from controlplane.domain.traffic import Gates, Strategy, StrategyKind
from controlplane.domain.types import DeployOptions, Model, Operation, Resources

EXIT_OK = 0
EXIT_FAILED = 1  # the operation ended with an error, or the server refused the request
EXIT_USAGE = 2
EXIT_NO_ROOM = 4  # --dry-run: the change does not fit the cluster (3: server unreachable)


def _model(args: argparse.Namespace) -> str:
    return inputs.model_name(args.project, args.model)


def _environments(
    active: dict[str, str], args: argparse.Namespace
) -> tuple[dict[str, str], dict[str, str]]:
    """The active deployment's environment with --env over it, and the --secret-env
    (a name made secret leaves the plain environment)."""
    secrets = inputs.environment(args.secret_env)
    env = {**active, **inputs.environment(args.env)}
    return {k: v for k, v in env.items() if k not in secrets}, secrets


def _autoscaling(args: argparse.Namespace) -> Autoscaling | None:
    found = inputs.autoscaling(
        args.min_replicas,
        args.max_replicas,
        args.target_ongoing_requests,
        args.upscale_delay,
        args.downscale_delay,
    )
    if found is not None and args.no_autoscaling:
        raise inputs.UsageError("--no-autoscaling and autoscaling flags: choose one")
    return found


def _resources(args: argparse.Namespace, base: Resources | None) -> Resources | None:
    """The flags given, over ``base`` (the active deployment's); None when no flag is given.

    Autoscaling flags set the autoscaling afresh (``--replicas``, when given, is the count
    to start with); none keeps ``base``'s, and ``--no-autoscaling`` ends it (the count:
    ``--replicas``, or what ``base`` starts with)."""
    autoscaling = _autoscaling(args)
    given = {
        "replicas": args.replicas,
        "cpus": args.cpus,
        "memory_mib": inputs.memory_mib(args.memory) if args.memory is not None else None,
        "gpus": args.gpus,
    }
    changes_scaling = autoscaling is not None or args.no_autoscaling
    if all(v is None for v in given.values()) and not changes_scaling and base is not None:
        return None
    start = base or Resources()
    if autoscaling is not None:
        replicas = 0  # Autoscaling.initial: max(1, --min-replicas)
    elif args.no_autoscaling:
        replicas = start.initial_replicas
    else:
        autoscaling, replicas = start.autoscaling, start.replicas
    return Resources(
        replicas=args.replicas if args.replicas is not None else replicas,
        cpus=args.cpus if args.cpus is not None else start.cpus,
        memory_mib=given["memory_mib"] if given["memory_mib"] is not None else start.memory_mib,
        gpus=args.gpus if args.gpus is not None else start.gpus,
        autoscaling=autoscaling,
    )


def _dry_run(op: Operation, p: Printer) -> int:
    """A validate_only answer: its plan, and whether the change fits (EXIT_NO_ROOM if not)."""
    plan = op.plan
    if plan is None:
        raise inputs.UsageError("the server answered without a plan: is it older than the CLI?")
    if p.json:
        p.result(plan)
    else:
        print(plan_text(plan), file=p.out)
    return EXIT_NO_ROOM if plan.fit is not None and not plan.fit.fits else EXIT_OK


async def _active(c: Client, model: Model) -> tuple[Resources | None, dict[str, str]]:
    """The active deployment's resources and environment: what a new deploy keeps."""
    if not model.active_deployment:
        return None, {}
    active = await c.get_deployment(model.active_deployment)
    return active.resources, dict(active.environment)


class Follower:
    """Prints an operation's progress as it changes, with the time since the start."""

    def __init__(self, printer: Printer) -> None:
        self.printer = printer
        self.start = time.monotonic()

    def __call__(self, op: Operation) -> None:
        status = "done" if op.done and op.error is None else op.progress or "queued"
        if op.error is not None:
            status = f"failed: {op.error.message}"
        self.printer.progress(f"[{time.monotonic() - self.start:6.1f}s] {op.kind.value}: {status}")


async def _follow(c: Client, op: Operation, p: Printer, wait_s: float) -> Operation:
    p.progress(f"operation {op.name} ({op.kind.value} {short(op.target)})")
    return await c.wait(op.name, timeout_s=wait_s, on_progress=Follower(p))


async def _finish(c: Client, op: Operation, p: Printer) -> int:
    """After an operation: the model as it is now, and an exit code that says how it went."""
    model = await c.get_model(op.model)
    if op.error is not None:
        p.progress(
            f"FAILED: {op.error.message}" + (f" [{op.error.reason}]" if op.error.reason else "")
        )
    if p.json:
        p.result({"operation": op, "model": model})
    else:
        p.result(model)
        if model.active_deployment:
            dep = await c.get_deployment(model.active_deployment)
            print(f"\n{short(dep.name)}: {dep.state.value}, {resources(dep.resources)}", file=p.out)
            if dep.message:
                print(dep.message, file=p.out)
    return EXIT_FAILED if op.error is not None else EXIT_OK


# ---- models ---------------------------------------------------------------------------------


async def models_create(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result(
        await c.create_model(
            inputs.project_name(args.project), args.model, args.display_name, args.description
        )
    )
    return EXIT_OK


async def _all_models(c: Client, project: str) -> list[Model]:
    items: list[Model] = []
    token = ""
    while True:
        page = await c.list_models(inputs.project_name(project), 100, token)
        items += page.items
        token = page.next_page_token
        if not token:
            return items


async def models_list(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result(await _all_models(c, args.project))
    return EXIT_OK


async def models_get(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result(await c.get_model(_model(args)))
    return EXIT_OK


async def models_delete(c: Client, args: argparse.Namespace, p: Printer) -> int:
    name = _model(args)
    if not confirm(args, f"Delete {name} and its history?"):
        return EXIT_USAGE
    await c.delete_model(name)
    p.progress(f"deleted {name}")
    return EXIT_OK


# ---- build, deploy, stop, restart -----------------------------------------------------------


async def build(c: Client, args: argparse.Namespace, p: Printer) -> int:
    model = _model(args)
    _check_deploy_flags(args)  # before anything is zipped or uploaded
    data = inputs.zip_directory(Path(args.directory))
    current = await c.get_model(model)  # a clear NOT_FOUND before uploading anything
    deploy = None
    if args.deploy:
        base, env = await _active(c, current)
        res = _resources(args, base) or base or Resources()
        env, secrets = _environments(env, args)
        deploy = DeployOptions(resources=res, environment=env, secret_environment=secrets)

    def uploaded(sent: int, total: int) -> None:
        p.progress(f"uploading {args.directory}: {sent / 1024:,.0f} / {total / 1024:,.0f} KiB")

    source = await c.upload_source(model, data, on_progress=uploaded)
    p.progress(f"source sha256:{source.sha256[:12]} ({source.size_bytes:,} bytes)")
    op = await c.create_build(
        model,
        source.sha256,
        args.file,
        args.function,
        args.comment,
        deploy,
        no_cache=args.no_cache,
        validate_only=args.dry_run,
        wait_for_capacity=args.wait_for_capacity,
    )
    if args.dry_run:
        return _dry_run(op, p)
    build_name = op.target
    logs = None if args.quiet else asyncio.create_task(_show_log(c, build_name, p))
    try:
        op = await _follow(c, op, p, args.wait)
    finally:
        if logs is not None:  # the log ends with the build; a wait that gave up stops it
            if op.done:
                await asyncio.wait([logs], timeout=5)
            logs.cancel()
            await asyncio.gather(logs, return_exceptions=True)
    b = await c.get_build(build_name)
    p.progress(
        f"{short(b.name)}: {b.state.value} {b.image}"
        + (" (cache hit: same inputs as an earlier build)" if b.cache_hit else "")
        + (f" error: {b.error}" if b.error else "")
    )
    return await _finish(c, op, p)


def _check_deploy_flags(args: argparse.Namespace) -> None:
    """`build`: the flags of a deploy need --deploy (and autoscaling flags must add up)."""
    if args.deploy:
        _autoscaling(args)
        return
    resources = (
        args.replicas, args.cpus, args.memory, args.gpus, args.env, args.secret_env,
        args.min_replicas, args.max_replicas, args.target_ongoing_requests,
        args.upscale_delay, args.downscale_delay,
    )  # fmt: skip
    if any(v is not None for v in resources) or args.no_autoscaling:
        raise inputs.UsageError("resources, autoscaling and --env apply to a deploy: add --deploy")
    if args.dry_run or args.wait_for_capacity:
        raise inputs.UsageError("--dry-run and --wait-for-capacity apply to a deploy: add --deploy")


async def _show_log(c: Client, build_name: str, p: Printer) -> None:
    """The build's log on stderr as the build writes it."""
    async for line in c.build_logs(build_name, follow=True):
        p.progress(f"  | {line.text}")


async def deploy(c: Client, args: argparse.Namespace, p: Printer) -> int:
    model = _model(args)
    build_name = inputs.child_name(model, "builds", args.build)
    base, env = await _active(c, await c.get_model(model))
    res = _resources(args, base)
    env, secrets = _environments(env, args)
    op = await c.create_deployment(
        model,
        build_name,
        res,
        env,
        secret_environment=secrets,
        rollout=_strategy(args),
        validate_only=args.dry_run,
        wait_for_capacity=args.wait_for_capacity,
    )
    if args.dry_run:
        return _dry_run(op, p)
    return await _finish(c, await _follow(c, op, p, args.wait), p)


def _strategy(args: argparse.Namespace) -> Strategy | None:
    """--canary or --shadow with their gates; None: at once."""
    if args.canary and args.shadow is not None:
        raise inputs.UsageError("--canary and --shadow: choose one")
    gates = Gates(
        max_error_rate=inputs.percent(args.max_error_rate, "--max-error-rate")
        if args.max_error_rate
        else None,
        max_p99_ms=inputs.milliseconds(args.max_p99, "--max-p99") if args.max_p99 else None,
        max_p99_ratio=args.max_p99_ratio,
        min_requests=args.min_requests,
    )
    if args.canary:
        bake = inputs.duration_s(args.bake, "--bake")
        return Strategy(StrategyKind.CANARY, inputs.steps(args.canary), bake, gates)
    if args.shadow is not None:
        duration = inputs.duration_s(args.shadow_for, "--shadow-for")
        return Strategy(StrategyKind.SHADOW, (args.shadow,), duration, gates)
    return None


async def traffic(c: Client, args: argparse.Namespace, p: Printer) -> int:
    model = _model(args)
    if not args.weights:
        found = await c.get_model(model)
        if p.json:
            p.result(found.traffic)
        else:
            print(traffic_text(found.traffic), file=p.out)
        return EXIT_OK
    op = await c.set_traffic(model, inputs.weights(model, args.weights), args.sticky_header)
    return await _finish(c, await _follow(c, op, p, args.wait), p)


async def _running(c: Client, model: str) -> str:
    found = await c.get_model(model)
    if not found.running_operation:
        raise inputs.UsageError(f"{model} has no operation running")
    return found.running_operation


async def promote(c: Client, args: argparse.Namespace, p: Printer) -> int:
    op = await c.promote_rollout(await _running(c, _model(args)))
    return await _finish(c, await _follow(c, op, p, args.wait), p)


async def abort(c: Client, args: argparse.Namespace, p: Printer) -> int:
    op = await c.cancel_operation(await _running(c, _model(args)))
    return await _finish(c, op, p)


def confirm(args: argparse.Namespace, question: str) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        print(f"{question} Refusing without --yes (no terminal to ask).", file=sys.stderr)
        return False
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")


async def stop(c: Client, args: argparse.Namespace, p: Printer) -> int:
    model = _model(args)
    if args.dry_run:  # nothing happens: nothing to confirm
        return _dry_run(await c.stop_model(model, validate_only=True), p)
    if not confirm(args, f"Stop every replica of {model}? Its endpoint stops answering."):
        return EXIT_USAGE
    return await _finish(c, await _follow(c, await c.stop_model(model), p, args.wait), p)


async def restart(c: Client, args: argparse.Namespace, p: Printer) -> int:
    model = _model(args)
    if args.dry_run:  # nothing happens: nothing to confirm
        return _dry_run(await c.restart_model(model, validate_only=True), p)
    if not confirm(args, f"Restart every replica of {model}?"):
        return EXIT_USAGE
    op = await c.restart_model(model, wait_for_capacity=args.wait_for_capacity)
    return await _finish(c, await _follow(c, op, p, args.wait), p)


# ---- lists and details ----------------------------------------------------------------------


async def builds_list(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result((await c.list_builds(_model(args), args.limit)).items)
    return EXIT_OK


async def builds_get(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result(await c.get_build(inputs.child_name(_model(args), "builds", args.ref)))
    return EXIT_OK


async def builds_logs(c: Client, args: argparse.Namespace, p: Printer) -> int:
    async for line in c.build_logs(
        inputs.child_name(_model(args), "builds", args.ref), follow=args.follow
    ):
        print(f"{when(line.time)}  {line.text}" if line.time else line.text, file=p.out)
    return EXIT_OK


async def builds_export(c: Client, args: argparse.Namespace, p: Printer) -> int:
    name = inputs.child_name(_model(args), "builds", args.ref)
    dest = inputs.empty_directory(args.oci)
    p.progress(f"exporting {short(name)} as an OCI image layout (base {args.base or 'default'})")

    def received(size: int) -> None:
        p.progress(f"received {size / 1024 / 1024:,.1f} MiB")

    digest = await c.export_build(name, dest, args.base, args.tag, on_progress=received)
    if p.json:
        p.result({"build": name, "oci_layout": str(dest), "tag": args.tag, "digest": digest})
    else:
        print(f"oci:{dest}:{args.tag} {digest}", file=p.out)
    return EXIT_OK


async def deployments_list(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result((await c.list_deployments(_model(args), args.limit)).items)
    return EXIT_OK


async def deployments_get(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result(await c.get_deployment(inputs.child_name(_model(args), "deployments", args.ref)))
    return EXIT_OK


async def operations_list(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result((await c.list_operations(_model(args), args.limit)).items)
    return EXIT_OK


async def operations_get(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result(await c.get_operation(args.name))
    return EXIT_OK


async def watch(c: Client, args: argparse.Namespace, p: Printer) -> int:
    seen = 0
    if args.model:
        if args.filter:
            raise inputs.UsageError("--filter applies to a whole project: leave MODEL out")
        events = c.watch_model(_model(args), args.since)
    else:
        events = c.watch_models(inputs.project_name(args.project), args.filter, args.since)
    async for event in events:
        p.event(event)
        seen += 1
        if args.count and seen >= args.count:
            break
    return EXIT_OK


# ---- signals: logs, metrics, top ------------------------------------------------------------


async def logs(c: Client, args: argparse.Namespace, p: Printer) -> int:
    model = _model(args)
    build = inputs.child_name(model, "builds", args.build) if args.build else ""
    since = inputs.since(args.since) if args.since else None
    if args.tail < 0:
        raise inputs.UsageError(f"--tail {args.tail}: the number of last lines, or 0 for all")
    async for line in c.model_logs(model, args.replica, build, since, args.tail, args.follow):
        p.log_line(line)
    return EXIT_OK


async def metrics(c: Client, args: argparse.Namespace, p: Printer) -> int:
    window_s = inputs.duration_s(args.window, "--window")
    if args.step:
        step_s = inputs.duration_s(args.step, "--step")
    else:  # a minute, or the whole window (in 10 s steps) when it is shorter
        step_s = max(10.0, min(60.0, window_s // 10 * 10))
    p.result(await c.get_model_metrics(_model(args), window_s, step_s))
    return EXIT_OK


TOP_WINDOW_S = 60.0  # `top`'s figures: the last minute, one point


async def _top_row(c: Client, model: Model) -> TopRow:
    try:
        m = await c.get_model_metrics(model.name, TOP_WINDOW_S, TOP_WINDOW_S)
    except ClientError as e:  # deleted since it was listed, say: the others still show
        return TopRow(model.name, model.state.value, f"({e.code})", TOP_WINDOW_S, None)
    return TopRow(model.name, model.state.value, m.health, TOP_WINDOW_S, m.series.model.totals)


async def top(c: Client, args: argparse.Namespace, p: Printer) -> int:
    interval = inputs.duration_s(args.interval, "--interval")
    if interval <= 0:
        raise inputs.UsageError(f"--interval {args.interval!r}: more than 0s, e.g. 2s")
    project = inputs.project_name(args.project)
    clear = not args.once and p.out.isatty()
    while True:
        models = await _all_models(c, args.project)
        rows = await asyncio.gather(*(_top_row(c, m) for m in models))
        header = (
            f"{project}: {len(rows)} model(s), figures of the last {seconds(TOP_WINDOW_S)}, "
            f"at {datetime.now().strftime('%H:%M:%S')}"
            + ("" if args.once else f" (every {seconds(interval)}; Ctrl-C to stop)")
        )
        p.top(rows, header, clear)
        if args.once:
            return EXIT_OK
        await asyncio.sleep(interval)


def _scope(args: argparse.Namespace) -> str:
    return "projects/-" if args.all_projects else inputs.project_name(args.project)


async def tokens_create(c: Client, args: argparse.Namespace, p: Printer) -> int:
    role = Role[args.role.upper()]
    token, secret = await c.create_token(
        _scope(args), role, args.description, inputs.ttl_seconds(args.ttl)
    )
    p.progress(f"created {token.name} ({role.label}); its secret is shown once, here:")
    print(secret, file=p.out)  # stdout holds the secret alone, for scripts
    return EXIT_OK


async def tokens_list(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result((await c.list_tokens(_scope(args), args.limit)).items)
    return EXIT_OK


async def tokens_revoke(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result(await c.revoke_token(args.name))
    return EXIT_OK


async def audit_list(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result((await c.list_audit_records(_scope(args), args.limit)).items)
    return EXIT_OK


async def keys_create(c: Client, args: argparse.Namespace, p: Printer) -> int:
    key, secret = await c.create_invocation_key(_model(args), args.description)
    p.progress(
        f"created {key.name}; its secret is shown once, here (the endpoint takes it "
        "within seconds, as Authorization: Bearer <key>):"
    )
    print(secret, file=p.out)
    return EXIT_OK


async def keys_list(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result((await c.list_invocation_keys(_model(args), args.limit)).items)
    return EXIT_OK


async def keys_revoke(c: Client, args: argparse.Namespace, p: Printer) -> int:
    p.result(await c.revoke_invocation_key(args.name))
    return EXIT_OK
