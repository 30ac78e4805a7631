"""`modelctl backup` while the server runs and `modelctl restore` onto a new data dir (and a
new database): a server started there has the same models in the same states, the same
builds, deployments, invocation keys and secret values, and applies them to a new cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from alembic.script import ScriptDirectory
from sqlmodel import select

import controlplane.backup as backups
from controlplane.backup import BackupError, backup, libpq_url
from controlplane.cli.main import main
from controlplane.config import DATABASE, Settings
from controlplane.desired import endpoint_keys
from controlplane.domain.access import hash_secret
from controlplane.gc import GC_LOCK
from controlplane.server import Server
from controlplane.storage.db import Database
from controlplane.storage.migrate import alembic_config
from controlplane.storage.tables import BuildRow
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import (
    MODEL_V1,
    MODEL_V2,
    Stub,
    build,
    create_model,
    fake_settings,
    resources,
    running,
    wait,
)
from tests.helpers.databases import new_postgres_database
from tests.integration.test_secrets import applied

SECRET = "backed-up-s3cr3t"


@dataclass(frozen=True)
class Seen:
    """What a user sees of a model through the API."""

    state: int
    active_deployment: str
    build: str
    replicas: int
    running_replicas: int
    environment: dict[str, str]
    secret_keys: list[str]
    builds: list[tuple[str, int, int, str, str]]  # name, version, state, image, source
    keys: list[str]


async def seen(stub: Stub, model: str) -> Seen:
    m = await stub.GetModel(rpc.GetModelRequest(name=model))
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    builds = await stub.ListBuilds(rpc.ListBuildsRequest(parent=model))
    keys = await stub.ListInvocationKeys(rpc.ListInvocationKeysRequest(parent=model))
    return Seen(
        state=m.state,
        active_deployment=m.active_deployment,
        build=dep.build,
        replicas=dep.resources.replicas,
        running_replicas=sum(r.state == pb.REPLICA_STATE_RUNNING for r in dep.replicas),
        environment=dict(dep.environment),
        secret_keys=list(dep.secret_environment_keys),
        builds=sorted(
            (b.name, b.version, b.state, b.image, b.source_sha256) for b in builds.builds
        ),
        keys=sorted(k.name for k in keys.keys if not k.revoked),
    )


def endpoint_keys_of(server: Server, model: str) -> tuple[str, ...]:
    """The invocation keys' hashes the model's endpoint takes (with auth on)."""
    with server.db.read() as s:
        return endpoint_keys(s).get(model, ())


async def modelctl(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


def head_revision() -> str:
    """The newest migration's revision id (the schema a server leaves)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head
    return head


@contextlib.contextmanager
def second_database(first: str) -> Iterator[str]:
    """Where the restore goes: PostgreSQL, a new database; SQLite, the new data dir's."""
    if first.startswith("sqlite"):
        yield ""
        return
    with new_postgres_database() as url:
        yield url


async def test_backup_while_serving_then_restore_brings_everything_back(
    fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = fake_settings(fresh_db, tmp_path)
    backup_dir = tmp_path / "backup"
    project = f"projects/bk{uuid.uuid4().hex[:8]}"
    async with running(settings) as server, grpc.aio.insecure_channel(server.grpc_address) as ch:
        stub = Stub(ch)
        served = (await create_model(stub, project, "served")).name
        deploy = rpc.DeployOptions(resources=resources(2), secret_environment={"API_KEY": SECRET})
        op = await build(stub, served, MODEL_V1, deploy=deploy)
        assert not op.HasField("error"), op.error
        key = await stub.CreateInvocationKey(
            rpc.CreateInvocationKeyRequest(parent=served, description="for the backup")
        )
        again = await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=served, build=op.target, resources=resources(2), environment={"M": "2"}
            )
        )
        assert not (await wait(stub, again)).HasField("error")
        stopped = (await create_model(stub, project, "stopped")).name
        deploy = rpc.DeployOptions(resources=resources(1))
        op2 = await build(stub, stopped, MODEL_V2, function="classify", deploy=deploy)
        assert not op2.HasField("error"), op2.error
        stop = await stub.StopModel(rpc.StopModelRequest(name=stopped))
        assert not (await wait(stub, stop)).HasField("error")

        async def settled() -> dict[str, Seen]:
            now = {m: await seen(stub, m) for m in (served, stopped)}
            assert now[served].state == pb.MODEL_STATE_DEPLOYED
            assert now[served].running_replicas == 2
            assert now[stopped].state == pb.MODEL_STATE_STOPPED
            return now

        before = await eventually("both models settled", settled, 30)
        assert before[served].active_deployment.endswith("/deployments/2")
        assert before[served].secret_keys == ["API_KEY"]
        assert before[served].keys == [key.key.name]
        spec_before = applied(server, served)
        assert endpoint_keys_of(server, served) == (hash_secret(key.secret),)
        assert spec_before.secrets == {"API_KEY": SECRET}

        # Taken while the server runs (and serves).
        capsys.readouterr()
        store = ["--data-dir", str(settings.data_dir), "--database-url", fresh_db]
        assert await modelctl("backup", str(backup_dir), *store) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert f"backup of {settings.data_dir.resolve()}" in out and "artifacts" in out

        # Never into a folder that holds something.
        assert await modelctl("backup", str(backup_dir), *store) == 2
        assert "is not empty" in capsys.readouterr().err

    assert stat.S_IMODE(backup_dir.stat().st_mode) == 0o700
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    kind = "sqlite" if fresh_db.startswith("sqlite") else "postgresql"
    assert manifest["format"] == 1
    assert manifest["data_dir"] == str(settings.data_dir.resolve())
    assert manifest["database"]["kind"] == kind
    assert manifest["database"]["alembic_revision"] == head_revision()
    assert manifest["artifacts"]["copied"] >= 2 and manifest["artifacts"]["collected"] == []
    assert manifest["total"]["files"] > 0 and manifest["total"]["bytes"] > 0
    key_file = backup_dir / "data" / "secrets.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert (backup_dir / ("controlplane.db" if kind == "sqlite" else "database.dump")).is_file()

    new_dir = tmp_path / "restored"
    with second_database(fresh_db) as new_url:
        target = ["--data-dir", str(new_dir)] + (["--database-url", new_url] if new_url else [])
        capsys.readouterr()
        assert await modelctl("restore", str(backup_dir), *target) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert "2 models, 2 builds" in out, out
        assert stat.S_IMODE((new_dir / "secrets.key").stat().st_mode) == 0o600

        # Only onto a fresh data dir and an empty database.
        assert await modelctl("restore", str(backup_dir), *target) == 2
        err = capsys.readouterr().err
        assert "already has a database" in err if kind == "sqlite" else "not empty" in err
        if new_url:
            other = ["--data-dir", str(tmp_path / "other"), "--database-url", new_url]
            assert await modelctl("restore", str(backup_dir), *other) == 2
            assert "already has a control plane" in capsys.readouterr().err

        restored = fake_settings(new_url, tmp_path, data_dir=new_dir)
        async with (
            running(restored) as server,
            grpc.aio.insecure_channel(server.grpc_address) as ch,
        ):
            stub = Stub(ch)

            async def same_again() -> bool:
                return {m: await seen(stub, m) for m in before} == before

            await eventually("the models as they were", same_again, 30)
            spec = applied(server, served)
            assert spec.build_name == spec_before.build_name
            assert spec.replicas == spec_before.replicas == 2
            assert spec.secrets == {"API_KEY": SECRET}
            assert endpoint_keys_of(server, served) == (hash_secret(key.secret),)
            apps = server.backend.apps.values()  # type: ignore[attr-defined]
            assert stopped not in {a.spec.model_name for a in apps}
            assert Path(spec.artifact_path).is_relative_to(new_dir)
            with server.db.read() as s:
                paths = [
                    Path(p)
                    for b in s.exec(select(BuildRow)).all()
                    for p in (b.artifact_path, b.log_path)
                ]
            assert paths and all(p.is_relative_to(new_dir) for p in paths), paths
            assert await asyncio.to_thread(lambda: all(p.exists() for p in paths)), paths


def test_pg_dump_and_pg_restore_get_the_url_without_driver_or_password() -> None:
    url, env = libpq_url("postgresql+psycopg://cp:pw@db.example:5433/control?sslmode=require")
    assert url == "postgresql://cp@db.example:5433/control?sslmode=require"
    assert env == {"PGPASSWORD": "pw"}


async def test_postgresql_backup_waits_for_gc_and_without_pg_dump_writes_its_command(
    fresh_postgres: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = Database(fresh_postgres)
    await asyncio.to_thread(db.migrate)
    settings = Settings(data_dir=tmp_path / "data", database_url=fresh_postgres)
    try:
        release = db.try_lock(GC_LOCK)  # a collection runs (on some server)
        assert release is not None
        try:
            with pytest.raises(BackupError, match="garbage collection") as e:
                await asyncio.to_thread(backup, settings, tmp_path / "waited", lock_wait_s=0.6)
            assert e.value.exit_code == 1
        finally:
            release()
    finally:
        db.close()

    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    out_dir = tmp_path / "undumped"
    store = ["--data-dir", str(settings.data_dir), "--database-url", fresh_postgres]
    assert await modelctl("backup", str(out_dir), *store) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    command = (out_dir / "DUMP_COMMAND.txt").read_text().splitlines()[-1]
    assert "pg_dump is not on PATH" in out and command in out
    name = fresh_postgres.rsplit("/", 1)[1]
    assert command.startswith("pg_dump --format=custom --no-owner --file=")
    assert command.endswith(f"--dbname=postgresql://root@127.0.0.1:5432/{name}")
    assert not (out_dir / "database.dump").exists()

    # Such a backup cannot be restored until the dump is made.
    new = ["--data-dir", str(tmp_path / "new"), "--database-url", fresh_postgres]
    assert await modelctl("restore", str(out_dir), *new) == 2
    assert "has no database.dump" in capsys.readouterr().err


def test_with_the_database_store_another_servers_builds_are_not_called_outside(
    tmp_path: Path,
) -> None:
    """Builds recorded by another server (its path, not this data dir's) are copied from
    this server's disk under their digest when it has them, and left to the database dump
    when it has not; only a path that names no digest is reported outside."""
    here, there = "ab" * 32, "cd" * 32
    settings = fake_settings("sqlite://", tmp_path, artifact_store=DATABASE)
    (settings.artifacts_dir / here).mkdir(parents=True)
    (settings.artifacts_dir / here / "model.py").write_text("def predict(b):\n    return b\n")
    recorded = [f"/srv/other/artifacts/{here}", f"/srv/other/artifacts/{there}", "/elsewhere/x"]
    copied = backups._copy_files(settings, settings.data_dir, recorded, tmp_path / "out")
    assert copied.outside == ["/elsewhere/x"] and copied.collected == []
    assert copied.artifacts == 1
    assert (tmp_path / "out" / "artifacts" / here / "model.py").is_file()
