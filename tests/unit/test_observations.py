"""Observations cross from the driver to the server as changes (workers.observations):
only what changed is sent, the server's whole set is what the driver saw, unchanged
applications keep their objects, and any break in the sequence sends the whole set."""

from __future__ import annotations

import pytest

from workers.backend import AppObservation, AppStatus
from workers.observations import Changes, Holder, Sender


def app(name: str, status: AppStatus = AppStatus.RUNNING) -> AppObservation:
    return AppObservation(name, status, "", ())


def test_only_what_changed_is_sent_and_the_server_holds_the_whole_set() -> None:
    sender, holder = Sender(), Holder()
    first = holder.apply(sender.changes({"a": app("a"), "b": app("b")}, holder.number))
    assert set(first) == {"a", "b"}
    # b equal but a new object, a changed, c new, nothing gone
    changes = sender.changes(
        {"a": app("a", AppStatus.DEPLOYING), "b": app("b"), "c": app("c")}, holder.number
    )
    assert set(changes.changed) == {"a", "c"} and changes.gone == ()
    second = holder.apply(changes)
    assert second["a"].status is AppStatus.DEPLOYING and set(second) == {"a", "b", "c"}
    assert second["b"] is first["b"], "an unchanged application keeps its object"
    changes = sender.changes({"c": app("c")}, holder.number)
    assert changes.changed == {} and set(changes.gone) == {"a", "b"}
    assert holder.apply(changes) == {"c": app("c")}


def test_a_set_the_server_never_got_makes_the_next_one_whole() -> None:
    sender, holder = Sender(), Holder()
    holder.apply(sender.changes({"a": app("a")}, holder.number))
    sender.changes({"a": app("a"), "b": app("b")}, holder.number)  # lost on the way
    changes = sender.changes({"a": app("a"), "b": app("b")}, holder.number)
    assert changes.since is None and set(changes.changed) == {"a", "b"}
    assert set(holder.apply(changes)) == {"a", "b"}


def test_a_new_driver_sends_the_whole_set_whatever_the_server_holds() -> None:
    holder = Holder()
    holder.apply(Sender().changes({"a": app("a")}, None))
    changes = Sender().changes({"b": app("b")}, holder.number)  # a new driver process
    assert changes.since is None
    assert set(holder.apply(changes)) == {"b"}


def test_changes_against_another_set_are_refused_and_the_next_look_is_whole() -> None:
    holder = Holder()
    holder.apply(Changes(5, None, {"a": app("a")}, ()))
    with pytest.raises(RuntimeError, match="out of step"):
        holder.apply(Changes(7, 6, {"b": app("b")}, ()))
    assert holder.number is None
    assert Sender().changes({"a": app("a")}, holder.number).since is None
