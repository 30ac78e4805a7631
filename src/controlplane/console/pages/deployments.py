"""Deployments: every deployment of a model, newest first (build, resources, environment,
state, when), each with **Re-deploy this Build**: the serving environment form prefilled
from that deployment. Before **Deploy Model** is pressed the form shows the server's own
plan for exactly what it would deploy (CreateDeployment with validate_only: nothing is
written): the change in words, its causes, the replicas kept, replaced, removed and added,
and whether the cluster has room, node by node. The server refuses a change it has no room
for (INSUFFICIENT_CAPACITY); **Deploy anyway (wait for capacity)** sends it all the same.

The serving environment's form (replicas, CPUs, memory, GPUs, scale with load, environment
and secret environment as NAME=VALUE lines) is read here for the Deploy New Build page
too."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from controlplane.api.client import ClientError
from controlplane.console import forms, kit, live
from controlplane.domain.errors import InvalidArgument
from controlplane.domain.plan import ChangeClass, Fit, Plan
from controlplane.domain.scaling import DEFAULT_TARGET, Autoscaling
from controlplane.domain.states import ReplicaState
from controlplane.domain.types import (
    MAX_REPLICAS,
    Deployment,
    Model,
    Operation,
    Resources,
    validate_environment,
)

PAGE_SIZE = 50
BASE = "/projects/{project}/models/{model}/deployments"
SECRET_LABEL = "Secret environment"
# The form's fields, in words (a message about one starts with it).
LABELS = {
    "replicas": "Replicas",
    "cpus": "CPUs",
    "memory_mib": "Memory (MiB)",
    "gpus": "GPUs",
    "min_replicas": "Min replica count",
    "max_replicas": "Max replica count",
    "target_ongoing_requests": "Target requests in flight per replica",
    "upscale_delay_s": "Upscale delay (s)",
    "downscale_delay_s": "Downscale delay (s)",
    "environment": "Environment",
    "secret_environment": SECRET_LABEL,
}
# The form field each field of the API's CreateDeployment is read from.
API_FIELDS = {
    "resources.replicas": "replicas",
    "resources.cpus": "cpus",
    "resources.memory_mib": "memory_mib",
    "resources.gpus": "gpus",
    "resources.autoscaling.min_replicas": "min_replicas",
    "resources.autoscaling.max_replicas": "max_replicas",
    "resources.autoscaling.target_ongoing_requests": "target_ongoing_requests",
    "environment": "environment",
    "secret_environment": "secret_environment",
}


class Invalid(ValueError):
    """A form value that cannot be read, and the form field it is in ('' : none)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


# ---- the serving environment's form ---------------------------------------------------------


def texts(form: FormData | Mapping[str, Any]) -> dict[str, str]:
    """A form's text fields (files left out), one value each."""
    return {k: v for k, v in form.items() if isinstance(v, str)}


def number_text(value: float) -> str:
    return f"{value:g}"


def environment_lines(env: Mapping[str, str]) -> str:
    return "\n".join(f"{k}={v}" for k, v in sorted(env.items()))


def serving_values(dep: Deployment | None) -> dict[str, str]:
    """The form's fields as ``dep`` serves (a new model's defaults without one). Scale with
    load is prefilled from its bounds, or with bounds around its count (unchecked)."""
    res = dep.resources if dep is not None else Resources()
    a = res.autoscaling
    return {
        "replicas": str(res.initial_replicas),
        "cpus": number_text(res.cpus),
        "memory_mib": str(res.memory_mib),
        "gpus": number_text(res.gpus),
        "autoscale": "yes" if a is not None else "",
        "min_replicas": str(a.min_replicas if a is not None else 1),
        "max_replicas": str(
            a.max_replicas if a is not None else min(MAX_REPLICAS, max(2, 2 * res.replicas))
        ),
        "target_ongoing_requests": number_text(
            a.target_ongoing_requests if a is not None else DEFAULT_TARGET
        ),
        # Not on the forms: carried (hidden) so that a deploy keeps the serving delays.
        "upscale_delay_s": number_text(a.upscale_delay_s) if a is not None else "",
        "downscale_delay_s": number_text(a.downscale_delay_s) if a is not None else "",
        "environment": environment_lines(dep.environment) if dep is not None else "",
        "secret_mode": "keep",
        "secret_environment": "",
    }


def _number(values: Mapping[str, str], key: str, whole: bool, required: str = "") -> float:
    """The number in field ``key``: blank is 0, or refused with ``required``'s words."""
    text = values.get(key, "").strip()
    label = LABELS[key]
    if not text:
        if required:
            raise Invalid(f"{label}: {required}", key)
        return 0
    try:
        return int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise Invalid(f"{label}: “{text[:40]}” is not {kind}", key) from None


def parse_autoscaling(values: Mapping[str, str], base: Autoscaling | None = None) -> Autoscaling:
    """Scale with load's bounds and target (blank: Serve's default of 2); the delays are
    ``base``'s (the deployment the form was filled from), else Serve's defaults."""
    target = values.get("target_ongoing_requests", "").strip()
    a = Autoscaling(
        min_replicas=int(_number(values, "min_replicas", True, "give the fewest (0 or more)")),
        max_replicas=int(_number(values, "max_replicas", True, "give the most (1 or more)")),
        target_ongoing_requests=(
            float(_number(values, "target_ongoing_requests", False)) if target else DEFAULT_TARGET
        ),
    )
    if base is not None:
        a = replace(
            a, upscale_delay_s=base.upscale_delay_s, downscale_delay_s=base.downscale_delay_s
        )
    else:  # the delays the form carried from the deployment it was filled from, if any
        if values.get("upscale_delay_s", "").strip():
            a = replace(a, upscale_delay_s=float(_number(values, "upscale_delay_s", False)))
        if values.get("downscale_delay_s", "").strip():
            a = replace(a, downscale_delay_s=float(_number(values, "downscale_delay_s", False)))
    return a


def violation_words(api_field: str, description: str) -> tuple[str, str]:
    """(the form field, a message in words) of an API field violation: "Max replicas must
    be ..."; the form field is '' when the form has none for it."""
    name, _, key = api_field.partition("[")
    form_field = API_FIELDS.get(name, "")
    label = LABELS.get(form_field) or LABELS.get(name.rsplit(".", 1)[-1], name)
    if key:
        return form_field, f"{label} {key.rstrip(']').strip(chr(39))}: {description}"
    return form_field, f"{label} {description}"


def parse_resources(
    values: Mapping[str, str], check: bool = True, base: Autoscaling | None = None
) -> Resources:
    """Replicas, CPUs, memory (MiB), GPUs and, with ``autoscale``, the bounds to scale
    within. ``check``: within the API's own bounds (without it, the server says)."""
    autoscaling = parse_autoscaling(values, base) if values.get("autoscale") == "yes" else None
    res = Resources(
        replicas=int(_number(values, "replicas", True, "give how many replicas serve (1 or more)")),
        cpus=float(_number(values, "cpus", whole=False)),
        memory_mib=int(_number(values, "memory_mib", whole=True)),
        gpus=float(_number(values, "gpus", whole=False)),
        autoscaling=autoscaling,
    )
    bad = res.violations("resources") if check else []
    if bad:
        words = [violation_words(v.field, v.description) for v in bad]
        raise Invalid("; ".join(text for _, text in words), words[0][0])
    return res


def parse_environment(
    text: str, label: str, secret: bool = False, field: str = ""
) -> dict[str, str]:
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
            raise Invalid(f"{label}, line {number}{shown}: write it as NAME=VALUE", field)
        if name in env:
            raise Invalid(f"{label}, line {number}: {name} is given twice", field)
        env[name] = value.strip()
    try:
        validate_environment(env, label)
    except InvalidArgument as e:
        raise Invalid(e.message, field) from None
    return env


@dataclass(frozen=True)
class Serving:
    """What the form asks for. ``secrets`` empty: the serving deployment's are kept."""

    resources: Resources
    environment: dict[str, str]
    secrets: dict[str, str]
    new_secrets: bool


def parse_serving(
    values: Mapping[str, str],
    read_secrets: bool = True,
    check: bool = True,
    base: Autoscaling | None = None,
) -> Serving:
    """The form's serving environment, or Invalid saying what to fix (and in which
    field). Without ``read_secrets`` secret values are not read; without ``check`` the
    resources' bounds are left to the server; ``base``: see ``parse_autoscaling``."""
    resources = parse_resources(values, check, base)
    environment = parse_environment(
        values.get("environment", ""), "Environment", field="environment"
    )
    new = values.get("secret_mode", "keep") == "new"
    secrets: dict[str, str] = {}
    if new and read_secrets:
        secrets = parse_environment(
            values.get("secret_environment", ""), SECRET_LABEL, True, "secret_environment"
        )
        if not secrets:
            raise Invalid(
                f"{SECRET_LABEL}: give NAME=VALUE lines, or keep the secrets serving now",
                "secret_environment",
            )
        both = sorted(set(secrets) & set(environment))
        if both:
            raise Invalid(
                f"{', '.join(both)}: in both the environment and the secret environment "
                "(a name is secret or not)",
                "secret_environment",
            )
    return Serving(resources, environment, secrets, new)


# ---- what Deploy Model will do: the server's plan -------------------------------------------


def _replicas(n: int) -> str:
    return f"{n} replica" if n == 1 else f"{n} replicas"


KINDS = {
    ChangeClass.IN_PLACE: "in-place",
    ChangeClass.ROLLING: "roll",
    ChangeClass.RESTART: "restart",
    ChangeClass.REBUILD: "roll",
    ChangeClass.STOP: "stop",
    ChangeClass.START: "restart",
}
CAUSE_LABELS = {
    "build": "Build",
    "resources.replicas": "Replicas",
    "resources.cpus": "CPUs",
    "resources.memory_mib": "Memory (MiB)",
    "resources.gpus": "GPUs",
    "resources.autoscaling": "Scale with load",
    "restart_generation": "Restart",
}


def headline(plan: Plan) -> str:
    """The change class in words, with what it does to the replicas."""
    now, after = len(plan.current), plan.after
    cls = plan.change_class
    if cls is ChangeClass.IN_PLACE:
        if plan.added:
            return (
                f"Scales in place from {now} to {_replicas(after)}: the running replicas "
                f"keep their ids and {plan.added} more start."
            )
        if plan.removed:
            return (
                f"Scales in place from {now} to {_replicas(after)}: {plan.removed} stop, "
                "the others keep their ids."
            )
        if plan.causes:
            who = (
                "the replica keeps serving, with its id"
                if now == 1
                else (f"the {now} replicas keep serving, with their ids")
            )
            return f"Changes in place: {who}."
        return "Nothing changes for the replicas: they keep serving in place, with their ids."
    if cls is ChangeClass.ROLLING:
        return (
            f"Rolls: {_replicas(after)} of the new spec start, and the {now} serving now "
            "stop once every new one runs; replica ids change."
        )
    if cls is ChangeClass.RESTART:
        return f"Restarts: each of the {_replicas(now)} is replaced by a new one, same spec."
    if cls is ChangeClass.REBUILD:
        return f"Rebuilds from source, then rolls: {_replicas(after)} of the new build start."
    if cls is ChangeClass.STOP:
        return f"Stops: the {_replicas(now)} stop; the endpoint stops answering."
    return f"Starts: nothing serves now; {_replicas(after)} start."


@dataclass(frozen=True)
class CauseView:
    field: str  # the API's ("resources.cpus", "environment[FOO]")
    label: str  # in words ("CPUs", "Environment FOO")
    before: str
    after: str


def cause_view(field_name: str, before: str, after: str) -> CauseView:
    name, _, key = field_name.partition("[")
    if key:
        kind = "Secret" if name == "secret_environment" else "Environment"
        label = f"{kind} {key.rstrip(']')}"
    else:
        label = CAUSE_LABELS.get(name, name)

    def value(v: str) -> str:
        return f"build {kit.last(v)}" if name == "build" and "/builds/" in v else v

    return CauseView(field_name, label, value(before), value(after))


def capacity_words(fit: Fit | None, autoscaled: bool) -> str:
    if fit is None:
        return (
            "Room on the cluster: not checked (its nodes could not be read now); "
            "Deploy Model does not wait for it."
        )
    if not fit.fits:
        return f"Does not fit: {fit.reason}."
    if fit.to_place == 0:
        text = "Fits: no new replica needs room."
    else:
        has = "has" if fit.placed == 1 else "have"
        text = f"Fits: {_replicas(fit.placed)} to start ({fit.need.words()} each) {has} room."
    if autoscaled:
        text += f" Scaling with load, the cluster has room for {_replicas(fit.room_for)} now."
    return text


@dataclass(frozen=True)
class PlanView:
    """The server's plan, as the form shows it."""

    kind: str  # in-place, roll, restart, stop (a CSS class)
    headline: str
    causes: tuple[CauseView, ...]
    counts: tuple[tuple[str, int], ...]  # kept, replaced, removed, added, after
    fit: Fit | None
    capacity: str
    summary: str  # the server's own sentence


def plan_view(plan: Plan, autoscaled: bool) -> PlanView:
    return PlanView(
        kind=KINDS[plan.change_class],
        headline=headline(plan),
        causes=tuple(cause_view(c.field, c.before, c.after) for c in plan.causes),
        counts=(
            ("Kept", plan.kept),
            ("Replaced", plan.replaced),
            ("Removed", plan.removed),
            ("Added", plan.added),
            ("After", plan.after),
        ),
        fit=plan.fit,
        capacity=capacity_words(plan.fit, autoscaled),
        summary=plan.summary,
    )


@dataclass(frozen=True)
class Preview:
    """What Deploy Model will do (the server's plan), or why there is none yet, with the
    messages about each field the server or the form refused."""

    plan: PlanView | None = None
    error: str = ""
    field_errors: Mapping[str, str] = field(default_factory=dict)

    @property
    def no_room(self) -> bool:
        return self.plan is not None and self.plan.fit is not None and not self.plan.fit.fits


def field_errors_of(e: ClientError) -> dict[str, str]:
    """The server's field violations by form field (the first for each)."""
    out: dict[str, str] = {}
    for api_field, why in e.violations:
        form_field, words = violation_words(api_field, why)
        if form_field:
            out.setdefault(form_field, words)
    return out


def refusal(e: ClientError, head: str) -> str:
    """An API refusal in words; an invalid field is named as the form names it."""
    if e.code == "INVALID_ARGUMENT" and e.violations:
        return f"{head}: " + "; ".join(violation_words(f, why)[1] for f, why in e.violations)
    if e.reason == "OPERATION_IN_PROGRESS":
        running = e.metadata.get("operation", "") or "an operation"
        return (
            f"Not now: operation {running} is running on this model; Deploy Model is "
            "refused until it ends."
        )
    if e.reason == "INSUFFICIENT_CAPACITY":
        return (
            f"{kit.describe(e)}. Deploy anyway (wait for capacity), below, sends it all the same."
        )
    return kit.describe(e)


def invalid(e: Invalid, head: str) -> tuple[str, dict[str, str]]:
    return f"{head}: {e}", ({e.field: str(e)} if e.field else {})


async def _deploy(
    view: kit.View,
    dep: Deployment,
    serving: Serving,
    validate_only: bool = False,
    wait_for_capacity: bool = False,
) -> Operation:
    return await view.client.create_deployment(
        view.model,
        dep.build,
        serving.resources,
        serving.environment,
        secret_environment=serving.secrets or None,
        validate_only=validate_only,
        wait_for_capacity=wait_for_capacity,
    )


async def preview_of(view: kit.View, dep: Deployment, values: Mapping[str, str]) -> Preview:
    """The plan of deploying ``dep``'s build with the form's ``values``: the server's
    answer to the same CreateDeployment with validate_only (nothing is written). Raises
    ClientError only when the session's token is refused (UNAUTHENTICATED)."""
    try:
        serving = parse_serving(values, check=False, base=dep.resources.autoscaling)
    except Invalid as e:
        error, fields = invalid(e, "Not valid yet")
        return Preview(error=error, field_errors=fields)
    try:
        op = await _deploy(view, dep, serving, validate_only=True)
    except ClientError as e:
        if e.code == "UNAUTHENTICATED":
            raise
        return Preview(error=refusal(e, "Not valid yet"), field_errors=field_errors_of(e))
    if op.plan is None:
        return Preview(error="The server answered without a plan: it is older than this console.")
    return Preview(plan=plan_view(op.plan, serving.resources.autoscaling is not None))


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


async def redeploy_context(
    view: kit.View,
    model: Model,
    dep: Deployment,
    active: Deployment | None,
    values: Mapping[str, str],
    error: str = "",
    field_errors: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The form with ``values`` (never the secret values: those are typed again) and the
    server's plan for them; ``error`` and ``field_errors``: why Deploy Model was refused."""
    preview = await preview_of(view, dep, values)
    path = f"/projects/{view.project}/models/{view.model_id}/deployments/{kit.last(dep.name)}"
    return {
        "title": f"Re-deploy build {kit.last(dep.build)} of {view.model_id}",
        "model": model,
        "model_id": view.model_id,
        "deployment": dep,
        "active": active,
        "values": {**values, "secret_environment": ""},
        "preview": preview,
        "field_errors": {**preview.field_errors, **(field_errors or {})},
        "error": error,
        "action": f"{path}/redeploy",
        "plan_url": f"{path}/plan",
    }


async def load_redeploy(view: kit.View) -> dict[str, Any]:
    model, dep, active = await _records(view)
    return await redeploy_context(view, model, dep, active, serving_values(dep))


def plan_route(console: kit.Console) -> Any:
    """POST (the form's ``data-plan``, as the form is now, its CSRF token with it): the
    plan block for those values. A POST, so that a new secret environment is never in a
    URL: the server's plan says which secrets change."""

    async def route(request: Request) -> Response:
        checked = await forms.checked_form(console, request)
        if isinstance(checked, Response):
            return checked
        view, form = checked
        try:
            dep = await view.client.get_deployment(deployment_name(view))
            preview = await preview_of(view, dep, texts(form))
        except ClientError as e:
            if e.code == "UNAUTHENTICATED":
                await console.sessions.end(view.session.id)
            preview = Preview(error=kit.describe(e))
        blocks = console.render_blocks("redeploy.html", view, {"preview": preview}, ("plan",))
        return HTMLResponse(blocks["plan"])

    return route


def status_of(e: ClientError) -> int:
    return {"PERMISSION_DENIED": 403, "NOT_FOUND": 404, "INVALID_ARGUMENT": 400}.get(e.code, 409)


def _deploying(dep: Deployment, serving: Serving, wait: bool) -> str:
    res = serving.resources
    a = res.autoscaling
    count = (
        _replicas(res.replicas)
        if a is None
        else f"{a.min_replicas} to {a.max_replicas} replicas, scaling with load"
    )
    waits = " (its new replicas wait for room on the cluster)" if wait else ""
    return f"Deploying build {kit.last(dep.build)} with {count}{waits}"


def redeploy_route(console: kit.Console) -> Any:
    """POST Deploy Model (or, with ``wait_for_capacity``, Deploy anyway): a new deployment
    of the build; a refusal shows the form again with what was typed (never the secret
    values), the reason, each refused field's message beside it, and the plan."""

    async def route(request: Request) -> Response:
        checked = await forms.checked_form(console, request)
        if isinstance(checked, Response):
            return checked
        view, form = checked
        values = texts(form)
        wait = values.pop("wait_for_capacity", "") == "yes"
        try:
            model, dep, active = await _records(view)
            try:
                serving = parse_serving(values, check=False, base=dep.resources.autoscaling)
                op = await _deploy(view, dep, serving, wait_for_capacity=wait)
            except Invalid as e:
                (error, fields), status = invalid(e, "Not valid"), 400
            except ClientError as e:
                if e.code == "UNAUTHENTICATED":
                    raise
                error, fields, status = refusal(e, "Not valid"), field_errors_of(e), status_of(e)
            else:
                view.session.flash("ok", f"{_deploying(dep, serving, wait)}: operation {op.name}")
                return RedirectResponse(f"/projects/{view.project}/models/{view.model_id}", 303)
            context = await redeploy_context(view, model, dep, active, values, error, fields)
        except ClientError as e:
            if e.code == "UNAUTHENTICATED":
                await console.sessions.end(view.session.id)
                return kit.sign_in_redirect(request)
            return console.error_page(view, e)
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
        Route(BASE + "/{deployment}/plan", plan_route(console), methods=["POST"]),
    ]
