"""Operations of one model: every build, deploy, stop and restart, newest first, with its
progress while it runs and its error in words once it failed; a running one can be
cancelled (deployers, with a confirmation). Live from the model's watch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import FormData
from starlette.routing import BaseRoute

from controlplane.console import forms, kit, live
from controlplane.domain.states import OperationKind
from controlplane.domain.types import Operation

PAGE_SIZE = 25

CODE_WORDS = {
    "CANCELLED": "cancelled on request",
    "DEADLINE_EXCEEDED": "it took longer than allowed",
    "FAILED_PRECONDITION": "what it needed was not there",
    "ABORTED": "interrupted",
    "UNAVAILABLE": "the cluster could not be reached",
    "RESOURCE_EXHAUSTED": "not enough room",
    "INVALID_ARGUMENT": "a value was not valid",
    "NOT_FOUND": "something it named does not exist",
    "INTERNAL": "an error inside the server",
    "UNKNOWN": "an error of unknown kind",
}
KIND_WORDS = {
    OperationKind.CREATE_BUILD: "Build",
    OperationKind.CREATE_DEPLOYMENT: "Deploy",
    OperationKind.STOP_MODEL: "Stop",
    OperationKind.RESTART_MODEL: "Restart",
}


def target_words(name: str) -> str:
    """projects/p/models/m/builds/4 -> build 4; .../deployments/2 -> deployment 2."""
    parts = name.split("/")
    if len(parts) >= 6 and parts[-2] in ("builds", "deployments"):
        return f"{parts[-2][:-1]} {parts[-1]}"
    if len(parts) == 4 and parts[2] == "models":
        return "the model"
    return name or "—"


@dataclass(frozen=True)
class Row:
    op: Operation

    @property
    def id(self) -> str:
        return kit.last(self.op.name)

    @property
    def kind(self) -> str:
        return KIND_WORDS.get(self.op.kind, self.op.kind.value.replace("_", " ").capitalize())

    @property
    def target(self) -> str:
        words = target_words(self.op.target)
        if self.op.deployment and self.op.deployment != self.op.target:
            words += f", then {target_words(self.op.deployment)}"
        return words

    @property
    def outcome(self) -> str:
        if not self.op.done:
            return "running"
        if self.op.error is None:
            return "done"
        return "cancelled" if self.op.error.code == "CANCELLED" else "failed"

    @property
    def error(self) -> str:
        """The failure as the server says it."""
        return self.op.error.message if self.op.error else ""

    @property
    def error_code(self) -> str:
        """The failure's gRPC code, and what that kind of failure means."""
        e = self.op.error
        if e is None:
            return ""
        words = CODE_WORDS.get(e.code)
        return f"{e.code} ({words})" if words else e.code


async def load(view: kit.View) -> dict[str, Any]:
    token = view.query("page")
    model, page = await kit.model_and_page(view, view.client.list_operations, PAGE_SIZE)
    base = f"{view.model_path}/operations"
    return {
        "title": f"Operations · {kit.last(model.name)}",
        "model": model,
        "model_id": kit.last(model.name),
        "rows": [Row(op) for op in page.items],
        "next_page": page.next_page_token,
        "this_page": token,
        "back": f"{base}?{urlencode({'page': token})}" if token else base,
    }


def _operation(view: kit.View) -> str:
    return f"operations/{view.params['operation']}"


async def confirm_cancel(view: kit.View, form: FormData) -> str:
    op = await view.client.get_operation(_operation(view))
    row = Row(op)
    return (
        f"Cancel the {row.kind.lower()} of {row.target} (operation {row.id})? "
        "It stops where it is and the model goes back to what it was before."
    )


async def cancel(view: kit.View, form: FormData) -> str:
    op = await view.client.cancel_operation(_operation(view))
    row = Row(op)
    if op.error is not None and op.error.code == "CANCELLED":
        view.session.flash("ok", f"{row.kind} of {row.target} cancelled.")
    elif op.done:
        view.session.flash("info", f"{row.kind} of {row.target} had already ended: {row.outcome}.")
    else:
        view.session.flash("info", f"Cancelling the {row.kind.lower()} of {row.target}…")
    return str(form.get("back", f"{view.model_path}/operations"))


def routes(console: kit.Console) -> list[BaseRoute]:
    path = "/projects/{project}/models/{model}/operations"
    return [
        *live.page(
            console,
            path,
            "operations.html",
            load,
            watch=kit.model_changes,
            live=("operations_table",),
        ),
        forms.action(console, f"{path}/{{operation}}/cancel", cancel, confirm=confirm_cancel),
    ]
