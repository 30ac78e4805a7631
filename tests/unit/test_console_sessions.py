"""Console sessions end on sign-out, when idle too long, when too old, and never start
for a token the API refuses (a fake client: the real one is in the integration tests)."""

from __future__ import annotations

from typing import cast

import pytest

from controlplane.api.client import Client, ClientError
from controlplane.console.sessions import Sessions
from controlplane.domain.access import Principal, Role


class FakeClient:
    def __init__(self, token: str) -> None:
        self.token = token
        self.closed = False

    async def get_caller(self) -> Principal:
        if self.token != "good":
            raise ClientError("UNAUTHENTICATED", "a valid token is needed")
        return Principal("projects/p/tokens/t", "p", Role.DEPLOYER)

    async def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sessions(clock: Clock, made: list[FakeClient]) -> Sessions:
    def connect(token: str) -> Client:
        made.append(FakeClient(token))
        return cast(Client, made[-1])

    return Sessions(connect, idle_s=60, max_age_s=300, clock=clock)


async def test_a_session_knows_its_caller_and_ends_on_sign_out() -> None:
    clock, made = Clock(), list[FakeClient]()
    store = sessions(clock, made)
    s = await store.sign_in("good")
    assert s.caller.role == Role.DEPLOYER and s.projects_fixed
    assert s.can(Role.VIEWER) and not s.can(Role.ADMIN)
    assert await store.get(s.id) is s
    await store.end(s.id)
    assert await store.get(s.id) is None and made[0].closed


async def test_signing_in_again_ends_the_previous_session_and_expired_ones() -> None:
    clock, made = Clock(), list[FakeClient]()
    store = sessions(clock, made)
    old = await store.sign_in("good")
    abandoned = await store.sign_in("good")
    clock.now += 61  # abandoned is idle too long; nobody asked for it since
    new = await store.sign_in("good", previous=old.id)
    assert new.id not in (old.id, abandoned.id)
    assert len(store) == 1 and made[0].closed and made[1].closed


async def test_a_refused_token_makes_no_session_and_closes_its_channel() -> None:
    clock, made = Clock(), list[FakeClient]()
    store = sessions(clock, made)
    with pytest.raises(ClientError):
        await store.sign_in("bad")
    assert len(store) == 0 and made[0].closed


async def test_an_idle_session_ends_and_a_busy_one_lives_until_its_max_age() -> None:
    clock, made = Clock(), list[FakeClient]()
    store = sessions(clock, made)
    idle = await store.sign_in("good")
    busy = await store.sign_in("good")
    for _ in range(4):  # busy is used every 50 s; idle is not
        clock.now += 50
        assert await store.get(busy.id) is busy
    assert await store.get(idle.id) is None and made[0].closed
    clock.now += 50  # 250 s old
    assert await store.get(busy.id) is busy
    clock.now += 51  # 301 s old: too old, however busy
    assert await store.get(busy.id) is None and made[1].closed


async def test_csrf_tokens_are_per_session_and_compared_whole() -> None:
    clock, made = Clock(), list[FakeClient]()
    store = sessions(clock, made)
    a, b = await store.sign_in("good"), await store.sign_in("good")
    assert a.csrf != b.csrf and a.id != b.id
    assert a.csrf_ok(a.csrf)
    assert not a.csrf_ok(b.csrf) and not a.csrf_ok("") and not a.csrf_ok(a.csrf[:-1])
