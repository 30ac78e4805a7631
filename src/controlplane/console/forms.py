"""Forms that change something: CSRF-checked POSTs that call the API, then redirect with
a message (``action``) or answer with a piece of HTML in place (``fragment``); a refusal
of the API comes back in words."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from controlplane.api.client import ClientError
from controlplane.console.kit import (
    Console,
    Denied,
    View,
    describe,
    safe_path,
    sign_in_redirect,
)

Act = Callable[[View, FormData], Awaitable[str]]
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
