"""(being written)"""

from __future__ import annotations

from starlette.routing import BaseRoute

from controlplane.console import kit


def routes(console: kit.Console) -> list[BaseRoute]:
    return []
