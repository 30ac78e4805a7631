"""Which state changes are allowed: data, checked in one place.

Every state change in the control plane goes through ``check`` (via the storage
layer's single write path). Staying in the same state is always allowed (a
field such as the replica list changed); everything else must be listed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from controlplane.domain.errors import FailedPrecondition, InvalidTransition
from controlplane.domain.states import BuildState, DeploymentState, ModelState

M = ModelState
B = BuildState
D = DeploymentState

MODEL_TRANSITIONS: Mapping[ModelState, frozenset[ModelState]] = {
    # First deploy: PENDING while its build runs, DEPLOYING once applied.
    M.NOT_DEPLOYED: frozenset({M.PENDING, M.DEPLOYING}),
    # A pending deploy starts, or its build fails (FAILED), or it is stopped.
    M.PENDING: frozenset({M.DEPLOYING, M.FAILED, M.STOPPED, M.NOT_DEPLOYED}),
    M.DEPLOYING: frozenset({M.DEPLOYED, M.FAILED, M.STOPPING}),
    # Re-deploy/restart (DEPLOYING), stop, or replicas lost (FAILED).
    M.DEPLOYED: frozenset({M.DEPLOYING, M.STOPPING, M.FAILED}),
    M.STOPPING: frozenset({M.STOPPED, M.FAILED}),
    M.STOPPED: frozenset({M.PENDING, M.DEPLOYING}),
    M.FAILED: frozenset({M.PENDING, M.DEPLOYING, M.STOPPING, M.STOPPED}),
}

BUILD_TRANSITIONS: Mapping[BuildState, frozenset[BuildState]] = {
    B.QUEUED: frozenset({B.BUILDING, B.FAILED}),
    B.BUILDING: frozenset({B.BUILT, B.FAILED}),
    B.BUILT: frozenset(),
    B.FAILED: frozenset(),
}

DEPLOYMENT_TRANSITIONS: Mapping[DeploymentState, frozenset[DeploymentState]] = {
    # Waits for its build; fails with it, or is stopped before it started.
    D.PENDING: frozenset({D.DEPLOYING, D.FAILED, D.STOPPED}),
    D.DEPLOYING: frozenset({D.DEPLOYED, D.FAILED, D.STOPPING}),
    # Restart re-initializes (DEPLOYING); a newer deployment takes over (REPLACED).
    D.DEPLOYED: frozenset({D.DEPLOYING, D.STOPPING, D.REPLACED, D.FAILED}),
    D.STOPPING: frozenset({D.STOPPED, D.FAILED}),
    # Restart of a stopped model starts its last deployment again.
    D.STOPPED: frozenset({D.DEPLOYING, D.REPLACED}),
    D.FAILED: frozenset({D.DEPLOYING, D.STOPPING, D.STOPPED, D.REPLACED}),
    D.REPLACED: frozenset(),
}

S = TypeVar("S", bound=StrEnum)


def allowed(table: Mapping[S, frozenset[S]], current: S, new: S) -> bool:
    return current == new or new in table[current]


def check(table: Mapping[S, frozenset[S]], what: str, current: S, new: S) -> None:
    """Raises InvalidTransition unless ``current -> new`` is in ``table``."""
    if not allowed(table, current, new):
        raise InvalidTransition(f"{what}: {current.value} -> {new.value} is not allowed")


# ---- which verbs each model state allows ------------------------------------------------------


class Verb(StrEnum):
    """What a client asks of a model (one operation at a time is checked apart)."""

    BUILD = "build"  # CreateBuild, with or without deploy
    DEPLOY = "deploy"  # CreateDeployment: scale, change resources, roll back
    STOP = "stop"
    RESTART = "restart"
    DELETE = "delete"


@dataclass(frozen=True)
class VerbRule:
    allowed: frozenset[ModelState]
    reason: str = ""  # the ErrorInfo reason of a refusal
    refusal: str = ""  # its message; {name} and {state} are filled in


VERBS: Mapping[Verb, VerbRule] = {
    # A build (and a deploy of it) or a re-deploy may start from any state.
    Verb.BUILD: VerbRule(frozenset(M)),
    Verb.DEPLOY: VerbRule(frozenset(M)),
    Verb.STOP: VerbRule(
        frozenset({M.DEPLOYED, M.FAILED}),
        "MODEL_NOT_RUNNING",
        "model {name} is {state}; only a DEPLOYED or FAILED model can be stopped",
    ),
    # A stopped model starts again with its last deployment.
    Verb.RESTART: VerbRule(
        frozenset({M.DEPLOYED, M.STOPPED, M.FAILED}),
        "MODEL_NOT_RESTARTABLE",
        "model {name} is {state} and cannot be restarted now",
    ),
    # Never an active model, nor one waiting for its build to deploy.
    Verb.DELETE: VerbRule(
        frozenset({M.NOT_DEPLOYED, M.STOPPED, M.FAILED}),
        "MODEL_ACTIVE",
        "model {name} is {state}: stop it before deleting it",
    ),
}


def check_verb(verb: Verb, name: str, state: ModelState) -> None:
    """Raises FailedPrecondition (with the rule's reason) unless ``state`` allows ``verb``."""
    rule = VERBS[verb]
    if state not in rule.allowed:
        raise FailedPrecondition(
            message=rule.refusal.format(name=name, state=state.value),
            reason=rule.reason,
            metadata={"name": name, "state": state.value},
        )
