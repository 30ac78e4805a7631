"""gRPC over TLS and mutual TLS, with certificates the tests make: the handshakes that
must succeed do, and those that must fail (unknown CA, plaintext, no or a foreign client
certificate) fail; the CLI takes a CA file and a client certificate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.api.client import Client, ClientError
from controlplane.server import Server
from tests.helpers.api import fake_settings, running
from tests.helpers.certs import Authority, Issued
from tests.helpers.servers import MODELCTL, run, serve

PROJECT = "projects/tls"


@dataclass(frozen=True)
class Pki:
    ca: Path
    rogue_ca: Path
    server: Issued
    client: Issued
    stranger: Issued  # a client certificate from another CA


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = Authority(tmp_path / "pki", "ca")
    rogue = Authority(tmp_path / "rogue", "rogue-ca")
    return Pki(
        ca.pem,
        rogue.pem,
        ca.issue("server", server=True),
        ca.issue("client", server=False),
        rogue.issue("stranger", server=False),
    )


@pytest.fixture
async def tls_server(pki: Pki, tmp_path: Path) -> AsyncIterator[Server]:
    settings = fake_settings(
        f"sqlite:///{tmp_path / 'cp.db'}",
        tmp_path,
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
    )
    async with running(settings) as srv:
        yield srv


@pytest.fixture
async def mtls_server(pki: Pki, tmp_path: Path) -> AsyncIterator[Server]:
    settings = fake_settings(
        f"sqlite:///{tmp_path / 'cp.db'}",
        tmp_path,
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_client_ca=pki.ca,
    )
    async with running(settings) as srv:
        yield srv


async def call(server: Server, tls: tuple[str | None, str | None, str | None] | None) -> str:
    """Lists the models over a fresh channel: "OK" or the gRPC code name of the failure."""
    async with Client(server.grpc_address, timeout_s=5, tls=tls) as c:
        try:
            await c.list_models(PROJECT)
        except ClientError as e:
            return e.code
    return "OK"


async def test_tls_trusts_only_its_ca(tls_server: Server, pki: Pki) -> None:
    assert await call(tls_server, (str(pki.ca), None, None)) == "OK"
    assert await call(tls_server, (str(pki.rogue_ca), None, None)) == "UNAVAILABLE"
    assert await call(tls_server, None) == "UNAVAILABLE", "plaintext to a TLS port"


async def test_mutual_tls_wants_a_client_certificate_from_its_ca(
    mtls_server: Server, pki: Pki
) -> None:
    good = (str(pki.ca), str(pki.client.cert), str(pki.client.key))
    assert await call(mtls_server, good) == "OK"
    assert await call(mtls_server, (str(pki.ca), None, None)) == "UNAVAILABLE", "no certificate"
    stranger = (str(pki.ca), str(pki.stranger.cert), str(pki.stranger.key))
    assert await call(mtls_server, stranger) == "UNAVAILABLE", "a certificate of another CA"


def test_a_certificate_without_its_key_is_refused_before_connecting(pki: Pki) -> None:
    with pytest.raises(ValueError, match="needs its key"):
        Client("127.0.0.1:1", tls=(str(pki.ca), str(pki.client.cert), None))
    with pytest.raises(ValueError, match="cannot read the CA file"):
        Client("127.0.0.1:1", tls=(str(pki.ca) + ".missing", None, None))


@pytest.mark.slow
async def test_the_cli_speaks_mutual_tls_to_modelctl_serve(pki: Pki, tmp_path: Path) -> None:
    async with serve(
        "--insecure-no-auth",
        "--grpc-port=0",
        "--http-port=0",
        f"--data-dir={tmp_path / 'data'}",
        "--backend=fake",
        f"--tls-cert={pki.server.cert}",
        f"--tls-key={pki.server.key}",
        f"--tls-client-ca={pki.ca}",
    ) as (_, address):
        tls = [f"--ca-file={pki.ca}", f"--client-cert={pki.client.cert}"]
        key, at = f"--client-key={pki.client.key}", f"--server={address}"
        code, out, err = await run(MODELCTL, "models", "create", "iris", at, *tls, key)
        assert code == 0, err
        code, out, err = await run(MODELCTL, "models", "list", at, *tls, key)
        assert code == 0 and "iris" in out, err
        code, _, err = await run(MODELCTL, "models", "list", at, f"--ca-file={pki.ca}")
        assert code == 3 and "cannot reach" in err, "no client certificate: refused"
        code, _, err = await run(MODELCTL, "models", "list", at, *tls)
        assert code == 2 and "needs its key" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--tls-cert=X"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca=X"], "--tls-client-ca needs --tls-cert"),
        (["--tls-cert=/no/such.crt", "--tls-key=/no/such.key"], "/no/such.crt: no such file"),
    ],
)
async def test_serve_refuses_incomplete_tls_flags(
    flags: list[str], error: str, tmp_path: Path
) -> None:
    code, _, err = await run(MODELCTL, "serve", f"--data-dir={tmp_path}", "--backend=fake", *flags)
    assert code == 2 and error in err, err
