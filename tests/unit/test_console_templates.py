"""The console's templates: what a live block may show, and that each renders at all."""

from __future__ import annotations

import re

from controlplane.console import kit

BLOCK = re.compile(r"{% block (\w+) %}(.*?){% endblock %}", re.S)


def test_live_blocks_show_nothing_of_the_session_but_its_role() -> None:
    """Pages following one address share their live blocks' rendering (live._Rendered):
    a block may use the role's flags and the CSRF token (put in per page), never the
    session, the caller's name or the request's path."""
    env = kit.environment()
    assert env.loader is not None
    found = []
    for name in env.loader.list_templates():
        text, _, _ = env.loader.get_source(env, name)
        for block, body in BLOCK.findall(text):
            if block in ("content", "title"):
                continue
            for word in ("session", "caller", "path", "flashes"):
                if re.search(rf"(?<![\w.]){word}\b", body):
                    found.append(f"{name} {block}: {word}")
    assert found == []
