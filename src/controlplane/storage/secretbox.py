"""Secret environment values at rest: sealed with AES-GCM under the server's key.

A value is stored as ``enc1:<key id>:<value id>:<base64 nonce+ciphertext>``; the value id
is random, chosen when the value is first given, and kept when it is sealed again under a
new key, so replicas restart when a value changes and never because the key did. The
associated data binds a ciphertext to its variable's name and value id: a value cannot be
moved to another variable unnoticed.

The keys come from ``MODELCTL_SECRET_KEYS`` (``id:base64,...``, the first seals, every one
opens) or else from ``secrets.key`` in the data dir (JSON, mode 0600, made at first start).
``rotate`` (``modelctl secrets rotate``) puts a new key first in that file, seals every
stored value under it, then drops the old keys. Values that predate encryption (plain text)
are read as they are and sealed at the server's next start.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets as random
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

ENV = "MODELCTL_SECRET_KEYS"
KEY_FILE = "secrets.key"
PREFIX = "enc1"


class SecretKeyError(RuntimeError):
    """The keys cannot be read, or a stored value cannot be opened with them."""


@dataclass(frozen=True)
class Keyring:
    current: str
    keys: Mapping[str, bytes]

    @staticmethod
    def new() -> Keyring:
        kid = random.token_hex(4)
        return Keyring(kid, {kid: AESGCM.generate_key(bit_length=256)})

    def with_new_key(self) -> Keyring:
        fresh = Keyring.new()
        return Keyring(fresh.current, {**fresh.keys, **self.keys})

    def only_current(self) -> Keyring:
        return Keyring(self.current, {self.current: self.keys[self.current]})

    def to_json(self) -> str:
        keys = {k: base64.b64encode(v).decode() for k, v in self.keys.items()}
        return json.dumps({"current": self.current, "keys": keys}, indent=1) + "\n"

    @staticmethod
    def from_json(text: str, where: str) -> Keyring:
        try:
            data = json.loads(text)
            keys = {str(k): base64.b64decode(v, validate=True) for k, v in data["keys"].items()}
            ring = Keyring(str(data["current"]), keys)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SecretKeyError(f"{where}: not a key file ({e})") from e
        return ring.checked(where)

    @staticmethod
    def from_env(value: str) -> Keyring:
        keys: dict[str, bytes] = {}
        for part in (p.strip() for p in value.split(",") if p.strip()):
            kid, sep, encoded = part.partition(":")
            try:
                if not sep or not kid:
                    raise ValueError("each key is id:base64")
                keys[kid] = base64.b64decode(encoded, validate=True)
            except ValueError as e:
                raise SecretKeyError(f"{ENV}: {e}") from e
        if not keys:
            raise SecretKeyError(f"{ENV} is set but holds no key")
        return Keyring(next(iter(keys)), keys).checked(ENV)

    def checked(self, where: str) -> Keyring:
        if self.current not in self.keys:
            raise SecretKeyError(f"{where}: the current key {self.current!r} is not among them")
        for kid, key in self.keys.items():
            if ":" in kid or len(key) != 32:
                raise SecretKeyError(f"{where}: key {kid!r} must be 32 bytes with no ':' in its id")
        return self


def read_key_file(path: Path) -> Keyring:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecretKeyError(
            f"{path} can be read by other users (mode {mode:04o}): chmod 600 {path}"
        )
    return Keyring.from_json(path.read_text(), str(path))


def write_key_file(path: Path, ring: Keyring) -> None:
    """Replaces the file at once (a new file, renamed over it), never readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{random.token_hex(4)}")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(ring.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def sealed(value: str) -> bool:
    return value.startswith(PREFIX + ":") and value.count(":") == 3


def value_id(stored: str) -> str:
    """The value's id ("" for a value that predates encryption)."""
    return stored.split(":", 4)[2] if sealed(stored) else ""


def version_of(stored: Mapping[str, str]) -> str:
    """One token for a deployment's secret values as they are (names and value ids, never
    the values): replicas restart when it changes. "" without secrets."""
    if not stored:
        return ""
    parts = [f"{name}={value_id(v) or 'plain'}" for name, v in sorted(stored.items())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class SecretBox:
    """Seals and opens secret values with a keyring; reads its file again when a value
    names a key it does not have (another server or ``rotate`` made a new one)."""

    def __init__(self, ring: Keyring, path: Path | None = None) -> None:
        self._ring = ring
        self._path = path
        self._lock = threading.Lock()

    @staticmethod
    def for_data_dir(data_dir: Path, env: Mapping[str, str] | None = None) -> SecretBox:
        """The keys in ``MODELCTL_SECRET_KEYS``, or in the data dir's key file (made, 0600,
        on first use)."""
        env = os.environ if env is None else env
        if env.get(ENV):
            return SecretBox(Keyring.from_env(env[ENV]))
        path = data_dir / KEY_FILE
        if not path.exists():
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another server made it a moment ago
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(Keyring.new().to_json())
                log.info("secret values are sealed with a new key in %s", path)
        return SecretBox(read_key_file(path), path)

    @staticmethod
    def ephemeral() -> SecretBox:
        """A key in memory only, for tests that need no other process to open a value."""
        return SecretBox(Keyring.new())

    @property
    def ring(self) -> Keyring:
        return self._ring

    def seal(self, name: str, value: str, vid: str = "") -> str:
        vid = vid or random.token_hex(6)
        ring = self._ring
        nonce = os.urandom(12)
        box = AESGCM(ring.keys[ring.current]).encrypt(nonce, value.encode(), _aad(name, vid))
        return f"{PREFIX}:{ring.current}:{vid}:{base64.b64encode(nonce + box).decode()}"

    def open(self, name: str, stored: str) -> str:
        if not sealed(stored):
            return stored  # from before encryption: sealed at the next start
        _, kid, vid, encoded = stored.split(":", 3)
        key = self._key(kid)
        try:
            raw = base64.b64decode(encoded, validate=True)
            return AESGCM(key).decrypt(raw[:12], raw[12:], _aad(name, vid)).decode()
        except (InvalidTag, ValueError) as e:
            raise SecretKeyError(
                f"secret {name!r} cannot be opened with key {kid!r} (altered, or another key)"
            ) from e

    def reseal(self, name: str, stored: str) -> str:
        """The value sealed under the current key, keeping its value id (a new id for a
        value from before encryption)."""
        if sealed(stored) and stored.split(":", 2)[1] == self._ring.current:
            return stored
        return self.seal(name, self.open(name, stored), value_id(stored))

    def open_all(self, stored: Mapping[str, str]) -> dict[str, str]:
        return {name: self.open(name, v) for name, v in stored.items()}

    def seal_given(self, given: Mapping[str, str], current: Mapping[str, str]) -> dict[str, str]:
        """``given`` values sealed; a value equal to the current deployment's keeps its
        stored form (and id): the same secrets are no reason to restart replicas."""
        out: dict[str, str] = {}
        for name, value in given.items():
            before = current.get(name)
            if before is not None and self.open(name, before) == value:
                out[name] = before
            else:
                out[name] = self.seal(name, value)
        return out

    def _key(self, kid: str) -> bytes:
        with self._lock:
            if kid not in self._ring.keys and self._path is not None:
                self._ring = read_key_file(self._path)
            try:
                return self._ring.keys[kid]
            except KeyError:
                raise SecretKeyError(
                    f"no key {kid!r} to open a secret value: the key file or {ENV} "
                    "is not the one it was sealed with"
                ) from None


def _aad(name: str, vid: str) -> bytes:
    return f"{name}\0{vid}".encode()


def rotate(
    data_dir: Path, reseal_all: Callable[[SecretBox], int], env: Mapping[str, str] | None = None
) -> str:
    """A new current key (key file only), every stored value sealed under it, then the old
    keys dropped. With ``MODELCTL_SECRET_KEYS`` the operator puts the new key first on every
    server; this then seals every value under it. Returns what was done, for people."""
    env = os.environ if env is None else env
    if env.get(ENV):
        box = SecretBox(Keyring.from_env(env[ENV]))
        count = reseal_all(box)
        return f"{count} secret value(s) sealed under key {box.ring.current!r} (from {ENV})"
    path = data_dir / KEY_FILE
    if not path.exists():
        raise SecretKeyError(f"{path}: no key file (and {ENV} is not set)")
    old = read_key_file(path)
    ring = old.with_new_key()
    write_key_file(path, ring)  # servers that meet the new key id read the file again
    count = reseal_all(SecretBox(ring, path))
    write_key_file(path, ring.only_current())
    dropped = ", ".join(sorted(set(old.keys)))
    return f"{count} secret value(s) sealed under new key {ring.current!r}; dropped {dropped}"


def reseal_map(box: SecretBox, stored: Mapping[str, str]) -> dict[str, str]:
    return {name: box.reseal(name, v) for name, v in stored.items()}
