"""The web console in this process against a server, and a signed-in HTTP client of it
(the browser tests drive Chromium instead: tests/browser)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from controlplane.api.client import Client
from controlplane.console.web import ConsoleServer


@contextlib.asynccontextmanager
async def console_of(grpc_address: str) -> AsyncIterator[ConsoleServer]:
    console = ConsoleServer(
        lambda token: Client(grpc_address, token=token), "127.0.0.1", 0, grpc_address
    )
    await console.start()
    try:
        yield console
    finally:
        await console.stop()


def field(html: str, name: str) -> str:
    """The value of the hidden input ``name`` in a page."""
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found, f"no {name} field in the page"
    return found.group(1)


@dataclass
class Web:
    """A signed-in user of the console, over plain HTTP (no JavaScript)."""

    http: httpx.AsyncClient
    csrf: str = ""

    async def sign_in(self, token: str = "", project: str = "") -> httpx.Response:
        form = await self.http.get("/sign-in")
        r = await self.http.post(
            "/sign-in",
            data={
                "sign_in_token": field(form.text, "sign_in_token"),
                "token": token,
                "project": project,
            },
        )
        if r.status_code == 303:
            page = await self.http.get(r.headers["location"])
            self.csrf = field(page.text, "csrf")
        return r

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.http.get(path, params=params)

    async def events(
        self, path: str, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """A live stream of the console (server-sent events), as (event, data) pairs."""
        async with self.http.stream("GET", path, headers=headers, timeout=None) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            name = ""
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    yield name, json.loads(line.removeprefix("data: "))

    async def post(self, path: str, **data: Any) -> httpx.Response:
        """A form post with this session's CSRF token; ``confirmed`` is yes unless given."""
        data.setdefault("csrf", self.csrf)
        data.setdefault("confirmed", "yes")
        return await self.http.post(path, data=data)


@contextlib.asynccontextmanager
async def web_of(console: ConsoleServer, token: str = "", project: str = "") -> AsyncIterator[Web]:
    async with httpx.AsyncClient(base_url=console.url, timeout=30) as http:
        web = Web(http)
        r = await web.sign_in(token, project)
        assert r.status_code == 303, r.text
        yield web
