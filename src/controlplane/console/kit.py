"""What every page of the console shares: who is signed in (``View``), rendering (the
templates, their filters, an API refusal in words) and where to send a person next.
Pages and their live streams are made by ``live.py``, forms that change something by
``forms.py``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse

from controlplane.api.client import Client, ClientError
from controlplane.console.sessions import COOKIE, Session, Sessions
from controlplane.domain.access import Role
from controlplane.domain.states import ReplicaState
from controlplane.domain.types import Deployment, Model, Page

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class View:
    """One request of a signed-in user: its session, path parameters and query."""

    request: Request
    session: Session
    params: Mapping[str, str]

    @property
    def client(self) -> Client:
        return self.session.client

    @property
    def project(self) -> str:
        return self.params.get("project", "")

    @property
    def parent(self) -> str:
        return f"projects/{self.project}"

    @property
    def model(self) -> str:
        """The full name of the model the path names: projects/{p}/models/{m}."""
        return f"projects/{self.project}/models/{self.model_id}"

    @property
    def model_id(self) -> str:
        return self.params["model"]

    @property
    def model_path(self) -> str:
        """The model's Overview: /projects/{p}/models/{m} (its other pages are below it)."""
        return f"/projects/{self.project}/models/{self.model_id}"

    def query(self, key: str, default: str = "") -> str:
        return self.request.query_params.get(key, default)

    def can(self, role: Role) -> bool:
        return self.session.can(role)


async def model_changes(view: View) -> AsyncIterator[object]:
    """A watch for the pages of one model: each of its events (what changed is re-loaded)."""
    async for event in view.client.watch_model(view.model):
        yield event


async def model_and_page(
    view: View, lister: Callable[[str, int, str], Awaitable[Page[T]]], size: int
) -> tuple[Model, Page[T]]:
    """The model the path names and one page (``?page=``) of what ``lister`` lists of it,
    e.g. ``view.client.list_builds``, both asked for at once."""
    model, page = await asyncio.gather(
        view.client.get_model(view.model), lister(view.model, size, view.query("page"))
    )
    return model, page


def running(deployment: Deployment | None) -> int:
    """How many of a deployment's replicas run."""
    if deployment is None:
        return 0
    return sum(r.state == ReplicaState.RUNNING for r in deployment.replicas)


class Denied(Exception):
    """A request the console itself refuses (no session, a bad CSRF token)."""


# ---- rendering ------------------------------------------------------------------------------


def _ago(when: datetime | None) -> str:
    if when is None:
        return "—"
    seconds = max(0.0, (datetime.now(UTC) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def _iso(when: datetime | None) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if when else "—"


def last(name: str) -> str:
    """The last part of a resource name: builds/4 → 4, models/iris → iris."""
    return name.rsplit("/", 1)[-1] if name else ""


def _badge(state: object) -> str:
    """A CSS class for a state or health word (state-deployed, state-failed, ...)."""
    word = getattr(state, "name", str(state)).lower().replace("_", "-")
    return f"state-{word or 'none'}"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("controlplane.console", "templates"),
        autoescape=True,  # every value is text unless a template says otherwise
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ago=_ago, iso=_iso, last=last, badge=_badge)
    env.globals.update(Role=Role)
    return env


def describe(e: ClientError) -> str:
    """An API refusal in words for a person: the server's own message, never a trace."""
    words = {
        "PERMISSION_DENIED": "Not allowed",
        "NOT_FOUND": "Not found",
        "FAILED_PRECONDITION": "Not now",
        "INVALID_ARGUMENT": "Not valid",
        "ALREADY_EXISTS": "Already exists",
        "UNAUTHENTICATED": "Signed out",
        "UNAVAILABLE": "The server is not reachable",
        "RESOURCE_EXHAUSTED": "Too big",
        "ABORTED": "Changed meanwhile",
    }
    head = words.get(e.code, e.code.replace("_", " ").capitalize())
    details = "; ".join(f"{f}: {why}" for f, why in e.violations)
    return f"{head}: {e.message}" + (f" ({details})" if details else "")


class Console:
    """What every route shares: the sessions, the templates and whether cookies are Secure."""

    def __init__(self, sessions: Sessions, secure: bool = False, server: str = "") -> None:
        self.sessions = sessions
        self.secure = secure
        self.server = server  # the API's address, shown in the footer
        self.templates = environment()

    # ---- sessions ----

    async def view(self, request: Request) -> View:
        session = await self.sessions.get(request.cookies.get(COOKIE, ""))
        if session is None:
            raise Denied("sign-in")
        return View(request, session, dict(request.path_params))

    def base(self, view: View) -> dict[str, Any]:
        session = view.session
        return {
            "session": session,
            "caller": session.caller,
            "csrf": session.csrf,
            "project": view.project or _default_project(session),
            "path": view.request.url.path,
            "server": self.server,
            "can_deploy": session.can(Role.DEPLOYER),
            "can_admin": session.can(Role.ADMIN),
        }

    def render(self, template: str, view: View | None, context: Mapping[str, Any]) -> str:
        values = {**(self.base(view) if view else {"session": None}), **context}
        return self.templates.get_template(template).render(values)

    def render_blocks(
        self, template: str, view: View, context: Mapping[str, Any], blocks: tuple[str, ...]
    ) -> dict[str, str]:
        tmpl = self.templates.get_template(template)
        ctx = tmpl.new_context({**self.base(view), **context})
        return {name: "".join(tmpl.blocks[name](ctx)) for name in blocks}

    def page_response(
        self, template: str, view: View, context: Mapping[str, Any], status: int = 200
    ) -> HTMLResponse:
        context = {"flashes": view.session.take_flashes(), **context}
        return HTMLResponse(self.render(template, view, context), status_code=status)

    def error_page(self, view: View, e: ClientError) -> HTMLResponse:
        status = {"NOT_FOUND": 404, "PERMISSION_DENIED": 403, "INVALID_ARGUMENT": 400}.get(
            e.code, 502 if e.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") else 409
        )
        return self.page_response("error.html", view, {"error": describe(e)}, status)


def _default_project(session: Session) -> str:
    return session.caller.project if session.projects_fixed else "default"


def sign_in_redirect(request: Request) -> RedirectResponse:
    """To sign-in, and back to this page (its query too) once signed in."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if target == "/":
        return RedirectResponse("/sign-in", 303)
    return RedirectResponse(f"/sign-in?{urlencode({'next': target})}", 303)


def safe_path(path: str, default: str) -> str:
    """A redirect target from a form: a path on this site, never another site's URL."""
    ok = path.startswith("/") and not path.startswith("//") and "\\" not in path
    return path if ok else default
