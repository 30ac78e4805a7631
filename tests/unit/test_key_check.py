"""The replica's door: what a request must carry, and that keys never roll replicas."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from workers.backend import AppSpec, EndpointAccess, rolls
from workers.model_app import KeyCheck

KEY = "mlk_0123456789abcdef_secret"
HASH = hashlib.sha256(KEY.encode()).hexdigest()


def test_closed_until_configured_then_only_live_keys_pass() -> None:
    door = KeyCheck()
    assert not door.allows(f"Bearer {KEY}"), "no configuration yet: closed"
    door.configure({"open": False, "keys": [HASH]})
    assert door.allows(f"Bearer {KEY}")
    assert door.allows(f"bearer  {KEY} ")
    for header in (None, "", KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer "):
        assert not door.allows(header), header
    door.configure({"open": False, "keys": []})  # revoked
    assert not door.allows(f"Bearer {KEY}")
    door.configure({"open": True, "keys": []})  # --insecure-no-auth
    assert door.allows(None)


def test_a_change_of_keys_never_replaces_replicas() -> None:
    spec = AppSpec(
        "app", "/p/m", "projects/p/models/m", "d/1", "b/1", "/a", "m.py", "f", 1, 0, 0, 0
    )
    keyed = replace(spec, access=EndpointAccess(open=False, key_hashes=(HASH,)))
    assert not rolls(spec, keyed)
    assert rolls(spec, replace(keyed, restart_generation=1))
