"""Architecture rules, checked: one module imports ray, one layer touches protobuf."""

from __future__ import annotations

import ast
import sys
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


def absolute_imports(path: Path) -> set[str]:
    """Every name ``path`` imports (``a.b`` for ``from a import b``), relative imports
    resolved against its package."""
    package = path.relative_to(SRC).with_suffix("").parts[:-1]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            # `from a import b` may import the module a.b: each name counts as a.name
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_the_domain_imports_only_the_standard_library_and_itself() -> None:
    domain = SRC / "controlplane" / "domain"
    outside = {
        f"{path.relative_to(SRC).as_posix()}: {name}"
        for path in domain.rglob("*.py")
        for name in absolute_imports(path)
        if name.split(".")[0] not in sys.stdlib_module_names
        and not f"{name}.".startswith("controlplane.domain.")
    }
    assert list(domain.rglob("*.py")), "the domain package is where this test looks"
    assert outside == set(), "the domain must not depend on anything but the stdlib"
