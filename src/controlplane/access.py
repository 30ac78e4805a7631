"""Tokens, invocation keys and audit records: create, list, revoke, verify tokens (with
a short cache), the server's first admin token, one audit record per mutation."""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

from sqlmodel import col, select

from controlplane.config import ADMIN_TOKEN_FILE
from controlplane.domain import names
from controlplane.domain.access import (
    ALL_PROJECTS,
    ANONYMOUS,
    KEY_PREFIX,
    AuditRecord,
    InvocationKey,
    Principal,
    Role,
    Token,
    hash_secret,
    hidden,
    id_of,
    matches,
    new_secret,
    project_of,
)
from controlplane.domain.errors import check_text, invalid_field, not_found
from controlplane.storage import audit, codec, repo
from controlplane.storage.changes import Changes, now
from controlplane.storage.db import Database, WriteTx
from controlplane.storage.tables import AuditRow, InvocationKeyRow, OperationRow, TokenRow

log = logging.getLogger(__name__)

MAX_DESCRIPTION = 1000  # of a token or an invocation key
VERIFY_CACHE_S = 1.0  # a revoked token stops working within this long on other servers


class _NotFirst(Exception):
    """A token exists already: the first admin token was made by an earlier start."""


# What the auth interceptor says of a mutation before its handler runs: its change's
# transaction writes the record (storage/audit.py).
PendingAudit = audit.Pending
expect_audit = audit.expect
end_audit = audit.done


def token_name(project: str, token_id: str) -> str:
    return f"projects/{project}/tokens/{token_id}"


def _to_token(row: TokenRow) -> Token:
    return Token(
        name=token_name(row.project, row.token_id),
        role=Role(row.role),
        description=row.description,
        create_time=codec.utc(row.create_time),
        expire_time=codec.utc(row.expire_time) if row.expire_time else None,
        revoked=row.revoked,
        creator=row.creator,
    )


def _to_key(row: InvocationKeyRow) -> InvocationKey:
    return InvocationKey(
        name=f"{row.model}/keys/{row.key_id}",
        description=row.description,
        create_time=codec.utc(row.create_time),
        revoked=row.revoked,
        creator=row.creator,
    )


def _to_audit(row: AuditRow) -> AuditRecord:
    return AuditRecord(
        id=row.id or 0,
        time=codec.utc(row.time),
        principal=row.principal,
        method=row.method,
        resource=row.resource,
        project=row.project,
        code=row.code,
        peer=row.peer,
        operation=row.operation,
    )


def _apply_keys(tx: WriteTx) -> None:
    """The replicas learn the model's keys from the next apply of the desired set."""
    Changes(tx, "").resync()


def _parent_project(parent: str) -> str:
    """projects/{p} or projects/- ."""
    parts = parent.split("/")
    if len(parts) == 2 and parts[0] == "projects" and parts[1] == ALL_PROJECTS:
        return ALL_PROJECTS
    return names.parse_project(parent, "parent").project


class Access:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._cache: dict[str, tuple[float, Principal | None, str]] = {}
        self._lock = threading.Lock()

    # ---- tokens ---------------------------------------------------------------------------

    def create_token(
        self,
        parent: str,
        role: int,
        description: str,
        ttl_s: float | None,
        creator: Principal,
        first: bool = False,
    ) -> tuple[Token, str]:
        """``first``: only if there is no token at all yet (ensure_admin_token); checked
        and written in one transaction, which writers take in turn, so servers starting
        together on one database make a single first token."""
        project = _parent_project(parent)
        if role not in Role.__members__.values():
            raise invalid_field("role", "one of ROLE_VIEWER, ROLE_DEPLOYER, ROLE_ADMIN")
        if ttl_s is not None and ttl_s <= 0:
            raise invalid_field("ttl", f"must be positive, got {ttl_s:g} s")
        check_text(description, "description", MAX_DESCRIPTION)
        if project == ALL_PROJECTS and creator.project != ALL_PROJECTS:
            raise hidden(parent)
        token_id, secret = new_secret()
        created = now()
        row = TokenRow(
            token_id=token_id,
            project=project,
            role=int(role),
            secret_hash=hash_secret(secret),
            description=description,
            creator=creator.name if creator.name != ANONYMOUS else "",
            create_time=created,
            expire_time=created + timedelta(seconds=ttl_s) if ttl_s is not None else None,
        )
        with self.db.write() as tx:
            if first and tx.session.exec(select(TokenRow.id).limit(1)).first() is not None:
                raise _NotFirst
            tx.session.add(row)
        return _to_token(row), secret

    def list_tokens(self, parent: str, size: int, page_token: str) -> tuple[list[Token], str]:
        project = _parent_project(parent)
        with self.db.read() as s:
            page = repo.list_page(
                s,
                TokenRow,
                [TokenRow.project == project],
                f"tokens:{project}",
                size,
                page_token,
                _to_token,
                newest_first=True,
            )
        return page.items, page.next_page_token

    def revoke_token(self, name: str) -> Token:
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != "projects" or parts[2] != "tokens":
            raise invalid_field("name", f"{name!r} is not projects/{{project}}/tokens/{{id}}")
        with self.db.write() as tx:
            row = tx.session.exec(
                select(TokenRow).where(TokenRow.token_id == parts[3], TokenRow.project == parts[1])
            ).first()
            if row is None:
                raise not_found("token", name)
            row.revoked = True
            tx.session.add(row)
            token = _to_token(row)
        with self._lock:
            self._cache.clear()
        return token

    def cached(self, secret: str) -> Principal | bool | None:
        """What ``verify`` said of this secret within the last seconds (no query, no
        thread): the principal, None (not a live token), or False when it must ask."""
        token_id = id_of(secret)
        if token_id is None:
            return None
        with self._lock:
            hit = self._cache.get(token_id)
        if hit is not None and hit[0] > time.monotonic() and hit[2] == hash_secret(secret):
            return hit[1]
        return False

    def verify(self, secret: str) -> Principal | None:
        """The principal a presented secret stands for; None when it is not a live token."""
        known = self.cached(secret)
        if known is not False:
            return known if isinstance(known, Principal) else None
        token_id = id_of(secret)
        assert token_id is not None
        hashed = hash_secret(secret)
        with self.db.read() as s:
            row = s.exec(select(TokenRow).where(TokenRow.token_id == token_id)).first()
        principal: Principal | None = None
        live = (
            row is not None
            and not row.revoked
            and (row.expire_time is None or codec.utc(row.expire_time) > now())
        )
        if row is not None and live and matches(secret, row.secret_hash):
            principal = Principal(
                token_name(row.project, row.token_id), row.project, Role(row.role)
            )
        expires = time.monotonic() + VERIFY_CACHE_S
        if row is not None and row.expire_time is not None:  # never cached past expiry
            left = (codec.utc(row.expire_time) - now()).total_seconds()
            expires = min(expires, time.monotonic() + max(left, 0.0))
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[token_id] = (expires, principal, hashed)
        return principal

    def ensure_admin_token(self, data_dir: Path) -> Path | None:
        """At the first start (no token at all): an admin token of every project, written
        to DATA_DIR/admin.token (mode 0600). Returns the file when it wrote one."""
        try:
            token, secret = self.create_token(
                f"projects/{ALL_PROJECTS}",
                Role.ADMIN,
                "the server's first admin token",
                None,
                Principal("", ALL_PROJECTS, Role.ADMIN),
                first=True,
            )
        except _NotFirst:
            return None
        path = data_dir / ADMIN_TOKEN_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.chmod(path, 0o600)
        log.info("first start: an admin token (%s) was written to %s", token.name, path)
        return path

    def operation_project(self, name: str) -> str | None:
        """The project of operations/{id} (None if there is no such operation)."""
        with self.db.read() as s:
            model = s.exec(select(OperationRow.model).where(OperationRow.name == name)).first()
        return project_of(model) if model else None

    # ---- invocation keys ------------------------------------------------------------------

    def create_key(
        self, parent: str, description: str, creator: Principal
    ) -> tuple[InvocationKey, str]:
        model = str(names.parse_model(parent, "parent"))
        check_text(description, "description", MAX_DESCRIPTION)
        key_id, secret = new_secret(KEY_PREFIX)
        row = InvocationKeyRow(
            key_id=key_id,
            model=model,
            secret_hash=hash_secret(secret),
            description=description,
            creator=creator.name,
            create_time=now(),
        )
        with self.db.write() as tx:
            repo.model_row(tx.session, model)  # NOT_FOUND for a model that is not there
            tx.session.add(row)
            _apply_keys(tx)
        return _to_key(row), secret

    def list_keys(self, parent: str, size: int, page_token: str) -> tuple[list[InvocationKey], str]:
        model = str(names.parse_model(parent, "parent"))
        with self.db.read() as s:
            repo.model_row(s, model)
            page = repo.list_page(
                s,
                InvocationKeyRow,
                [InvocationKeyRow.model == model],
                f"keys:{model}",
                size,
                page_token,
                _to_key,
                newest_first=True,
            )
        return page.items, page.next_page_token

    def revoke_key(self, name: str) -> InvocationKey:
        model, sep, key_id = name.rpartition("/keys/")
        if not sep or not key_id:
            raise invalid_field(
                "name", f"{name!r} is not projects/{{project}}/models/{{model}}/keys/{{id}}"
            )
        model = str(names.parse_model(model, "name"))
        with self.db.write() as tx:
            row = tx.session.exec(
                select(InvocationKeyRow).where(
                    InvocationKeyRow.key_id == key_id, InvocationKeyRow.model == model
                )
            ).first()
            if row is None:
                raise not_found("key", name)
            if not row.revoked:
                row.revoked = True
                tx.session.add(row)
                _apply_keys(tx)
            return _to_key(row)

    # ---- audit ----------------------------------------------------------------------------

    def audit(self, pending: audit.Pending, code: str, operation: str = "") -> None:
        """A record of a call that changed nothing (refused, or failed before a change);
        a change's own transaction carries its record (storage/audit.py)."""
        with self.db.write() as tx:
            tx.session.add(audit.row_for(pending, code, operation))

    def list_audit(self, parent: str, size: int, page_token: str) -> tuple[list[AuditRecord], str]:
        project = _parent_project(parent)
        where = [] if project == ALL_PROJECTS else [col(AuditRow.project) == project]
        with self.db.read() as s:
            page = repo.list_page(
                s, AuditRow, where, f"audit:{project}", size, page_token, _to_audit, True
            )
        return page.items, page.next_page_token
