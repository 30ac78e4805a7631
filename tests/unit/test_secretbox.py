"""Secret values at rest: sealed, opened, bound to their name, rotated, from a file or env."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from controlplane.storage.secretbox import (
    ENV,
    KEY_FILE,
    Keyring,
    SecretBox,
    SecretKeyError,
    rotate,
    sealed,
    value_id,
    version_of,
)


def test_a_sealed_value_opens_and_shows_nothing_of_itself() -> None:
    box = SecretBox.ephemeral()
    stored = box.seal("API_KEY", "s3cr3t")
    assert sealed(stored) and "s3cr3t" not in stored
    assert box.open("API_KEY", stored) == "s3cr3t"
    assert box.seal("API_KEY", "s3cr3t") != stored, "a fresh nonce and id each time"


def test_a_value_moved_to_another_name_or_altered_does_not_open() -> None:
    box = SecretBox.ephemeral()
    stored = box.seal("API_KEY", "s3cr3t")
    with pytest.raises(SecretKeyError, match="OTHER"):
        box.open("OTHER", stored)
    head, _, body = stored.rpartition(":")
    raw = bytearray(base64.b64decode(body))
    raw[-1] ^= 1
    with pytest.raises(SecretKeyError, match="altered"):
        box.open("API_KEY", f"{head}:{base64.b64encode(bytes(raw)).decode()}")
    with pytest.raises(SecretKeyError, match="no key"):
        SecretBox.ephemeral().open("API_KEY", stored)


def test_a_value_from_before_encryption_is_read_as_it_is_and_sealed_on_reseal() -> None:
    box = SecretBox.ephemeral()
    assert box.open("A", "plain") == "plain"
    assert value_id("plain") == ""
    resealed = box.reseal("A", "plain")
    assert sealed(resealed) and box.open("A", resealed) == "plain"


def test_the_same_values_keep_their_version_and_a_new_value_changes_it() -> None:
    box = SecretBox.ephemeral()
    current = {"A": box.seal("A", "1"), "B": box.seal("B", "2")}
    same = box.seal_given({"A": "1", "B": "2"}, current)
    assert same == current and version_of(same) == version_of(current)
    changed = box.seal_given({"A": "1", "B": "3"}, current)
    assert changed["A"] == current["A"] and changed["B"] != current["B"]
    assert version_of(changed) != version_of(current)
    assert version_of({}) == ""


def test_a_new_key_keeps_value_ids_so_replicas_do_not_restart(tmp_path: Path) -> None:
    box = SecretBox.for_data_dir(tmp_path, env={})
    stored = {"A": box.seal("A", "1")}
    resealed: dict[str, str] = {}

    def reseal_all(new: SecretBox) -> int:
        resealed.update({k: new.reseal(k, v) for k, v in stored.items()})
        return len(stored)

    said = rotate(tmp_path, reseal_all, env={})
    assert "1 secret value(s)" in said
    assert resealed["A"] != stored["A"] and version_of(resealed) == version_of(stored)
    ring = json.loads((tmp_path / KEY_FILE).read_text())
    assert list(ring["keys"]) == [ring["current"]], "the old key is dropped"
    assert ring["current"] != box.ring.current
    # The old box meets a key it does not know: it reads the file again.
    assert box.open("A", resealed["A"]) == "1"


def test_the_key_file_is_private_and_made_once(tmp_path: Path) -> None:
    first = SecretBox.for_data_dir(tmp_path / "data", env={})
    path = tmp_path / "data" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SecretBox.for_data_dir(tmp_path / "data", env={})
    assert again.ring == first.ring
    os.chmod(path, 0o644)
    with pytest.raises(SecretKeyError, match="chmod 600"):
        SecretBox.for_data_dir(tmp_path / "data", env={})


def test_keys_from_the_environment_first_one_seals(tmp_path: Path) -> None:
    old, new = Keyring.new(), Keyring.new()

    def enc(r: Keyring) -> str:
        return f"{r.current}:{base64.b64encode(r.keys[r.current]).decode()}"

    stored = SecretBox(old).seal("A", "1")
    box = SecretBox.for_data_dir(tmp_path, env={ENV: f"{enc(new)},{enc(old)}"})
    assert box.open("A", stored) == "1"
    assert box.reseal("A", stored).split(":")[1] == new.current
    assert not (tmp_path / KEY_FILE).exists(), "no file when the keys come from the env"
    for bad in ("nokey", "k:notbase64!", f"k:{base64.b64encode(b'short').decode()}"):
        with pytest.raises(SecretKeyError):
            SecretBox.for_data_dir(tmp_path, env={ENV: bad})
