"""Plans count what stopping replicas hold as free, and what replicas Serve forgot a
moment ago hold too, until Ray's own count has had time to catch up; each replica with
what it held, not what its deployment asks for after a change."""

from __future__ import annotations

from workers.releasing import Releasing, Seen

CPU = {"CPU": 0.25, "GPU": 0.0}
GPU = {"CPU": 0.0, "GPU": 1.0}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def up(node: str, need: dict[str, float] = GPU) -> Seen:
    return Seen(node, False, need)


def stopping(node: str, need: dict[str, float] = GPU) -> Seen:
    return Seen(node, True, need)


def test_stopping_replicas_count_by_node_and_running_ones_do_not() -> None:
    r = Releasing(grace_s=5, clock=Clock())
    r.saw(
        {
            "a": stopping("10.0.0.1"),
            "b": stopping("10.0.0.1"),
            "c": stopping("10.0.0.2"),
            "d": up("10.0.0.2"),
        }
    )
    assert r.held() == {"10.0.0.1": {"CPU": 0.0, "GPU": 2.0}, "10.0.0.2": GPU}


def test_a_replica_serve_forgot_counts_for_the_grace_period_then_never() -> None:
    clock = Clock()
    r = Releasing(grace_s=5, clock=clock)
    r.saw({"a": stopping("10.0.0.1"), "b": stopping("10.0.0.2")})
    clock.now += 1
    r.saw({"b": stopping("10.0.0.2")})  # a is gone from Serve's list
    assert r.held() == {"10.0.0.1": GPU, "10.0.0.2": GPU}
    clock.now += 4.9
    r.saw({})
    assert r.held() == {"10.0.0.1": GPU, "10.0.0.2": GPU}  # b: gone only now
    clock.now += 0.2  # a: gone 5.1 s
    assert r.held() == {"10.0.0.2": GPU}
    r.saw({})
    clock.now += 5
    assert r.held() == {}
    r.saw({})
    assert r.held() == {}


def test_a_running_replica_that_vanishes_was_never_counted() -> None:
    r = Releasing(grace_s=5, clock=Clock())
    r.saw({"a": up("10.0.0.1")})
    r.saw({})  # lost with its node, say: Ray never had it stopping
    assert r.held() == {}


def test_old_replicas_of_a_rolling_change_hold_what_they_were_started_with() -> None:
    r = Releasing(grace_s=5, clock=Clock())
    r.saw({"old1": up("10.0.0.1", CPU), "old2": up("10.0.0.2", CPU)})
    # The change asks for a GPU each: Serve's details give every replica the new need.
    r.saw({"old1": stopping("10.0.0.1"), "old2": up("10.0.0.2"), "new": up("10.0.0.2")})
    assert r.held() == {"10.0.0.1": CPU}
    r.saw({"old2": stopping("10.0.0.2"), "new": up("10.0.0.2"), "new2": up("10.0.0.1")})
    assert r.held() == {"10.0.0.1": CPU, "10.0.0.2": CPU}
    r.saw({"new": up("10.0.0.2"), "new2": up("10.0.0.1")})
    assert r.held() == {"10.0.0.1": CPU, "10.0.0.2": CPU}  # gone, within the grace period


def test_a_replica_seen_stopping_again_is_counted_once() -> None:
    r = Releasing(grace_s=5, clock=Clock())
    r.saw({"a": stopping("10.0.0.1")})
    r.saw({})
    r.saw({"a": stopping("10.0.0.1")})  # a look that raced the one before
    assert r.held() == {"10.0.0.1": GPU}


def test_nothing_stopping_holds_nothing() -> None:
    r = Releasing()
    assert r.held() == {}
    r.saw({})
    assert r.held() == {}
