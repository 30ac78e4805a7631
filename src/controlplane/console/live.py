"""Pages and their live updates over server-sent events.

A page is a template, a ``load`` that asks the API for what it shows, and optionally a
``watch`` (an API stream that says when it changed) with the names of the template blocks
that change: ``page()`` makes its GET route and its event stream, which re-loads and sends
each changed block (``<… id="block-name">``) to the page's own script to swap in place.
Pages open on the same address, by tokens that see the same projects, share their watch
and loads (``hubs.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from controlplane.api.client import ClientError
from controlplane.console.hubs import Hubs
from controlplane.console.kit import Console, Denied, View, describe, sign_in_redirect

Load = Callable[[View], Awaitable[dict[str, Any]]]
Watch = Callable[[View], AsyncIterator[object]]

COALESCE_S = 0.05  # changes this close together are sent as one update
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream


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
    per change (console/hubs.py); each is rendered for its own session."""

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
        if watch is not None:  # the stream keeps the page's query (its filter, its page)
            url = stream_path.format(**request.path_params)
            query = request.url.query
            context = {"live_url": f"{url}?{query}" if query else url, **context}
        return console.page_response(template, view, context)

    routes: list[BaseRoute] = [Route(path, full, methods=["GET"])]
    if watch is not None:
        hubs: Hubs[View] = Hubs()

        rendered = _Rendered()

        async def still_valid(view: View) -> None:
            """Raises UNAUTHENTICATED once the session has ended (signed out, idle, too
            old) or the API refuses its token (revoked, expired)."""
            if await console.sessions.get(view.session.id) is None:
                raise ClientError("UNAUTHENTICATED", "the session has ended")
            await view.client.get_caller()

        async def changes(view: View) -> AsyncIterator[str]:
            sent: dict[str, str] = {}
            # Only pages whose tokens see the same projects share: a token of project A
            # asking for project B's stream gets a hub of its own, whose reads the API
            # refuses (NOT_FOUND), never B's data read by another token.
            scope = view.session.caller.project
            key = f"{scope}|{view.request.url.path}?{view.request.query_params}"
            async for context in hubs.follow(key, view, load, watch, _coalesced, still_valid):
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
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise  # ours: the reader stopped
            # grpc raises CancelledError when the stream's channel is closed under it
            # (its session ended): to the reader, the stream is gone.
            failure.append(ClientError("UNAVAILABLE", "the API stream was closed"))
        except Exception as e:  # handed to the reader
            failure.append(e)
        else:
            failure.append(StopAsyncIteration())
        finally:
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
