"""Observations sent as changes: across the socket between the server and its driver
process (``workers.driver``), a look sends only the applications whose observation
changed since the look the server holds, and the names of those gone.

With hundreds of models almost none changes between two looks (ten a second while one
changes, two a second otherwise); sent whole, every look pickled, sent and unpickled
every application, and the reconciler compared them all again. The server keeps the
whole set and gives its reconciler the same objects for what did not change.

Each set the driver sends has a number (from a random start, so that a new driver
process never takes up an old one's); the server asks for the changes since the number
it holds. A look the server never received (a call cancelled on the way), a new driver
process, or no number at all: the whole set is sent.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from workers.backend import AppObservation


@dataclass(frozen=True)
class Changes:
    number: int  # of the set these changes make
    since: int | None  # the number of the set they apply to; None: they are the whole set
    changed: dict[str, AppObservation]
    gone: tuple[str, ...]


class Sender:
    """The driver's side: what it last sent, and its number."""

    def __init__(self) -> None:
        self._number = secrets.randbits(48)  # nothing sent under it
        self._sent: Mapping[str, AppObservation] | None = None

    def changes(self, now: Mapping[str, AppObservation], held: int | None) -> Changes:
        """``now`` as changes since the set numbered ``held`` (the server's), if that is
        the set sent last; else whole."""
        whole = self._sent is None or held != self._number
        before: Mapping[str, AppObservation] = {} if whole or self._sent is None else self._sent
        changed = {
            name: obs
            for name, obs in now.items()
            if (was := before.get(name)) is None or (was is not obs and was != obs)
        }
        gone = tuple(name for name in before if name not in now)
        self._number += 1
        self._sent = dict(now)
        return Changes(self._number, None if whole else held, changed, gone)


class Holder:
    """The server's side: the whole set, as of the changes it applied last."""

    def __init__(self) -> None:
        self.number: int | None = None
        self._apps: dict[str, AppObservation] = {}

    def apply(self, changes: Changes) -> Mapping[str, AppObservation]:
        """The whole set after ``changes``; unchanged applications keep their objects."""
        if changes.since is None:
            apps = dict(changes.changed)
        elif changes.since == self.number:
            apps = {n: obs for n, obs in self._apps.items() if n not in changes.gone}
            apps.update(changes.changed)
        else:  # cannot happen while looks are one at a time: start again from a whole set
            held, self.number = self.number, None
            raise RuntimeError(
                f"observations out of step (changes since {changes.since}, held {held}): "
                "the next look reads them all"
            )
        self._apps, self.number = apps, changes.number
        return apps
