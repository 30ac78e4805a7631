"""How the reconciler words a replica that Serve replaced (pure function, no server)."""

from __future__ import annotations

import json
from typing import Any

from controlplane.reconciler import REPLACING, replaced_replicas


def replicas(*rs: tuple[str, str, int, bool]) -> str:
    out: list[dict[str, Any]] = []
    for id_, state, pid, ran in rs:
        d: dict[str, Any] = {"id": id_, "state": state, "pid": pid, "node": "n"}
        if ran:
            d["ran"] = True
        out.append(d)
    return json.dumps(out)


A = ("a", "RUNNING", 11, True)
B = ("b", "RUNNING", 12, True)
C = ("c", "STARTING", 13, False)


def test_a_replica_gone_and_its_replacement_in_one_look() -> None:
    why = replaced_replicas(replicas(A, B), replicas(B, C))
    assert why == "replica a (pid 11) stopped unexpectedly; Serve replaced it with c (pid 13)"


def test_the_replacement_named_when_serve_lists_it_later() -> None:
    first = replaced_replicas(replicas(A, B), replicas(("a", "STOPPING", 11, True), B))
    assert first == f"replica a (pid 11) stopped unexpectedly; {REPLACING}"
    assert replaced_replicas(replicas(("a", "STOPPING", 11, True), B), replicas(B), first) == ""
    then = replaced_replicas(replicas(B), replicas(B, C), first)
    assert then == "replica a (pid 11) stopped unexpectedly; Serve replaced it with c (pid 13)"


def test_replicas_that_never_ran_did_not_stop_unexpectedly() -> None:
    # A failed rollout's replicas go away while the ones from before keep serving.
    failing = ("x", "STOPPING", 21, False)
    assert replaced_replicas(replicas(A, B, failing, C), replicas(A, B)) == ""
    # New replicas with no loss to explain (another attempt of a failed rollout).
    assert replaced_replicas(replicas(A, B), replicas(A, B, C), "restart failed: boom") == ""
