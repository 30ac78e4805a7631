"""The architecture the README draws, checked against the code's real imports.

Each room (a module of ``controlplane``, or one of its packages, or ``workers``) may
import only the rooms listed for it; a new module must be placed here before it lands,
so the README's picture and this table stay the code's. And one module moves states:
no code but ``lifecycle`` calls the storage layer's state changes.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGES = {"api", "cli", "domain", "storage"}  # rooms that are packages of controlplane
UTILITIES = {"config", "logs", "tracing", "failpoints", "build_logs"}  # used across rooms

# Who may import whom, from the top of the README's picture down.
ALLOWED: dict[str, set[str]] = {
    "cli": {"api", "console", "domain", "local_cmd", "serve_cmd"},
    # The server's entry: its key file's error, said before anything starts.
    "serve_cmd": {"api", "console", "domain", "server", "storage"},
    # On the server's machine: the data dir and the database, no server.
    "local_cmd": {"backup", "storage"},
    # modelctl backup / restore: a consistent copy, the GC held off meanwhile.
    "backup": {"gc", "storage", "workers"},
    "console": {"api", "domain"},  # a client of the public API: api.client, nothing else
    "server": {
        "api",
        "access",
        "artifact_endpoint",
        "dispatcher",
        "exports",
        "files",
        "gc",
        "metrics",
        "reconciler",
        "rollouts",
        "service",
        "signals",
        "sources",
        "storage",
        "watch",
        "workers",
    },
    "api": {
        "access",
        "domain",
        "exports",
        "generated",
        "metrics",
        "series",
        "service",
        "signals",
        "sources",
        "watch",
        "workers",
    },
    "signals": {"domain", "lifecycle", "metrics", "series", "storage", "workers"},
    "series": {"domain", "workers"},
    "service": {"capacity", "domain", "files", "lifecycle", "sources", "storage", "workers"},
    "capacity": {"domain", "storage", "workers"},
    # Judges canary and shadow steps; lifecycle/traffic.py moves the split.
    "rollouts": {"domain", "lifecycle", "series", "signals", "storage"},
    "access": {"domain", "storage"},
    "watch": {"domain", "storage"},
    "exports": {"domain", "workers"},
    "metrics": {"domain"},
    # Builds for nodes that do not share the disk (workers.artifact_archive's files).
    "artifact_endpoint": {"workers"},
    # A server's files on its disk, and in the database for servers that share no disk.
    "files": {"storage", "workers"},
    "gc": {"domain", "files", "sources", "storage", "workers"},
    "dispatcher": {"apply_job", "build_job", "files", "sources", "storage", "workers"},
    "build_job": {"domain", "files", "lifecycle", "sources", "storage", "workers"},
    "apply_job": {"desired", "files", "lifecycle", "storage", "workers"},
    "reconciler": {"domain", "lifecycle", "storage", "workers"},
    "lifecycle": {"desired", "domain", "storage", "workers"},
    "desired": {"domain", "storage", "workers"},
    "sources": {"domain", "workers"},
    "storage": {"domain"},
    "domain": set(),
    "workers": set(),
    **{name: {"domain", "storage"} if name == "config" else set() for name in UTILITIES},
}
ALLOWED["logs"] = {"tracing"}


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ("workers", "modellifecycle"):
        return "generated" if parts[0] == "modellifecycle" else "workers"
    return parts[1] if len(parts) > 1 else "controlplane"


def rooms_imported() -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        rel = module_of(path)
        if rel.startswith("modellifecycle") or ".migrations." in rel:
            continue
        here = room(rel)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
                if node.module == "controlplane":
                    modules = [f"controlplane.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for module in modules:
                if module.split(".")[0] in ("controlplane", "workers", "modellifecycle"):
                    there = room(module)
                    if there != here and there != "controlplane":
                        found[here].add(there)
    return found


def module_of(path: Path) -> str:
    return (
        path.relative_to(SRC).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
    )


def test_every_room_is_placed() -> None:
    rooms = {room(module_of(p)) for p in (SRC / "controlplane").rglob("*.py")}
    rooms.discard("controlplane")
    assert rooms - set(ALLOWED) == set(), "place the new module in ALLOWED and the README"
    assert set(ALLOWED) - rooms - {"generated", "workers"} == set(), "a room that is gone"


def test_each_room_imports_only_what_the_picture_allows() -> None:
    wrong = {
        here: sorted(there - ALLOWED[here] - UTILITIES)
        for here, there in rooms_imported().items()
        if there - ALLOWED[here] - UTILITIES
    }
    assert wrong == {}


# Changes' methods that move a state (or finish an operation); creating a record is not one.
STATE_CHANGES = {"model", "deployment", "build"}
OPERATION_CHANGES = {"operation_done", "operation_progress", "cancel_requested"}


def test_only_the_lifecycle_moves_states() -> None:
    movers = set()
    for path in (SRC / "controlplane").rglob("*.py"):
        rel = path.relative_to(SRC / "controlplane").as_posix()
        if rel.startswith("lifecycle/") or rel == "storage/changes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, receiver = node.func.attr, node.func.value
            # The storage layer's Changes is ``c`` (or made in place: ``Changes(tx, ...)``).
            on_changes = (isinstance(receiver, ast.Name) and receiver.id == "c") or (
                isinstance(receiver, ast.Call)
                and isinstance(receiver.func, ast.Name)
                and receiver.func.id == "Changes"
            )
            # c.model(row, SomeState.X, ...): a state; c.model(row, message=...) is a note.
            moves = name in OPERATION_CHANGES or (name in STATE_CHANGES and len(node.args) >= 2)
            if on_changes and moves:
                movers.add(f"{rel}:{node.lineno} .{name}(...)")
    assert movers == set()


def test_the_console_is_a_client_of_the_public_api_only() -> None:
    """It reaches the server through ``api.client`` alone: never the servicer, storage or
    generated protobuf types, so roles, audit and errors are exactly the API's."""
    reached = set()
    for path in (SRC / "controlplane" / "console").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith(("controlplane.api", "modellifecycle", "workers")):
                    reached.add(node.module)
            elif isinstance(node, ast.Import):
                reached.update(
                    a.name
                    for a in node.names
                    if a.name.startswith(("controlplane", "modellifecycle"))
                )
    assert reached <= {"controlplane.api.client"}, sorted(reached)
