"""The console as one ASGI application: sign-in and sign-out, the pages of ``pages/``,
static files, and the headers that keep it out of frames and other sites' scripts."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controlplane.api.client import Client, ClientError
from controlplane.console import forms, kit
from controlplane.console.pages import admin, builds, deployments, model, models, operations
from controlplane.console.pages import signals as signal_pages
from controlplane.console.sessions import COOKIE, SIGN_IN_COOKIE, Sessions

STATIC = Path(__file__).parent / "static"

# Scripts and styles only from this console's own files; no frames of it anywhere; forms
# post only here.
POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
    "object-src 'none'"
)
HEADERS = [
    (b"content-security-policy", POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name for name, _ in headers}
                headers.extend(h for h in HEADERS if h[0] not in names)
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def make_app(
    connect: Callable[[str], Client],
    *,
    secure: bool = False,
    server: str = "",
    sessions: Sessions | None = None,
) -> Starlette:
    """The console, signing in to the API through ``connect(token)``. ``secure``: it is
    served over TLS (cookies get Secure)."""
    sessions = sessions or Sessions(connect)
    console = kit.Console(sessions, secure=secure, server=server)
    routes: list[BaseRoute] = [
        Route("/", _home(console), methods=["GET"]),
        Route("/sign-in", _sign_in_form(console), methods=["GET"]),
        Route("/sign-in", _sign_in(console), methods=["POST"]),
        forms.action(console, "/sign-out", _sign_out(console)),
        Route("/switch", _switch(console), methods=["GET"]),
        Route("/healthz", lambda _: Response("ok"), methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    for module in (models, model, deployments, builds, signal_pages, operations, admin):
        routes.extend(module.routes(console))
    app = Starlette(routes=routes, lifespan=_lifespan(sessions))
    app.state.console = console
    return app  # the caller wraps it: SecurityHeaders(app)


def _lifespan(sessions: Sessions) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await sessions.close()  # every signed-in session's channel to the API

    return lifespan


def wrapped(app: Starlette) -> ASGIApp:
    return SecurityHeaders(app)


def _home(console: kit.Console) -> Callable[[Request], object]:
    async def home(request: Request) -> Response:
        try:
            view = await console.view(request)
        except kit.Denied:
            return RedirectResponse("/sign-in", 303)
        project = console.base(view)["project"]
        return RedirectResponse(f"/projects/{project}/models", 303)

    return home


def _sign_in_form(console: kit.Console) -> Callable[[Request], object]:
    async def form(request: Request) -> Response:
        return _sign_in_page(console, request, "", 200)

    return form


def _sign_in_page(console: kit.Console, request: Request, error: str, status: int) -> Response:
    nonce = secrets.token_urlsafe(24)
    html = console.render(
        "sign_in.html",
        None,
        {
            "flashes": [("error", error)] if error else [],
            "sign_in_token": nonce,
            "next": kit.safe_path(request.query_params.get("next", ""), "/"),
            "server": console.server,
            "csrf": "",
        },
    )
    response = HTMLResponse(html, status_code=status)
    _cookie(console, response, SIGN_IN_COOKIE, nonce, max_age=1800)
    return response


def _sign_in(console: kit.Console) -> Callable[[Request], object]:
    async def sign_in(request: Request) -> Response:
        form = await request.form()
        given = str(form.get("sign_in_token", ""))
        expected = request.cookies.get(SIGN_IN_COOKIE, "")
        if not given or not secrets.compare_digest(given, expected):
            return _sign_in_page(
                console, request, "This sign-in form was stale: please try again.", 403
            )
        token = str(form.get("token", "")).strip()
        try:
            session = await console.sessions.sign_in(token, request.cookies.get(COOKIE, ""))
        except ClientError as e:
            why = (
                "That token is not valid (unknown, revoked or expired)."
                if e.code == "UNAUTHENTICATED"
                else kit.describe(e)
            )
            return _sign_in_page(console, request, why, 401)
        project = str(form.get("project", "")).strip()
        if session.projects_fixed or not project:
            project = session.caller.project if session.projects_fixed else "default"
        target = kit.safe_path(str(form.get("next", "")), "/")
        if target == "/":
            target = f"/projects/{project}/models"
        response = RedirectResponse(target, 303)
        _cookie(console, response, COOKIE, session.id, max_age=int(console.sessions.max_age_s))
        response.delete_cookie(SIGN_IN_COOKIE, path="/")
        return response

    return sign_in


def _sign_out(console: kit.Console) -> forms.Act:
    async def sign_out(view: kit.View, form: object) -> str:
        await console.sessions.end(view.session.id)
        return "/sign-in"

    return sign_out


def _switch(console: kit.Console) -> Callable[[Request], object]:
    async def switch(request: Request) -> Response:
        project = request.query_params.get("project", "").strip()
        ok = project and all(c.isalnum() or c in "-_" for c in project)
        return RedirectResponse(f"/projects/{project}/models" if ok else "/", 303)

    return switch


def _cookie(console: kit.Console, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=console.secure,
    )
