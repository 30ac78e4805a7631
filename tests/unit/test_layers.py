"""Architecture rules, checked: one module imports ray, one layer touches protobuf."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules_importing(prefixes: tuple[str, ...]) -> set[str]:
    out = set()
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("modellifecycle/"):
            continue
        if any(name == p or name.startswith(p + ".") for name in imports(path) for p in prefixes):
            out.add(rel)
    return out


def test_only_ray_backend_imports_ray() -> None:
    assert modules_importing(("ray",)) == {"workers/ray_backend.py"}


def test_only_the_api_layer_touches_generated_protobuf() -> None:
    users = modules_importing(("modellifecycle", "google.protobuf", "google.rpc"))
    assert users, "the API layer uses the generated code"
    assert {u for u in users if not u.startswith("controlplane/api/")} == set()


def test_workers_do_not_depend_on_the_control_plane() -> None:
    assert not {m for m in modules_importing(("controlplane",)) if m.startswith("workers/")}
