"""Signed-in sessions, kept on the server: a random id in an HttpOnly, SameSite=Strict
cookie names one; the API token never reaches the browser again after sign-in.

A session ends on sign-out, after ``idle_s`` without a request, after ``max_age_s`` in all,
or as soon as the API says its token is no longer valid (revoked or expired).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane.api.client import Client
from controlplane.domain.access import ALL_PROJECTS, Principal, Role

COOKIE = "modelctl_session"
SIGN_IN_COOKIE = "modelctl_sign_in"  # the double-submit token of the sign-in form


@dataclass
class Session:
    id: str
    csrf: str
    caller: Principal
    client: Client
    created: float
    seen: float
    flashes: list[tuple[str, str]] = field(default_factory=list)  # (kind, text), shown once

    def can(self, role: Role) -> bool:
        return self.caller.role >= role

    @property
    def projects_fixed(self) -> bool:
        """A project's token sees one project; an every-project token (``-``) chooses."""
        return self.caller.project != ALL_PROJECTS

    def flash(self, kind: str, text: str) -> None:
        self.flashes.append((kind, text))

    def take_flashes(self) -> list[tuple[str, str]]:
        shown, self.flashes = self.flashes, []
        return shown

    def csrf_ok(self, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given, self.csrf)


class Sessions:
    def __init__(
        self,
        connect: Callable[[str], Client],
        idle_s: float = 8 * 3600,
        max_age_s: float = 24 * 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``connect(token)``: a client of the API that sends that token."""
        self._connect = connect
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self._clock = clock
        self._by_id: dict[str, Session] = {}

    async def sign_in(self, token: str, previous: str = "") -> Session:
        """A new session for ``token`` (a fresh id: the ``previous`` one, if any, ends);
        raises the API's ClientError when it is not valid. Expired sessions of others
        end here too, so that abandoned ones do not keep their channels open."""
        await self.end(previous)
        await self.sweep()
        client = self._connect(token)
        try:
            caller = await client.get_caller()
        except BaseException:
            await client.close()
            raise
        now = self._clock()
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            caller=caller,
            client=client,
            created=now,
            seen=now,
        )
        self._by_id[session.id] = session
        return session

    async def get(self, sid: str) -> Session | None:
        """The live session named by the cookie, or None (an expired one is ended)."""
        session = self._by_id.get(sid) if sid else None
        if session is None:
            return None
        now = self._clock()
        if now - session.seen > self.idle_s or now - session.created > self.max_age_s:
            await self.end(session.id)
            return None
        session.seen = now
        return session

    async def sweep(self) -> None:
        now = self._clock()
        for sid, s in list(self._by_id.items()):
            if now - s.seen > self.idle_s or now - s.created > self.max_age_s:
                await self.end(sid)

    async def end(self, sid: str) -> None:
        session = self._by_id.pop(sid, None)
        if session is not None:
            await session.client.close()

    async def close(self) -> None:
        for sid in list(self._by_id):
            await self.end(sid)

    def __len__(self) -> int:
        return len(self._by_id)
