"""The console's machinery, shared by every page: who is signed in, rendering, live updates
over server-sent events, and forms that change something (CSRF-checked, errors in words).

A page is a template, a ``load`` that asks the API for what it shows, and optionally a
``watch`` (an API stream that says when it changed) with the names of the template blocks
that change: ``page()`` makes its GET route and ``{path}/live``, which re-loads and sends
each changed block (``<… id="block-name">``) to the page's own script to swap in place.
An ``action()`` is a POST that calls the API, then redirects (303) with a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jinja2
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from controlplane.api.client import Client, ClientError
from controlplane.console.live import Hubs
from controlplane.console.sessions import COOKIE, Session, Sessions
from controlplane.domain.access import Role
from controlplane.domain.states import ReplicaState
from controlplane.domain.types import Deployment

log = logging.getLogger(__name__)

COALESCE_S = 0.05  # changes this close together are sent as one update
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream


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


def running(deployment: Deployment | None) -> int:
    """How many of a deployment's replicas run."""
    if deployment is None:
        return 0
    return sum(r.state == ReplicaState.RUNNING for r in deployment.replicas)


Load = Callable[[View], Awaitable[dict[str, Any]]]
Watch = Callable[[View], AsyncIterator[object]]
Act = Callable[[View, FormData], Awaitable[str]]


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
    target = request.url.path
    return RedirectResponse(f"/sign-in?next={target}" if target != "/" else "/sign-in", 303)


def safe_path(path: str, default: str) -> str:
    """A redirect target from a form: a path on this site, never another site's URL."""
    ok = path.startswith("/") and not path.startswith("//") and "\\" not in path
    return path if ok else default


# ---- pages ----------------------------------------------------------------------------------


def page(
    console: Console,
    path: str,
    template: str,
    load: Load,
    watch: Watch | None = None,
    live: tuple[str, ...] = (),
    live_path: str = "",
) -> list[BaseRoute]:
    """The GET route of a page and, with ``watch``, its event stream at ``live_path``
    (default ``{path}/live``). Pages open on the same address share one watch and one load
    per change (console/live.py); each is rendered for its own session."""

    stream_path = live_path or f"{path}/live"

    async def full(request: Request) -> Response:
        try:
            view = await console.view(request)
        except Denied:
            return sign_in_redirect(request)
        try:
            context = await load(view)
        except ClientError as e:
            if e.code == "UNAUTHENTICATED":
                await console.sessions.end(view.session.id)
                return sign_in_redirect(request)
            return console.error_page(view, e)
        if watch is not None:
            context = {"live_url": stream_path.format(**request.path_params), **context}
        return console.page_response(template, view, context)

    routes: list[BaseRoute] = [Route(path, full, methods=["GET"])]
    if watch is not None:
        hubs: Hubs[View] = Hubs()

        rendered = _Rendered()

        async def changes(view: View) -> AsyncIterator[str]:
            sent: dict[str, str] = {}
            key = f"{view.request.url.path}?{view.request.query_params}"
            async for context in hubs.follow(key, view, load, watch, _coalesced, _still_valid):
                blocks = rendered.get(context, view, _blocks)
                for name, html in blocks.items():
                    html = html.replace(CSRF_MARK, view.session.csrf)
                    if sent.get(name) != html:
                        sent[name] = html
                        yield sse("swap", {"id": name.replace("_", "-"), "html": html})

        def _blocks(view: View, context: Mapping[str, Any]) -> dict[str, str]:
            return console.render_blocks(template, view, {**context, "csrf": CSRF_MARK}, live)

        routes.append(Route(stream_path, stream_route(console, changes), methods=["GET"]))
    return routes


CSRF_MARK = "csrf-of-this-session"  # in a shared rendering; each page gets its own token


class _Rendered:
    """The live blocks of the newest context, rendered once per role and project: the
    pages following one address share them (each with its own CSRF token put in). Live
    blocks show what was loaded and the buttons of the role, nothing else of the session
    (tests/unit/test_console_templates.py keeps it so)."""

    def __init__(self) -> None:
        self._context: Mapping[str, Any] | None = None
        self._by: dict[tuple[int, str, str], dict[str, str]] = {}

    def get(
        self,
        context: Mapping[str, Any],
        view: View,
        render: Callable[[View, Mapping[str, Any]], dict[str, str]],
    ) -> dict[str, str]:
        if context is not self._context:
            self._context, self._by = context, {}
        key = (int(view.session.caller.role), view.session.caller.project, view.project)
        if key not in self._by:
            self._by[key] = render(view, context)
        return self._by[key]


async def _still_valid(view: View) -> None:
    """Raises the API's UNAUTHENTICATED once the session's token is revoked or expired."""
    await view.client.get_caller()


def stream_route(
    console: Console, events: Callable[[View], AsyncIterator[str]]
) -> Callable[[Request], Awaitable[Response]]:
    """A GET route answering with server-sent events: ``events(view)``'s, each already
    framed by ``sse()``, with keep-alives; it ends with ``signed-out`` once the token no
    longer works, and with ``failed`` (the API's reason) on any other refusal."""

    async def route(request: Request) -> Response:
        try:
            view = await console.view(request)
        except Denied:
            return Response("signed out", status_code=401)

        async def body() -> AsyncIterator[str]:
            yield ": live\n\n"
            try:
                async for chunk in _with_keepalive(events(view)):
                    yield chunk
            except ClientError as e:
                if e.code == "UNAUTHENTICATED":
                    await console.sessions.end(view.session.id)
                    yield sse("signed-out", {})
                else:
                    yield sse("failed", {"message": describe(e)})

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return route


def sse(event: str, data: Mapping[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _coalesced(source: AsyncIterator[object]) -> AsyncIterator[None]:
    """One tick per burst of ``source``'s items (the first at once, then at most one per
    COALESCE_S); the source's error comes out of the iteration."""
    changed = asyncio.Event()
    failure: list[BaseException] = []

    async def pump() -> None:
        try:
            async for _ in source:
                changed.set()
        except Exception as e:  # handed to the reader
            failure.append(e)
        if not failure:
            failure.append(StopAsyncIteration())
        changed.set()

    task = asyncio.create_task(pump())
    try:
        while True:
            await changed.wait()
            await asyncio.sleep(COALESCE_S)
            changed.clear()
            if failure:
                if not isinstance(failure[0], StopAsyncIteration):
                    raise failure[0]
                return
            yield None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def _with_keepalive(source: AsyncIterator[str]) -> AsyncIterator[str]:
    iterator = source.__aiter__()
    pending: asyncio.Task[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_S)
            if not done:
                yield ": keep-alive\n\n"
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(BaseException):
                await aclose()


# ---- forms that change something -------------------------------------------------------------


Confirm = Callable[[View, FormData], Awaitable[str]]
Fragment = Callable[[View, FormData], Awaitable[str]]


async def checked_form(
    console: Console, request: Request, **limits: int
) -> tuple[View, FormData] | Response:
    """The signed-in view and its form, or the response that refuses it (no session: to
    sign-in; a missing or wrong CSRF token, or another site's origin: 403). ``limits``:
    Starlette's form limits (max_files, max_fields, max_part_size)."""
    try:
        view = await console.view(request)
    except Denied:
        return sign_in_redirect(request)
    form = await request.form(**limits)
    given = str(form.get("csrf", "")) or request.headers.get("x-csrf-token", "")
    if not view.session.csrf_ok(given) or not same_origin(request):
        html = console.render(
            "error.html",
            view,
            {
                "flashes": [],
                "error": "This form was not sent by this console page (its CSRF token is "
                "missing or stale). Reload the page and try again.",
            },
        )
        return HTMLResponse(html, status_code=403)
    return view, form


def action(console: Console, path: str, act: Act, confirm: Confirm | None = None) -> Route:
    """A POST route: CSRF-checked, then ``act(view, form)`` calls the API and returns the
    path to go to (it may ``view.session.flash`` what happened). A refusal of the API comes
    back as a message in words on the page the form names in ``back``.

    With ``confirm``, a form not yet confirmed (its ``confirmed`` field is not ``yes``: the
    page's script asks with a dialog and sets it) gets a page that asks, in the words
    ``confirm(view, form)`` returns, with OK and Cancel."""

    async def route(request: Request) -> Response:
        checked = await checked_form(console, request)
        if isinstance(checked, Response):
            return checked
        view, form = checked
        back = safe_path(str(form.get("back", "")), "/")
        if confirm is not None and form.get("confirmed") != "yes":
            try:
                question = await confirm(view, form)
            except ClientError as e:
                view.session.flash("error", describe(e))
                return RedirectResponse(back, 303)
            fields = [(k, str(v)) for k, v in form.multi_items() if k not in ("confirmed",)]
            return console.page_response(
                "confirm.html",
                view,
                {
                    "title": "Confirm",
                    "question": question,
                    "action": path_of(request),
                    "fields": fields,
                    "back": back,
                },
            )
        try:
            target = await act(view, form)
        except ClientError as e:
            if e.code == "UNAUTHENTICATED":
                await console.sessions.end(view.session.id)
                return sign_in_redirect(request)
            view.session.flash("error", describe(e))
            return RedirectResponse(back, 303)
        except ValueError as e:  # a form value the console could not read
            view.session.flash("error", f"Not valid: {e}")
            return RedirectResponse(back, 303)
        return RedirectResponse(safe_path(target, back), 303)

    return Route(path, route, methods=["POST"])


def fragment(console: Console, path: str, act: Fragment) -> Route:
    """A POST route answering with a piece of HTML (a form with ``data-target`` puts it in
    place of that element, whose id the script sends as ``target``; the piece must carry the
    same id): CSRF-checked; a refusal of the API is the piece's own text, in that element."""

    async def route(request: Request) -> Response:
        checked = await checked_form(console, request)
        if isinstance(checked, Response):
            return checked
        view, form = checked
        try:
            return HTMLResponse(await act(view, form))
        except ClientError as e:
            if e.code == "UNAUTHENTICATED":
                await console.sessions.end(view.session.id)
            target = str(form.get("target", ""))
            html = console.render(
                "fragment_error.html", view, {"error": describe(e), "target_id": target}
            )
            return HTMLResponse(html, status_code=200)

    return Route(path, route, methods=["POST"])


def path_of(request: Request) -> str:
    return request.url.path


def same_origin(request: Request) -> bool:
    """A browser names where a POST comes from; another site's is refused (defence in
    depth beside the CSRF token and SameSite=Strict)."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] == host
