"""What replicas Serve is stopping, or stopped a moment ago, still hold on their nodes.

Ray's own count of what a node has free lags behind Serve: a replica Serve lists as
STOPPING holds its CPUs and GPUs until its graceful shutdown ends, and once Serve has
forgotten it, the node's free count rises only when its raylet reports the release (a
moment later; longer on a busy machine). Plans count both kinds as free, so a rolling
change asked for right after a scale-down is not refused for room that is being given
back. A replica is counted for ``grace_s`` after Serve stopped listing it, then never.

What a replica holds is what its deployment asked for when the replica was first seen:
Serve's details give only the deployment's current need, which a rolling change has
already replaced by the time the old replicas stop. (A replica first seen by a server
that started in the middle of a rolling change is taken to hold the change's need.)"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

RELEASE_GRACE_S = 5.0


@dataclass(frozen=True)
class Held:
    """What one replica reserves, and the node (its address) it reserves it on."""

    node: str
    resources: Mapping[str, float]


@dataclass(frozen=True)
class Seen:
    """One replica in one look at Serve: where it runs, whether it is stopping, and what
    its deployment asks of each replica now."""

    node: str
    stopping: bool
    need: Mapping[str, float]


class Releasing:
    """Fed every look at Serve's replicas (``saw``); ``held`` sums, by node, what the
    replicas stopping now and those gone within the grace period reserve."""

    def __init__(
        self, grace_s: float = RELEASE_GRACE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._grace_s = grace_s
        self._clock = clock
        self._held: dict[str, Held] = {}  # every replica listed in the last look
        self._stopping: dict[str, Held] = {}
        self._gone: dict[str, tuple[Held, float]] = {}  # replica id -> (held, gone since)

    def saw(self, replicas: Mapping[str, Seen]) -> None:
        """Every replica (by id) Serve lists now."""
        now = self._clock()
        held = {
            rid: self._held.get(rid) or Held(seen.node, dict(seen.need))
            for rid, seen in replicas.items()
        }
        stopping = {rid: held[rid] for rid, seen in replicas.items() if seen.stopping}
        gone = dict(self._gone)  # new dicts, never changed in place: ``held`` may run in
        for rid, was in self._stopping.items():  # another thread meanwhile
            if rid not in replicas:
                gone[rid] = (was, now)
        self._held, self._stopping = held, stopping
        self._gone = {
            rid: (was, since)
            for rid, (was, since) in gone.items()
            if rid not in replicas and now - since < self._grace_s
        }

    def held(self) -> dict[str, dict[str, float]]:
        now = self._clock()
        stopping, gone = self._stopping, self._gone
        out: dict[str, dict[str, float]] = {}
        recent = [h for h, since in gone.values() if now - since < self._grace_s]
        for held in [*stopping.values(), *recent]:
            on = out.setdefault(held.node, {})
            for resource, amount in held.resources.items():
                on[resource] = on.get(resource, 0.0) + amount
        return out
