"""For admins: a project's API tokens (create one, its secret shown once; revoke) and its
audit records. A caller the API does not let list them gets its refusal in words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData
from starlette.routing import BaseRoute

from controlplane.console import forms, kit, live
from controlplane.domain.access import AuditRecord, Role

PAGE_SIZE = 50
SECRET = "secret"  # the kind of flash that carries a new token's secret to the next page
MAX_TTL_HOURS = 24 * 366 * 10


def _tokens_path(view: kit.View) -> str:
    return f"/projects/{view.project}/tokens"


def _pending_secret(view: kit.View) -> tuple[str, list[tuple[str, str]]]:
    """A token's secret the last action left (shown this once), and the other messages."""
    secret, others = "", []
    for kind, text in view.session.take_flashes():
        if kind == SECRET:
            secret = text
        else:
            others.append((kind, text))
    return secret, others


async def tokens(view: kit.View) -> dict[str, Any]:
    token = view.query("page")
    page = await view.client.list_tokens(view.parent, PAGE_SIZE, token)
    secret, flashes = _pending_secret(view)
    return {
        "title": "Tokens",
        "tokens": page.items,
        "next_page": page.next_page_token,
        "roles": [(r.label, r.label) for r in Role],
        "new_secret": secret,
        "flashes": flashes,  # what the page shows of the session's messages
        "back": _tokens_path(view),
    }


def _ttl_s(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        hours = float(text)
    except ValueError:
        raise ValueError(f"expires in: {text!r} is not a number of hours") from None
    if not 0 < hours <= MAX_TTL_HOURS:
        raise ValueError(f"expires in: between 0 and {MAX_TTL_HOURS:,} hours, got {text}")
    return hours * 3600


async def create_token(view: kit.View, form: FormData) -> str:
    label = str(form.get("role", "")).strip().upper()
    if label not in Role.__members__:
        raise ValueError(f"role: one of {', '.join(r.label for r in Role)}")
    role = Role[label]
    ttl_s = _ttl_s(str(form.get("expires_hours", "")))
    description = str(form.get("description", "")).strip()
    made, secret = await view.client.create_token(view.parent, role, description, ttl_s)
    view.session.flash(
        "ok",
        f"Token {kit.last(made.name)} ({role.label}) created. Copy its secret now: "
        "it will not be shown again.",
    )
    view.session.flash(SECRET, secret)
    return _tokens_path(view)


def _token_name(view: kit.View) -> str:
    return f"projects/{view.project}/tokens/{view.params['token']}"


async def confirm_revoke(view: kit.View, form: FormData) -> str:
    return (
        f"Revoke token {view.params['token']}? Every call that uses it is refused from now "
        "on, and console sessions signed in with it end. This cannot be undone."
    )


async def revoke_token(view: kit.View, form: FormData) -> str:
    revoked = await view.client.revoke_token(_token_name(view))
    view.session.flash("ok", f"Token {kit.last(revoked.name)} revoked.")
    return _tokens_path(view)


@dataclass(frozen=True)
class AuditRow:
    record: AuditRecord

    @property
    def method(self) -> str:
        """/modellifecycle.v1.ModelLifecycle/CreateToken -> CreateToken."""
        return self.record.method.rsplit("/", 1)[-1]

    @property
    def operations_page(self) -> str:
        """Where the operation the call started is listed: its model's Operations page."""
        parts = self.record.resource.split("/")
        if not self.record.operation or len(parts) < 4 or parts[2] != "models":
            return ""
        return "/" + "/".join(parts[:4]) + "/operations"


async def audit(view: kit.View) -> dict[str, Any]:
    token = view.query("page")
    page = await view.client.list_audit_records(view.parent, PAGE_SIZE, token)
    return {
        "title": "Audit",
        "records": [AuditRow(r) for r in page.items],
        "next_page": page.next_page_token,
    }


def routes(console: kit.Console) -> list[BaseRoute]:
    return [
        *live.page(console, "/projects/{project}/tokens", "tokens.html", tokens),
        forms.action(console, "/projects/{project}/tokens", create_token),
        forms.action(
            console,
            "/projects/{project}/tokens/{token}/revoke",
            revoke_token,
            confirm=confirm_revoke,
        ),
        *live.page(console, "/projects/{project}/audit", "audit.html", audit),
    ]
