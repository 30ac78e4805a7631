"""The access rules on their own: token secrets, projects, roles, hidden resources."""

from __future__ import annotations

import pytest

from controlplane.domain import errors
from controlplane.domain.access import (
    ALL_PROJECTS,
    RULES,
    Principal,
    Role,
    check,
    hash_secret,
    id_of,
    matches,
    new_secret,
    project_of,
)


def test_a_secret_names_its_token_and_only_its_hash_matches() -> None:
    token_id, secret = new_secret()
    assert id_of(secret) == token_id
    assert matches(secret, hash_secret(secret))
    assert not matches(secret + "x", hash_secret(secret))
    assert new_secret()[1] != secret
    for bad in ("", "mlc", "mlc_", "abc_0123456789abcdef_x", "mlc_short_x", f"mlc_{token_id}_"):
        assert id_of(bad) is None, bad


@pytest.mark.parametrize(
    ("resource", "kind"),
    [
        ("projects/b", "PROJECT"),
        ("projects/b/models/m", "MODEL"),
        ("projects/b/models/m/builds/3", "BUILD"),
        ("projects/b/models/m/deployments/2", "DEPLOYMENT"),
        ("projects/b/tokens/abc", "TOKEN"),
        ("operations/xyz", "OPERATION"),
    ],
)
def test_another_projects_resource_is_not_found_like_a_missing_one(
    resource: str, kind: str
) -> None:
    viewer_of_a = Principal("projects/a/tokens/t", "a", Role.ADMIN)
    with pytest.raises(errors.NotFound) as e:
        check(viewer_of_a, "GetModel", resource, project_of(resource) or "b")
    assert e.value.reason == f"{kind}_NOT_FOUND"
    assert e.value.metadata == {"name": resource}


def test_roles_include_the_ones_below() -> None:
    for role in Role:
        principal = Principal("p", "a", role)
        for method, rule in RULES.items():
            if role >= rule.role:
                check(principal, method, "projects/a/models/m", "a")
            else:
                with pytest.raises(errors.PermissionDenied):
                    check(principal, method, "projects/a/models/m", "a")


def test_every_project_tokens_see_every_project() -> None:
    everywhere = Principal("projects/-/tokens/t", ALL_PROJECTS, Role.VIEWER)
    check(everywhere, "GetModel", "projects/z/models/m", "z")
    assert project_of("operations/x") is None
    assert project_of("projects//models/m") is None


def test_a_method_with_no_rule_is_only_for_an_admin_of_every_project() -> None:
    admin_of_a = Principal("projects/a/tokens/t", "a", Role.ADMIN)
    with pytest.raises(errors.PermissionDenied):
        check(admin_of_a, "SomeNewRpc", "", None)
    check(Principal("projects/-/tokens/t", ALL_PROJECTS, Role.ADMIN), "SomeNewRpc", "", None)
