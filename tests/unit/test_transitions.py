"""Every pair of states through the transition table (transitions are data)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from itertools import product

import pytest

from controlplane.domain import transitions
from controlplane.domain.errors import FailedPrecondition, InvalidTransition
from controlplane.domain.states import BuildState, DeploymentState, ModelState

M, B, D = ModelState, BuildState, DeploymentState

# The expected table, written out independently of the implementation.
EXPECTED_MODEL = {
    (M.NOT_DEPLOYED, M.PENDING),
    (M.NOT_DEPLOYED, M.DEPLOYING),
    (M.PENDING, M.DEPLOYING),
    (M.PENDING, M.FAILED),
    (M.PENDING, M.STOPPED),
    (M.PENDING, M.NOT_DEPLOYED),
    (M.DEPLOYING, M.DEPLOYED),
    (M.DEPLOYING, M.FAILED),
    (M.DEPLOYING, M.STOPPING),
    (M.DEPLOYED, M.DEPLOYING),
    (M.DEPLOYED, M.STOPPING),
    (M.DEPLOYED, M.FAILED),
    (M.STOPPING, M.STOPPED),
    (M.STOPPING, M.FAILED),
    (M.STOPPED, M.PENDING),
    (M.STOPPED, M.DEPLOYING),
    (M.FAILED, M.PENDING),
    (M.FAILED, M.DEPLOYING),
    (M.FAILED, M.STOPPING),
    (M.FAILED, M.STOPPED),
}
EXPECTED_BUILD = {
    (B.QUEUED, B.BUILDING),
    (B.QUEUED, B.FAILED),
    (B.BUILDING, B.BUILT),
    (B.BUILDING, B.FAILED),
}
EXPECTED_DEPLOYMENT = {
    (D.PENDING, D.DEPLOYING),
    (D.PENDING, D.FAILED),
    (D.PENDING, D.STOPPED),
    (D.DEPLOYING, D.DEPLOYED),
    (D.DEPLOYING, D.FAILED),
    (D.DEPLOYING, D.STOPPING),
    (D.DEPLOYED, D.DEPLOYING),
    (D.DEPLOYED, D.STOPPING),
    (D.DEPLOYED, D.REPLACED),
    (D.DEPLOYED, D.FAILED),
    (D.STOPPING, D.STOPPED),
    (D.STOPPING, D.FAILED),
    (D.STOPPED, D.DEPLOYING),
    (D.STOPPED, D.REPLACED),
    (D.FAILED, D.DEPLOYING),
    (D.FAILED, D.STOPPING),
    (D.FAILED, D.STOPPED),
    (D.FAILED, D.REPLACED),
}

CASES: list[
    tuple[Mapping[StrEnum, frozenset[StrEnum]], type[StrEnum], set[tuple[StrEnum, StrEnum]]]
] = [
    (transitions.MODEL_TRANSITIONS, ModelState, EXPECTED_MODEL),  # type: ignore[list-item]
    (transitions.BUILD_TRANSITIONS, BuildState, EXPECTED_BUILD),  # type: ignore[list-item]
    (transitions.DEPLOYMENT_TRANSITIONS, DeploymentState, EXPECTED_DEPLOYMENT),  # type: ignore[list-item]
]


@pytest.mark.parametrize("table,enum,expected", CASES, ids=["model", "build", "deployment"])
def test_every_pair(
    table: Mapping[StrEnum, frozenset[StrEnum]],
    enum: type[StrEnum],
    expected: set[tuple[StrEnum, StrEnum]],
) -> None:
    assert set(table) == set(enum), "every state has a row"
    for a, b in product(enum, enum):
        ok = a == b or (a, b) in expected
        assert transitions.allowed(table, a, b) is ok, f"{a} -> {b}"
        if ok:
            transitions.check(table, "x", a, b)
        else:
            with pytest.raises(InvalidTransition, match=f"{a.value} -> {b.value}"):
                transitions.check(table, "x", a, b)


def test_terminal_states_have_no_exit() -> None:
    assert transitions.BUILD_TRANSITIONS[B.BUILT] == frozenset()
    assert transitions.BUILD_TRANSITIONS[B.FAILED] == frozenset()
    assert transitions.DEPLOYMENT_TRANSITIONS[D.REPLACED] == frozenset()


def test_active_states() -> None:
    assert {s for s in ModelState if s.active} == {M.DEPLOYING, M.DEPLOYED, M.STOPPING}


# Which verbs each model state allows, written out independently of the implementation.
ALLOWED_VERBS = {
    transitions.Verb.BUILD: set(M),
    transitions.Verb.DEPLOY: set(M),
    transitions.Verb.STOP: {M.DEPLOYED, M.FAILED},
    transitions.Verb.RESTART: {M.DEPLOYED, M.STOPPED, M.FAILED},
    transitions.Verb.DELETE: {M.NOT_DEPLOYED, M.STOPPED, M.FAILED},
}


@pytest.mark.parametrize(("verb", "state"), list(product(transitions.Verb, M)))
def test_every_verb_in_every_model_state(verb: transitions.Verb, state: ModelState) -> None:
    if state in ALLOWED_VERBS[verb]:
        transitions.check_verb(verb, "projects/p/models/m", state)
        return
    with pytest.raises(FailedPrecondition) as refused:
        transitions.check_verb(verb, "projects/p/models/m", state)
    assert refused.value.reason == transitions.VERBS[verb].reason
    assert refused.value.metadata == {"name": "projects/p/models/m", "state": state.value}
    assert f"model projects/p/models/m is {state.value}" in refused.value.message


def test_refusals_say_what_to_do() -> None:
    with pytest.raises(FailedPrecondition, match="stop it before deleting it"):
        transitions.check_verb(transitions.Verb.DELETE, "m", M.DEPLOYED)
    with pytest.raises(FailedPrecondition, match="only a DEPLOYED or FAILED model can be stopped"):
        transitions.check_verb(transitions.Verb.STOP, "m", M.STOPPED)
