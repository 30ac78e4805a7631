"""The console's admin pages over HTTP, with tokens on (a real server, fake backend, on
SQLite and PostgreSQL): an admin creates a token and sees its secret once, the token works
against the API until it is revoked (after a confirmation), the audit lists what the
console did and who did it; a deployer gets the API's refusal in words and no links."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from controlplane.api.client import Client, ClientError
from controlplane.domain.access import Role
from controlplane.server import Server
from tests.helpers import eventually
from tests.helpers.api import fake_settings, running
from tests.helpers.console import Web, console_of, web_of
from tests.integration.test_console import token_of

TOKENS = "/projects/default/tokens"
AUDIT = "/projects/default/audit"


@pytest.fixture
async def secured(fresh_db: str, tmp_path: Path) -> AsyncIterator[Server]:
    async with running(fake_settings(fresh_db, tmp_path, insecure_no_auth=False)) as srv:
        yield srv


def admin_secret(server: Server) -> str:
    return (server.settings.data_dir / "admin.token").read_text().strip()


@pytest.fixture
async def admin(secured: Server) -> AsyncIterator[Web]:
    """The server's admin (every project's), signed in to the console on project default."""
    async with (
        console_of(secured.grpc_address) as console,
        web_of(console, admin_secret(secured), "default") as web,
    ):
        yield web


def text_of(page: httpx.Response) -> str:
    return html.unescape(page.text)


def row_of(page: str, row_id: str) -> str:
    found = re.search(rf'<tr id="{re.escape(row_id)}">(.*?)</tr>', page, re.S)
    assert found, f"no row {row_id} on the page"
    return found.group(1)


async def caller(server: Server, secret: str) -> Role:
    async with Client(server.grpc_address, token=secret) as c:
        return (await c.get_caller()).role


async def test_an_admin_creates_a_token_sees_its_secret_once_and_revokes_it(
    admin: Web, secured: Server
) -> None:
    page = await admin.get(TOKENS)
    assert page.status_code == 200
    text = text_of(page)
    assert '<label for="token-role">Role</label>' in text
    assert 'aria-current="page">Tokens<' in text

    r = await admin.post(TOKENS, role="deployer", description="ci pipeline", expires_hours="")
    assert r.status_code == 303 and r.headers["location"] == TOKENS
    shown = text_of(await admin.get(TOKENS))
    found = re.search(r'<code id="new-secret">(mlc_[^<]+)</code>', shown)
    assert found, "the new secret on the page"
    secret = found.group(1)
    assert "it will not be shown again" in shown
    token_id = secret.split("_")[1]
    row = row_of(shown, f"token-{token_id}")
    assert "deployer" in row and "ci pipeline" in row and "never" in row and "valid" in row

    again = text_of(await admin.get(TOKENS))
    assert secret not in again and 'id="new-secret"' not in again, "shown once only"
    assert token_id in again, "the token itself stays listed"

    assert await caller(secured, secret) == Role.DEPLOYER, "the token works against the API"

    revoke = f"{TOKENS}/{token_id}/revoke"
    asked = await admin.post(revoke, back=TOKENS, confirmed="")
    assert asked.status_code == 200 and "Are you sure?" in asked.text
    assert f"Revoke token {token_id}?" in text_of(asked)
    assert await caller(secured, secret) == Role.DEPLOYER, "asking revokes nothing"

    r = await admin.post(revoke, back=TOKENS)
    assert r.status_code == 303 and r.headers["location"] == TOKENS
    after = text_of(await admin.get(TOKENS))
    assert f"Token {token_id} revoked." in after
    revoked = row_of(after, f"token-{token_id}")
    assert "revoked" in revoked and "/revoke" not in revoked, "nothing left to revoke"

    async def refused() -> bool:
        with pytest.raises(ClientError) as e:
            await caller(secured, secret)
        return e.value.code == "UNAUTHENTICATED"

    await eventually("the revoked token refused", refused, timeout=5)


async def test_a_token_with_an_expiry_and_a_bad_expiry(admin: Web) -> None:
    r = await admin.post(TOKENS, role="viewer", description="for an hour", expires_hours="1")
    assert r.status_code == 303
    text = text_of(await admin.get(TOKENS))
    found = re.search(r'<code id="new-secret">mlc_([0-9a-f]{16})_', text)
    assert found
    row = row_of(text, f"token-{found.group(1)}")
    assert "for an hour" in row and "never" not in row and " UTC" in row

    r = await admin.post(TOKENS, role="viewer", expires_hours="soon")
    assert r.status_code == 303
    text = text_of(await admin.get(TOKENS))
    assert "Not valid: expires in: 'soon' is not a number of hours" in text
    assert 'id="new-secret"' not in text


async def test_the_audit_lists_the_consoles_own_actions_with_their_principal(
    admin: Web, secured: Server
) -> None:
    async with Client(secured.grpc_address, token=admin_secret(secured)) as c:
        me = (await c.get_caller()).name
    r = await admin.post(TOKENS, role="viewer", description="audited")
    assert r.status_code == 303
    page = await admin.get(AUDIT)
    assert page.status_code == 200
    text = text_of(page)
    assert 'aria-current="page">Audit<' in text
    rows = re.findall(r'<tr id="audit-\d+">(.*?)</tr>', text, re.S)
    created = [row for row in rows if ">CreateToken<" in row]
    assert created, "the token creation is in the audit"
    assert me in created[0] and ">OK<" in created[0]
    assert "projects/default" in created[0]


async def test_a_deployer_gets_the_refusal_in_words_and_no_admin_links(secured: Server) -> None:
    deployer = await token_of(secured, Role.DEPLOYER)
    async with console_of(secured.grpc_address) as console, web_of(console, deployer) as web:
        models = await web.get("/projects/default/models")
        assert models.status_code == 200
        assert f'href="{TOKENS}"' not in models.text and f'href="{AUDIT}"' not in models.text
        for path, method in ((TOKENS, "ListTokens"), (AUDIT, "ListAuditRecords")):
            page = await web.get(path)
            assert page.status_code == 403, path
            text = text_of(page)
            assert f"Not allowed: {method} needs the admin role; this token is deployer" in text
            assert "Traceback" not in text
            assert f'href="{TOKENS}"' not in text and f'href="{AUDIT}"' not in text
        # A hand-made form post is refused by the API too, and says so.
        r = await web.post(TOKENS, role="admin", back=TOKENS)
        assert r.status_code == 303
        refused = text_of(await web.get(TOKENS))
        assert "Not allowed: CreateToken needs the admin role" in refused
