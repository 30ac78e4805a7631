"""The secret broker hands an application's values to a live replica of it, once each."""

from __future__ import annotations

import pytest

from workers.secret_broker import ActorInfo, ClaimRefused, SecretBroker

ACTORS = {
    "a1": ActorInfo("SERVE_REPLICA::p--m#model#x1", True),
    "a2": ActorInfo("SERVE_REPLICA::p--m#model#x2", True),
    "dead": ActorInfo("SERVE_REPLICA::p--m#model#x3", False),
    "other": ActorInfo("SERVE_REPLICA::p--other#model#y1", True),
    "plain": ActorInfo("someones-actor", True),
}


def broker() -> SecretBroker:
    b = SecretBroker(ACTORS.get)
    b.put({"p--m": ("v1", {"API_KEY": "s"}), "p--other": ("w1", {"X": "y"})})
    return b


def test_a_live_replica_of_the_app_gets_its_values_once() -> None:
    b = broker()
    assert b.claim("p--m", "v1", "a1") == {"API_KEY": "s"}
    assert b.claim("p--m", "v1", "a2") == {"API_KEY": "s"}
    with pytest.raises(ClaimRefused, match="claimed already"):
        b.claim("p--m", "v1", "a1")


@pytest.mark.parametrize(
    ("app", "version", "actor", "why"),
    [
        ("p--m", "v1", "other", "not a replica of p--m"),
        ("p--m", "v1", "plain", "not a replica of p--m"),
        ("p--m", "v1", "dead", "not a live actor"),
        ("p--m", "v1", "unknown", "not a live actor"),
        ("p--m", "v9", "a1", "no secrets of p--m version v9"),
        ("p--gone", "v1", "a1", "no secrets of p--gone"),
    ],
)
def test_anyone_else_gets_nothing(app: str, version: str, actor: str, why: str) -> None:
    with pytest.raises(ClaimRefused, match=why):
        broker().claim(app, version, actor)


def test_an_app_no_longer_wanted_loses_its_values_and_old_versions_age_out() -> None:
    b = broker()
    for n in range(2, 7):
        b.put({"p--m": (f"v{n}", {"API_KEY": str(n)})})
    assert not b.has("p--other", "w1")
    assert b.has("p--m", "v6") and b.has("p--m", "v3") and not b.has("p--m", "v2")


def test_an_app_whose_values_could_not_be_opened_keeps_what_it_had() -> None:
    b = broker()
    b.put({}, keep=["p--m"])
    assert b.has("p--m", "v1") and not b.has("p--other", "w1")
