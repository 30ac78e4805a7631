"""An apply made while Serve still builds (imports) an application it hands over again
unchanged: Serve compares code versions only once a build is done, and would cancel
that build and start it over. The apply waits for it instead, so one model's change
never restarts another's deploy (and many at once never keep each other from starting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ray.serve.context import _get_global_client

from tests.helpers import app_spec, eventually
from workers.backend import Backend

pytestmark = pytest.mark.ray


def serve_says(app: str) -> dict[str, Any] | None:
    client = _get_global_client()
    assert client is not None, "Serve runs on the session's cluster"
    found: dict[str, Any] | None = client.get_serve_details()["applications"].get(app)
    return found


def cancelled_builds(app: str) -> int:
    """What Serve's controller logged each time it cancelled ``app``'s build."""
    from ray._private import worker

    node = worker._global_node
    assert node is not None, "the session's Ray cluster runs in this process"
    logs = Path(node.get_logs_dir_path()) / "serve"
    said = f"Received new config for application '{app}'. Cancelling previous request."
    return sum(f.read_text(errors="replace").count(said) for f in logs.glob("controller_*.log"))


async def test_an_apply_waits_for_serve_to_build_what_it_hands_over_again(
    ray_backend: Backend,
) -> None:
    a, b = app_spec("building-a"), app_spec("building-b")
    try:
        await ray_backend.apply([a])
        first = serve_says(a.app_name)
        assert first is not None and not first["deployments"], "a is being built"
        assert await ray_backend.until_built() == 1, "waited for a"
        after = serve_says(a.app_name)
        assert after is not None and after["deployments"], "a was built by then"
        await ray_backend.apply([a, b])  # a handed over again, unchanged
        await eventually(
            "b built", lambda: bool((serve_says(b.app_name) or {}).get("deployments")), 60
        )
        assert cancelled_builds(a.app_name) == 0, "a's build was started over"
    finally:
        await ray_backend.apply([])
        await eventually("both deleted", lambda: not serve_says(a.app_name), 60)
        await eventually("both deleted", lambda: not serve_says(b.app_name), 60)
