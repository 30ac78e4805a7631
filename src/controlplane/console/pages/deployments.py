"""Deployments: every deployment of a model, newest first (build, resources, environment,
state, when), each with **Re-deploy this Build**: the serving environment form prefilled
from that deployment, which says before **Deploy Model** is pressed whether the change
scales in place, rolls or restarts, as the server will decide it.

The serving environment's form (replicas, CPUs, memory, GPUs, environment and secret
environment as NAME=VALUE lines) is read here for the Deploy New Build page too."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from controlplane.api.client import ClientError
from controlplane.console import forms, kit, live
from controlplane.domain.errors import InvalidArgument
from controlplane.domain.states import DeploymentState, ReplicaState
from controlplane.domain.types import Deployment, Model, Resources, validate_environment

PAGE_SIZE = 50
BASE = "/projects/{project}/models/{model}/deployments"
LABELS = {"replicas": "Replicas", "cpus": "CPUs", "memory_mib": "Memory (MiB)", "gpus": "GPUs"}
SECRET_LABEL = "Secret environment"


# ---- the serving environment's form ---------------------------------------------------------


def texts(form: FormData | Mapping[str, Any]) -> dict[str, str]:
    """A form's text fields (files left out), one value each."""
    return {k: v for k, v in form.items() if isinstance(v, str)}


def number_text(value: float) -> str:
    return f"{value:g}"


def environment_lines(env: Mapping[str, str]) -> str:
    return "\n".join(f"{k}={v}" for k, v in sorted(env.items()))


def serving_values(dep: Deployment | None) -> dict[str, str]:
    """The form's fields as ``dep`` serves (a new model's defaults without one)."""
    res = dep.resources if dep is not None else Resources()
    return {
        "replicas": str(res.replicas),
        "cpus": number_text(res.cpus),
        "memory_mib": str(res.memory_mib),
        "gpus": number_text(res.gpus),
        "environment": environment_lines(dep.environment) if dep is not None else "",
        "secret_mode": "keep",
        "secret_environment": "",
    }


def _number(values: Mapping[str, str], key: str, whole: bool) -> float:
    text = values.get(key, "").strip()
    label = LABELS[key]
    if not text:
        if key == "replicas":
            raise ValueError(f"{label}: give how many replicas serve (1 or more)")
        return 0
    try:
        return int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"{label}: “{text[:40]}” is not {kind}") from None


def parse_resources(values: Mapping[str, str]) -> Resources:
    """Replicas, CPUs, memory (MiB) and GPUs, within the API's own bounds."""
    res = Resources(
        replicas=int(_number(values, "replicas", whole=True)),
        cpus=float(_number(values, "cpus", whole=False)),
        memory_mib=int(_number(values, "memory_mib", whole=True)),
        gpus=float(_number(values, "gpus", whole=False)),
    )
    bad = res.violations("resources")
    if bad:
        raise ValueError(
            "; ".join(f"{LABELS[v.field.rsplit('.', 1)[-1]]} {v.description}" for v in bad)
        )
    return res


def parse_environment(text: str, label: str, secret: bool = False) -> dict[str, str]:
    """NAME=VALUE lines (blank lines and # comments left out; spaces around the name and
    the value too), checked as the API checks them. A secret line's text is never repeated
    in a message."""
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not name:
            shown = "" if secret else f" “{line[:60]}”"
            raise ValueError(f"{label}, line {number}{shown}: write it as NAME=VALUE")
        if name in env:
            raise ValueError(f"{label}, line {number}: {name} is given twice")
        env[name] = value.strip()
    try:
        validate_environment(env, label)
    except InvalidArgument as e:
        raise ValueError(e.message) from None
    return env


@dataclass(frozen=True)
class Serving:
    """What the form asks for. ``secrets`` empty: the serving deployment's are kept."""

    resources: Resources
    environment: dict[str, str]
    secrets: dict[str, str]
    new_secrets: bool


def parse_serving(values: Mapping[str, str], read_secrets: bool = True) -> Serving:
    """The form's serving environment, or ValueError saying what to fix. Without
    ``read_secrets`` (the plan: it only needs to know whether they change), secret
    values are not read."""
    resources = parse_resources(values)
    environment = parse_environment(values.get("environment", ""), "Environment")
    new = values.get("secret_mode", "keep") == "new"
    secrets: dict[str, str] = {}
    if new and read_secrets:
        secrets = parse_environment(values.get("secret_environment", ""), SECRET_LABEL, True)
        if not secrets:
            raise ValueError(
                f"{SECRET_LABEL}: give NAME=VALUE lines, or keep the secrets serving now"
            )
        both = sorted(set(secrets) & set(environment))
        if both:
            raise ValueError(
                f"{', '.join(both)}: in both the environment and the secret environment "
                "(a name is secret or not)"
            )
    return Serving(resources, environment, secrets, new)


# ---- what a deploy will do ------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    kind: str  # in-place, roll, restart, busy, invalid
    headline: str
    reasons: tuple[str, ...] = ()


def _replicas(n: int) -> str:
    return f"{n} replica" if n == 1 else f"{n} replicas"


def _environment_change(before: Mapping[str, str], after: Mapping[str, str]) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = [
        f"{words} {', '.join(names)}"
        for words, names in (("adds", added), ("changes", changed), ("removes", removed))
        if names
    ]
    return "the environment " + "; ".join(parts)


def plan_of(model: Model, active: Deployment | None, build: str, serving: Serving) -> Plan:
    """What deploying ``build`` with ``serving`` does, as the server decides it: a rollout
    replaces the replicas of the deployment serving now (DEPLOYED) only when the build,
    CPUs, memory, GPUs or environment (secret environment included) change; replicas
    alone change in place. Nothing serving: every replica starts new."""
    wanted = serving.resources.replicas
    if model.running_operation:
        return Plan(
            "busy",
            f"Not now: operation {model.running_operation} is running on this model; "
            "Deploy Model is refused until it ends.",
        )
    if active is None or active.state != DeploymentState.DEPLOYED:
        if active is None:
            return Plan("restart", f"Starts: nothing has served yet; {_replicas(wanted)} start.")
        return Plan(
            "restart",
            f"Restarts: nothing serves now (the model is {model.state.value}); "
            f"{_replicas(wanted)} start new.",
        )
    before, after = active.resources, serving.resources
    reasons: list[str] = []
    if build != active.build:
        reasons.append(f"another build ({kit.last(active.build)} → {kit.last(build)})")
    if before.cpus != after.cpus:
        reasons.append(f"CPUs {before.cpus:g} → {after.cpus:g}")
    if before.memory_mib != after.memory_mib:
        reasons.append(f"memory {before.memory_mib} → {after.memory_mib} MiB")
    if before.gpus != after.gpus:
        reasons.append(f"GPUs {before.gpus:g} → {after.gpus:g}")
    if dict(active.environment) != serving.environment:
        reasons.append(_environment_change(active.environment, serving.environment))
    if serving.new_secrets:
        reasons.append("a new secret environment (its values are not compared with the old)")
    now = len(active.replicas) or before.replicas
    if reasons:
        return Plan(
            "roll",
            f"Rolls: {_replicas(wanted)} of the new spec start, and the {now} serving now "
            "stop once every new one runs; replica ids change.",
            tuple(reasons),
        )
    if wanted > before.replicas:
        return Plan(
            "in-place",
            f"Scales in place from {before.replicas} to {_replicas(wanted)}: the running "
            f"replicas keep their ids and {wanted - before.replicas} more start.",
        )
    if wanted < before.replicas:
        return Plan(
            "in-place",
            f"Scales in place from {before.replicas} to {_replicas(wanted)}: "
            f"{before.replicas - wanted} stop, the others keep their ids.",
        )
    return Plan(
        "in-place",
        "Nothing changes for the replicas: they keep serving in place, with their ids.",
    )


# ---- the Deployments page -------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    deployment: Deployment
    active: bool

    @property
    def id(self) -> str:
        return kit.last(self.deployment.name)

    @property
    def build(self) -> str:
        return kit.last(self.deployment.build)

    @property
    def running(self) -> int:
        return sum(r.state == ReplicaState.RUNNING for r in self.deployment.replicas)


async def load_list(view: kit.View) -> dict[str, Any]:
    model, page = await kit.model_and_page(view, view.client.list_deployments, PAGE_SIZE)
    return {
        "title": f"Deployments of {view.model_id}",
        "model": model,
        "model_id": view.model_id,
        "rows": [Row(d, d.name == model.active_deployment) for d in page.items],
        "next_page": page.next_page_token,
    }


# ---- Re-deploy this Build -------------------------------------------------------------------


def deployment_name(view: kit.View) -> str:
    return f"{view.model}/deployments/{view.params['deployment']}"


async def active_of(view: kit.View, model: Model) -> Deployment | None:
    if not model.active_deployment:
        return None
    return await view.client.get_deployment(model.active_deployment)


async def _records(view: kit.View) -> tuple[Model, Deployment, Deployment | None]:
    model, dep = await asyncio.gather(
        view.client.get_model(view.model), view.client.get_deployment(deployment_name(view))
    )
    return model, dep, await active_of(view, model)


def redeploy_context(
    view: kit.View,
    model: Model,
    dep: Deployment,
    active: Deployment | None,
    values: Mapping[str, str],
    error: str = "",
) -> dict[str, Any]:
    try:
        plan = plan_of(model, active, dep.build, parse_serving(values, read_secrets=False))
    except ValueError as e:
        plan = Plan("invalid", f"Not valid yet: {e}")
    path = f"/projects/{view.project}/models/{view.model_id}/deployments/{kit.last(dep.name)}"
    return {
        "title": f"Re-deploy build {kit.last(dep.build)} of {view.model_id}",
        "model": model,
        "model_id": view.model_id,
        "deployment": dep,
        "active": active,
        "values": dict(values),
        "plan": plan,
        "error": error,
        "action": f"{path}/redeploy",
        "plan_url": f"{path}/plan",
    }


async def load_redeploy(view: kit.View) -> dict[str, Any]:
    model, dep, active = await _records(view)
    return redeploy_context(view, model, dep, active, serving_values(dep))


def plan_route(console: kit.Console) -> Any:
    """GET: the plan for the form's values as they are now (the form's ``data-plan``)."""

    async def route(request: Request) -> Response:
        try:
            view = await console.view(request)
        except kit.Denied:
            return Response("signed out", status_code=401)
        values = {k: v for k, v in request.query_params.items() if k != "secret_environment"}
        try:
            model, dep, active = await _records(view)
        except ClientError as e:
            if e.code == "UNAUTHENTICATED":
                await console.sessions.end(view.session.id)
            html = console.render(
                "fragment_error.html", view, {"error": kit.describe(e), "target_id": ""}
            )
            return HTMLResponse(html)
        context = redeploy_context(view, model, dep, active, values)
        return HTMLResponse(
            console.render_blocks("redeploy.html", view, context, ("plan",))["plan"]
        )

    return route


def status_of(e: ClientError) -> int:
    return {"PERMISSION_DENIED": 403, "NOT_FOUND": 404, "INVALID_ARGUMENT": 400}.get(e.code, 409)


def redeploy_route(console: kit.Console) -> Any:
    """POST Deploy Model: a new deployment of the build; a refusal shows the form again
    with what was typed (never the secret values) and the reason."""

    async def route(request: Request) -> Response:
        checked = await forms.checked_form(console, request)
        if isinstance(checked, Response):
            return checked
        view, form = checked
        values = texts(form)
        try:
            model, dep, active = await _records(view)
        except ClientError as e:
            if e.code == "UNAUTHENTICATED":
                await console.sessions.end(view.session.id)
                return kit.sign_in_redirect(request)
            return console.error_page(view, e)
        try:
            serving = parse_serving(values)
            op = await view.client.create_deployment(
                view.model,
                dep.build,
                serving.resources,
                serving.environment,
                secret_environment=serving.secrets or None,
            )
        except ValueError as e:
            error, status = f"Not valid: {e}", 400
        except ClientError as e:
            if e.code == "UNAUTHENTICATED":
                await console.sessions.end(view.session.id)
                return kit.sign_in_redirect(request)
            error, status = kit.describe(e), status_of(e)
        else:
            view.session.flash(
                "ok",
                f"Deploying build {kit.last(dep.build)} with "
                f"{_replicas(serving.resources.replicas)}: operation {op.name}",
            )
            return RedirectResponse(f"/projects/{view.project}/models/{view.model_id}", 303)
        shown = {**values, "secret_environment": ""}  # secret values never go back out
        context = redeploy_context(view, model, dep, active, shown, error)
        return console.page_response("redeploy.html", view, context, status)

    return route


def routes(console: kit.Console) -> list[BaseRoute]:
    return [
        *live.page(
            console,
            BASE,
            "deployments.html",
            load_list,
            watch=kit.model_changes,
            live=("deployments_table",),
        ),
        *live.page(console, BASE + "/{deployment}/redeploy", "redeploy.html", load_redeploy),
        Route(BASE + "/{deployment}/redeploy", redeploy_route(console), methods=["POST"]),
        Route(BASE + "/{deployment}/plan", plan_route(console), methods=["GET"]),
    ]
