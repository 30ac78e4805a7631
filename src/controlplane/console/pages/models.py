"""Models: every model of a project, with its state, active build, replicas running and
desired, endpoint, health and last change; filtered, paginated, live."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute

from controlplane.api.client import ClientError
from controlplane.console import kit, live
from controlplane.domain.types import Deployment, Model

PAGE_SIZE = 50
SCAN_PAGE = 500  # a filter reads the project's models this many at a time


@dataclass(frozen=True)
class Row:
    model: Model
    deployment: Deployment | None

    @property
    def id(self) -> str:
        return kit.last(self.model.name)

    @property
    def running(self) -> int:
        return kit.running(self.deployment)

    @property
    def desired(self) -> int:
        if self.deployment is None or not self.model.state.active:
            return 0
        return self.deployment.resources.replicas

    @property
    def build(self) -> str:
        return kit.last(self.deployment.build) if self.deployment else ""


def matches(model: Model, words: str) -> bool:
    """Every word of the filter is in the model's id, display name, state or health."""
    text = " ".join(
        (kit.last(model.name), model.display_name, model.state.value, model.health)
    ).lower()
    return all(word in text for word in words.lower().split())


async def _rows(view: kit.View, models: list[Model]) -> list[Row]:
    async def one(model: Model) -> Row:
        if not model.active_deployment:
            return Row(model, None)
        try:
            return Row(model, await view.client.get_deployment(model.active_deployment))
        except ClientError as e:
            if e.code == "UNAUTHENTICATED":
                raise
            return Row(model, None)

    return list(await asyncio.gather(*(one(m) for m in models)))


async def load(view: kit.View) -> dict[str, Any]:
    words = view.query("filter").strip()
    token = view.query("page")
    if words:
        found: list[Model] = []
        scan = ""
        while True:
            page = await view.client.list_models(view.parent, SCAN_PAGE, scan)
            found.extend(m for m in page.items if matches(m, words))
            scan = page.next_page_token
            if not scan:
                break
        start = int(token) if token.isdecimal() else 0
        chosen = found[start : start + PAGE_SIZE]
        nxt = str(start + PAGE_SIZE) if start + PAGE_SIZE < len(found) else ""
    else:
        page = await view.client.list_models(view.parent, PAGE_SIZE, token)
        chosen, nxt = page.items, page.next_page_token
    return {
        "title": "Models",
        "rows": await _rows(view, chosen),
        "filter": words,
        "next_page": nxt,
        "this_page": token,
    }


async def watch(view: kit.View) -> Any:
    async for event in view.client.watch_models(view.parent):
        yield event


def routes(console: kit.Console) -> list[BaseRoute]:
    return live.page(
        console,
        "/projects/{project}/models",
        "models.html",
        load,
        watch=watch,
        live=("models_table",),
        # Not {path}/live: "live" may be a model's id (its Overview is …/models/live).
        live_path="/projects/{project}/models/-live",
    )
