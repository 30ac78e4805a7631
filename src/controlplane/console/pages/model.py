"""Model Overview: the model's state and what it means, its endpoint with a curl line, a
Test Model box, its replicas and running operation (live), Stop, Restart and Cancel with a
confirmation that says exactly what will happen; and Keys: its invocation keys."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from starlette.datastructures import FormData
from starlette.routing import BaseRoute

from controlplane.api.client import ClientError
from controlplane.console import forms, kit, live
from controlplane.domain.states import ModelState, OperationKind
from controlplane.domain.traffic import Phase
from controlplane.domain.types import Deployment, Model, Operation

KEYS_PAGE_SIZE = 50
TEST_TIMEOUT_S = 30.0
MAX_SHOWN_BYTES = 64 * 1024  # of a test reply's body
SECRET = "secret"  # the flash kind that carries a new key's secret to the Keys page

# What each state means for the model's endpoint.
MEANINGS: dict[ModelState, str] = {
    ModelState.NOT_DEPLOYED: "No build of this model has been deployed yet: its endpoint "
    "does not answer.",
    ModelState.PENDING: "A build is being made and will be deployed when it is ready: the "
    "endpoint does not answer yet.",
    ModelState.DEPLOYING: "A deployment is rolling out: the endpoint answers from the "
    "replicas that run; during a change the replicas from before keep answering until "
    "every new one runs.",
    ModelState.DEPLOYED: "Every replica runs: the endpoint answers.",
    ModelState.STOPPING: "The replicas are stopping: the endpoint stops answering once "
    "they are gone.",
    ModelState.STOPPED: "No replica runs: the endpoint does not answer until the model is "
    "restarted or a build is deployed.",
    ModelState.FAILED: "The last deploy or its replicas failed (see the message): the "
    "endpoint may not answer. Restart it, deploy another build, or stop it.",
}
STOPPABLE = frozenset({ModelState.DEPLOYED, ModelState.FAILED})
RESTARTABLE = frozenset({ModelState.DEPLOYED, ModelState.STOPPED, ModelState.FAILED})
PROGRESS = re.compile(r"^(\d+)/(\d+) replicas? running")

T = TypeVar("T")


def _paths(view: kit.View) -> tuple[str, str]:
    """The model's id and the path of its Overview."""
    model_id = view.model_id
    return model_id, f"/projects/{view.project}/models/{model_id}"


def _replicas(n: int) -> str:
    return {1: "the only replica", 2: "both replicas"}.get(n, f"all {n} replicas")


def stop_question(model: Model, dep: Deployment | None) -> str:
    if dep is None:
        return f"Stop {kit.last(model.name)}? No replica of it runs; it becomes STOPPED."
    return (
        f"Stop ends {_replicas(dep.resources.replicas)} of build {kit.last(dep.build)}: "
        "the endpoint stops answering until the model is deployed or restarted."
    )


def restart_question(model: Model, dep: Deployment) -> str:
    build = kit.last(dep.build)
    n = dep.resources.replicas
    if model.state == ModelState.STOPPED:
        count = "1 replica" if n == 1 else f"{n} replicas"
        return (
            f"Restart starts build {build} again with {count} (its last deployment's "
            "resources and environment); no code change."
        )
    return f"Restart replaces {_replicas(n)} of build {build}; no code change."


def cancel_question(op: Operation) -> str:
    progress = f" ({op.progress})" if op.progress else ""
    if op.kind == OperationKind.CREATE_BUILD:
        return (
            f"Cancel building build {kit.last(op.target)}{progress}? The build stops, its "
            "partial output is removed, and nothing of it is deployed."
        )
    if op.rollout is not None and op.rollout.phase is not Phase.PROMOTING:
        return (
            f"Abort this {op.rollout.strategy.kind.value.lower()} rollout{progress}? All "
            "traffic goes back to the serving build at once, and the new build's replicas stop."
        )
    what = "restart" if op.kind == OperationKind.RESTART_MODEL else "deploy"
    return (
        f"Cancel the {what} in progress{progress}? The rollout ends now and the model "
        "goes back to what served before it."
    )


def cancellable(op: Operation | None) -> bool:
    return op is not None and not op.done and op.kind != OperationKind.STOP_MODEL


def promotable(op: Operation | None) -> bool:
    """A canary or shadow whose new build runs and has not begun taking over."""
    return (
        op is not None
        and not op.done
        and op.rollout is not None
        and (op.rollout.phase is Phase.BAKING)
    )


def promote_question(op: Operation) -> str:
    return (
        f"Promote now{f' ({op.progress})' if op.progress else ''}? The new build takes every "
        "request: the model's replicas roll to it, without waiting for the remaining steps "
        "or their gates."
    )


def progress_of(op: Operation | None) -> tuple[int, int] | None:
    """(running, wanted) from a rollout's progress ("2/3 replicas running")."""
    found = PROGRESS.match(op.progress) if op is not None else None
    return (int(found.group(1)), int(found.group(2))) if found else None


def curl_line(endpoint: str) -> str:
    return (
        f"curl -X POST {shlex.quote(endpoint)} -H 'Authorization: Bearer <invocation key>' "
        """-H 'Content-Type: application/json' -d '{"x": 1}'"""
    )


async def _maybe(call: Awaitable[T]) -> T | None:
    """The API's answer, or None when what it names is gone (NOT_FOUND)."""
    try:
        return await call
    except ClientError as e:
        if e.code == "NOT_FOUND":
            return None
        raise


async def _state(view: kit.View) -> tuple[Model, Deployment | None, Operation | None]:
    client = view.client
    model = await client.get_model(view.model)

    async def none() -> None:
        return None

    dep, op = await asyncio.gather(
        _maybe(client.get_deployment(model.active_deployment))
        if model.active_deployment
        else none(),
        _maybe(client.get_operation(model.running_operation))
        if model.running_operation
        else none(),
    )
    return model, dep, op


# ---- Overview -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    error: str = ""  # nothing came back (bad JSON, the endpoint not reachable)
    status: int = 0
    body: str = ""
    replica: str = ""
    build: str = ""
    elapsed_ms: int = 0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


async def load(view: kit.View) -> dict[str, Any]:
    model, dep, op = await _state(view)
    model_id, base = _paths(view)
    replicas = dep.replicas if dep is not None else ()
    return {
        "title": f"{model.display_name or model_id} · Overview",
        "model": model,
        "model_id": model_id,
        "base": base,
        "deployment": dep,
        "build": kit.last(dep.build) if dep is not None else "",
        "replicas": replicas,
        "running": kit.running(dep),
        "desired": dep.resources.replicas if dep is not None and model.state.active else 0,
        "meaning": MEANINGS.get(model.state, ""),
        "operation": op,
        "progress": progress_of(op),
        "cancellable": cancellable(op),
        "promotable": promotable(op),
        "promote_question": promote_question(op) if op is not None else "",
        "cancel_question": cancel_question(op) if op is not None else "",
        "can_stop": model.state in STOPPABLE,
        "can_restart": model.state in RESTARTABLE and dep is not None,
        "stop_question": stop_question(model, dep),
        "restart_question": restart_question(model, dep) if dep is not None else "",
        "curl": curl_line(model.endpoint),
        "result": None,
    }


async def confirm_stop(view: kit.View, form: FormData) -> str:
    model, dep, _ = await _state(view)
    return stop_question(model, dep)


async def stop(view: kit.View, form: FormData) -> str:
    model_id, base = _paths(view)
    op = await view.client.stop_model(view.model)
    view.session.flash("ok", f"Stopping {model_id}: operation {op.name} started.")
    return base


async def confirm_restart(view: kit.View, form: FormData) -> str:
    model, dep, _ = await _state(view)
    if dep is None:
        raise ClientError(
            "FAILED_PRECONDITION", f"{kit.last(model.name)} has no deployment to restart"
        )
    return restart_question(model, dep)


async def restart(view: kit.View, form: FormData) -> str:
    model_id, base = _paths(view)
    op = await view.client.restart_model(view.model)
    view.session.flash("ok", f"Restarting {model_id}: operation {op.name} started.")
    return base


async def _own_operation(view: kit.View, form: FormData) -> Operation:
    name = str(form.get("operation", ""))
    if not name:
        raise ClientError("INVALID_ARGUMENT", "no operation named")
    op = await view.client.get_operation(name)
    if op.model != view.model:  # (a form made by hand)
        raise ClientError("INVALID_ARGUMENT", f"{name} is not an operation of {view.model}")
    return op


async def confirm_cancel(view: kit.View, form: FormData) -> str:
    return cancel_question(await _own_operation(view, form))


async def cancel(view: kit.View, form: FormData) -> str:
    _, base = _paths(view)
    op = await view.client.cancel_operation((await _own_operation(view, form)).name)
    view.session.flash("ok", f"Operation {op.name} cancelled.")
    return base


async def confirm_promote(view: kit.View, form: FormData) -> str:
    return promote_question(await _own_operation(view, form))


async def promote(view: kit.View, form: FormData) -> str:
    _, base = _paths(view)
    op = await view.client.promote_rollout((await _own_operation(view, form)).name)
    view.session.flash("ok", f"Promoting: operation {op.name} rolls the model to the new build.")
    return base


def _pretty(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


async def send_test(view: kit.View, form: FormData) -> Answer:
    """Sends the box's JSON to the model's endpoint (as the API names it: never an address
    from the form) and reads what came back."""
    raw = str(form.get("body", ""))
    try:
        json.loads(raw)  # sent as typed, once it is JSON
    except ValueError as e:
        return Answer(error=f"The request is not JSON ({e}): nothing was sent.")
    model = await view.client.get_model(view.model)
    if not model.endpoint:
        return Answer(error="The model has no endpoint: nothing was sent.")
    key = str(form.get("key", "")).strip()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as http:
            r = await http.post(model.endpoint, content=raw.encode(), headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        state = "" if model.state.active else f" The model is {model.state.value}."
        if isinstance(e, httpx.TimeoutException):
            what = f"did not answer within {TEST_TIMEOUT_S:g} s"
        else:
            what = f"could not be reached: {(str(e) or type(e).__name__).rstrip('.')}"
        return Answer(error=f"The endpoint {model.endpoint} {what}.{state}")
    text = r.content[:MAX_SHOWN_BYTES].decode("utf-8", "replace")
    replica = build = ""
    try:
        reply = r.json()
    except ValueError:
        reply = None
    if isinstance(reply, dict):
        replica, build = str(reply.get("replica_id", "")), str(reply.get("build", ""))
    return Answer(
        status=r.status_code,
        body=_pretty(text) if len(r.content) <= MAX_SHOWN_BYTES else text,
        replica=replica,
        build=build,
        elapsed_ms=int(r.elapsed.total_seconds() * 1000),
    )


def _test_box(console: kit.Console) -> forms.Fragment:
    async def act(view: kit.View, form: FormData) -> str:
        result = await send_test(view, form)
        model_id, base = _paths(view)
        context = {"result": result, "model_id": model_id, "base": base}
        blocks = console.render_blocks("model.html", view, context, ("test_result",))
        return blocks["test_result"].strip()  # one element: the script puts it in place

    return act


# ---- Keys -----------------------------------------------------------------------------------


async def load_keys(view: kit.View) -> dict[str, Any]:
    model, keys = await kit.model_and_page(view, view.client.list_invocation_keys, KEYS_PAGE_SIZE)
    model_id, base = _paths(view)
    flashes = view.session.take_flashes()
    return {
        "title": f"{model.display_name or model_id} · Keys",
        "model": model,
        "model_id": model_id,
        "base": base,
        "keys": keys.items,
        "next_page": keys.next_page_token,
        "revoke_question": revoke_question,
        # A new key's secret: shown here once, in a box of its own with a copy button.
        "new_secrets": [text for kind, text in flashes if kind == SECRET],
        "flashes": [(kind, text) for kind, text in flashes if kind != SECRET],
    }


async def create_key(view: kit.View, form: FormData) -> str:
    _, base = _paths(view)
    description = str(form.get("description", "")).strip()
    key, secret = await view.client.create_invocation_key(view.model, description)
    view.session.flash(
        "ok",
        f"Invocation key {kit.last(key.name)} created. Copy its secret now: it will not be "
        "shown again.",
    )
    view.session.flash(SECRET, secret)
    return f"{base}/keys"


def _key_name(view: kit.View) -> str:
    return f"{view.model}/keys/{view.params['key']}"


def revoke_question(key_id: str) -> str:
    return (
        f"Revoke key {key_id}? Requests that send it get 401 within seconds; the model's "
        "other keys keep working. This cannot be undone."
    )


async def confirm_revoke(view: kit.View, form: FormData) -> str:
    return revoke_question(view.params["key"])


async def revoke_key(view: kit.View, form: FormData) -> str:
    _, base = _paths(view)
    key = await view.client.revoke_invocation_key(_key_name(view))
    view.session.flash("ok", f"Invocation key {kit.last(key.name)} revoked.")
    return f"{base}/keys"


def routes(console: kit.Console) -> list[BaseRoute]:
    model = "/projects/{project}/models/{model}"
    return [
        *live.page(
            console,
            model,
            "model.html",
            load,
            watch=kit.model_changes,
            live=("model_actions", "model_status", "replicas", "operation"),
        ),
        forms.action(console, f"{model}/stop", stop, confirm=confirm_stop),
        forms.action(console, f"{model}/restart", restart, confirm=confirm_restart),
        forms.action(console, f"{model}/cancel", cancel, confirm=confirm_cancel),
        forms.action(console, f"{model}/promote", promote, confirm=confirm_promote),
        forms.fragment(console, f"{model}/test", _test_box(console)),
        *live.page(console, f"{model}/keys", "keys.html", load_keys),
        forms.action(console, f"{model}/keys", create_key),
        forms.action(console, f"{model}/keys/{{key}}/revoke", revoke_key, confirm=confirm_revoke),
    ]
