"""Who may call what: principals, roles per project, token secrets, and each RPC's rule.

A token belongs to a project (or to every project: ``-``) and has a role; each role
includes the ones below it. A call names its project through the resource it names
(``parent`` or ``name``). Another project's resources do not exist for a token (NOT_FOUND,
the same answer as for a name that really does not exist); in its own project, a role
too weak for the call is PERMISSION_DENIED. Tokens, invocation keys and audit records,
as plain data (the client's too: this module is standard library only).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from controlplane.domain import errors

ALL_PROJECTS = "-"
TOKEN_PREFIX = "mlc"
KEY_PREFIX = "mlk"  # invocation keys: told apart from API tokens at a glance
ANONYMOUS = "anonymous"  # the principal of every call with --insecure-no-auth


class Role(IntEnum):
    VIEWER = 1
    DEPLOYER = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Principal:
    """Who makes a call: a token's name, its project and its role."""

    name: str
    project: str
    role: Role

    def sees(self, project: str) -> bool:
        return self.project in (ALL_PROJECTS, project)

    @property
    def sees_all(self) -> bool:
        return self.project == ALL_PROJECTS


INSECURE = Principal(ANONYMOUS, ALL_PROJECTS, Role.ADMIN)


# ---- tokens, invocation keys and audit records, as the API returns them ------------------


@dataclass(frozen=True)
class Token:
    name: str  # projects/{project}/tokens/{id}
    role: Role
    description: str
    create_time: datetime
    expire_time: datetime | None
    revoked: bool
    creator: str


@dataclass(frozen=True)
class InvocationKey:
    name: str  # projects/{project}/models/{model}/keys/{id}
    description: str
    create_time: datetime
    revoked: bool
    creator: str


@dataclass(frozen=True)
class AuditRecord:
    id: int
    time: datetime
    principal: str
    method: str
    resource: str
    project: str
    code: str
    peer: str
    operation: str


# ---- token secrets ------------------------------------------------------------------------


def new_secret(prefix: str = TOKEN_PREFIX) -> tuple[str, str]:
    """A new token's (or key's) id and secret, ``<prefix>_<id>_<random>``; only its hash
    is kept."""
    token_id = secrets.token_hex(8)
    return token_id, f"{prefix}_{token_id}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    """SHA-256: the secrets are 256 random bits, so no slow hash is needed."""
    return hashlib.sha256(secret.encode()).hexdigest()


def id_of(secret: str) -> str | None:
    """The token id inside a presented secret, or None when it cannot be one of ours."""
    prefix, _, rest = secret.partition("_")
    token_id, _, random = rest.partition("_")
    if prefix != TOKEN_PREFIX or len(token_id) != 16 or not random:
        return None
    return token_id


def matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


# ---- each RPC's rule ----------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    role: Role
    field: str  # the request field naming the resource: "parent", "name" or "" (none)


_VIEW = ("GetModel", "GetBuild", "GetDeployment", "GetOperation", "WaitOperation")
_VIEW_LISTS = (
    "ListModels",
    "ListBuilds",
    "ListDeployments",
    "ListOperations",
    "WatchModels",
    "ListInvocationKeys",
)
RULES: dict[str, Rule] = {
    **{
        m: Rule(Role.VIEWER, "name")
        for m in (*_VIEW, "WatchModel", "StreamBuildLogs", "GetModelMetrics", "StreamModelLogs")
    },
    **{m: Rule(Role.VIEWER, "parent") for m in _VIEW_LISTS},
    **{
        m: Rule(Role.DEPLOYER, "parent")
        for m in (
            "CreateModel",
            "UploadSource",
            "CreateBuild",
            "CreateDeployment",
            "CreateInvocationKey",
        )
    },
    **{
        m: Rule(Role.DEPLOYER, "name")
        for m in (
            "StopModel",
            "RestartModel",
            "CancelOperation",
            "ExportBuild",
            "RevokeInvocationKey",
            "SetTraffic",
            "PromoteRollout",
        )
    },
    "GetCaller": Rule(Role.VIEWER, ""),  # names no resource: any valid token may ask
    **{m: Rule(Role.ADMIN, "name") for m in ("DeleteModel", "RevokeToken")},
    **{m: Rule(Role.ADMIN, "parent") for m in ("CreateToken", "ListTokens", "ListAuditRecords")},
}
# Calls that change something: each writes an audit record.
MUTATIONS = frozenset(
    {
        "CreateModel",
        "DeleteModel",
        "UploadSource",
        "CreateBuild",
        "CreateDeployment",
        "StopModel",
        "RestartModel",
        "CancelOperation",
        "SetTraffic",
        "PromoteRollout",
        "ExportBuild",
        "CreateToken",
        "RevokeToken",
        "CreateInvocationKey",
        "RevokeInvocationKey",
    }
)

_KINDS = {
    "models": "model",
    "builds": "build",
    "deployments": "deployment",
    "tokens": "token",
    "keys": "key",
}


def project_of(resource: str) -> str | None:
    """``p`` of ``projects/p/...``; None for other names (operations/{id}, malformed)."""
    parts = resource.split("/")
    if len(parts) >= 2 and parts[0] == "projects" and parts[1]:
        return parts[1]
    return None


def hidden(resource: str) -> errors.NotFound:
    """What a token of another project gets: the very error a missing resource gives."""
    parts = resource.split("/")
    kind = _KINDS.get(parts[-2], "resource") if len(parts) >= 4 else "project"
    if parts[:1] == ["operations"]:
        kind = "operation"
    return errors.not_found(kind, resource)


def check(principal: Principal, method: str, resource: str, project: str | None) -> None:
    """Raises NotFound (another project) or PermissionDenied (role too weak)."""
    rule = RULES.get(method)
    if project is not None and not principal.sees(project):
        raise hidden(resource)
    needed = rule.role if rule is not None else Role.ADMIN
    if rule is None and not principal.sees_all:  # a method with no rule: no project's own
        raise errors.PermissionDenied(
            message=f"{method} needs an admin token of every project",
            reason="ROLE_TOO_WEAK",
            metadata={"needed": needed.label, "role": principal.role.label},
        )
    if principal.role < needed:
        raise errors.PermissionDenied(
            message=f"{method} needs the {needed.label} role; this token is {principal.role.label}",
            reason="ROLE_TOO_WEAK",
            metadata={"needed": needed.label, "role": principal.role.label},
        )


def unauthenticated() -> errors.Unauthenticated:
    return errors.Unauthenticated(
        message="a valid token is needed: authorization: Bearer <token>",
        reason="UNAUTHENTICATED",
    )
