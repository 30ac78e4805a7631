"""Faults of the machine under a running server: a full disk during an upload and a
write, and its PostgreSQL going away mid-use and coming back. Each call gets a clear
error with the right code (RESOURCE_EXHAUSTED / UNAVAILABLE with a retry hint), nothing
is half-written, and the server recovers by itself once the fault is gone."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modellifecycle.v1 import service_pb2 as rpc
from modellifecycle.v1 import service_pb2_grpc
from tests.helpers.api import (
    MODEL_V1,
    build,
    error_info,
    fake_settings,
    op_reason,
    running,
    upload,
    wait,
)
from tests.helpers.tcp_proxy import Proxy


def retry_delay_s(err: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    raise AssertionError("no RetryInfo")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB file system of its own (tmpfs) for the data dir."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (as root it can): {made.stderr.decode()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    """A file that takes all but about ``leave_bytes`` of the disk (0: every byte)."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    with filler.open("ab", buffering=0) as f:
        try:
            f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave_bytes - 4096, 0))
            f.flush()
            while leave_bytes == 0:
                f.write(b"\0" * 512)
                f.flush()
        except OSError:  # full, as wanted
            pass
    return filler


def random_zip(size: int) -> bytes:
    path = Path(f"/tmp/rz-{uuid.uuid4().hex}.zip")
    try:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("model.py", MODEL_V1)
            z.writestr("weights.bin", os.urandom(size))
        return path.read_bytes()
    finally:
        path.unlink()


def packed_zip(unpacked: int) -> bytes:
    """A small zip (deflated) whose files take ``unpacked`` bytes once extracted."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("model.py", MODEL_V1)
        z.writestr("weights.txt", b"0123456789abcdef" * (unpacked // 16))
    return buf.getvalue()


async def test_a_full_disk_refuses_uploads_and_writes_clearly_and_recovers(
    small_disk: Path, tmp_path: Path
) -> None:
    data = small_disk / "data"
    settings = fake_settings(f"sqlite:///{data / 'cp.db'}", tmp_path, data_dir=data)
    async with running(settings) as server, grpc.aio.insecure_channel(server.grpc_address) as ch:
        stub = service_pb2_grpc.ModelLifecycleStub(ch)
        model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/d", model_id="m"))
        source = random_zip(200_000)
        filler = fill(small_disk, 64_000)

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await upload(stub, model.name, source)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert error_info(e.value)[0] == "DISK_FULL" and "disk is full" in str(e.value.details())
        assert not list((data / "sources").rglob("*.zip")), "no half-written upload is left"

        fill(small_disk, 0)  # not a byte left: the database's own writes fail too
        with pytest.raises(grpc.aio.AioRpcError) as e:
            for i in range(50):  # until SQLite must grow its file
                await stub.CreateModel(
                    rpc.CreateModelRequest(parent="projects/d", model_id=f"n{i}")
                )
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()

        filler.unlink()  # the fault goes: the same calls work, with nothing more to do
        uploaded = await upload(stub, model.name, source)
        assert uploaded.size_bytes == len(source)
        again = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/d", model_id="z"))
        assert again.name == "projects/d/models/z"
        op = await build(stub, model.name, MODEL_V1)
        assert not op.HasField("error"), op.error


async def test_a_build_on_a_full_disk_fails_clearly_leaves_nothing_and_recovers(
    small_disk: Path, tmp_path: Path
) -> None:
    """The upload fits; its 1.5 MiB unpacked does not: the build's operation ends
    RESOURCE_EXHAUSTED / DISK_FULL, no artifact or staging folder is left, and the same
    build succeeds once there is room."""
    data = small_disk / "data"
    settings = fake_settings(f"sqlite:///{data / 'cp.db'}", tmp_path, data_dir=data)
    async with running(settings) as server, grpc.aio.insecure_channel(server.grpc_address) as ch:
        stub = service_pb2_grpc.ModelLifecycleStub(ch)
        model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/d", model_id="b"))
        source = await upload(stub, model.name, packed_zip(1_500_000))
        filler = fill(small_disk, 300_000)
        request = rpc.CreateBuildRequest(
            parent=model.name,
            source_sha256=source.sha256,
            file_path="model.py",
            function_name="predict",
        )
        failed = await wait(stub, await stub.CreateBuild(request), 60)
        assert failed.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], failed.error
        assert op_reason(failed) == "DISK_FULL" and "disk is full" in failed.error.message
        artifacts = data / "artifacts"
        left = [p for p in artifacts.rglob("*") if p.is_file() or p.parent.name != "staging"]
        assert [p for p in left if "staging" in p.parts or p.name == "model.py"] == []

        filler.unlink()  # room again: the same build goes through
        done = await wait(stub, await stub.CreateBuild(request), 60)
        assert not done.HasField("error"), done.error


async def test_a_postgresql_restart_answers_unavailable_and_the_server_recovers(
    fresh_postgres: str, tmp_path: Path
) -> None:
    url = urlsplit(fresh_postgres)
    proxy = Proxy(url.hostname or "127.0.0.1", url.port or 5432)
    await proxy.start()
    through = urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}"))
    async with (
        running(fake_settings(through, tmp_path)) as server,
        grpc.aio.insecure_channel(server.grpc_address) as ch,
    ):
        stub = service_pb2_grpc.ModelLifecycleStub(ch)
        model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/pg", model_id="m"))
        started = await stub.CreateBuild(
            rpc.CreateBuildRequest(
                parent=model.name,
                source_sha256=(await upload(stub, model.name, random_zip(1000))).sha256,
                file_path="model.py",
                function_name="predict",
            )
        )

        await proxy.cut()  # the database restarts: gone for a while
        calls = [
            stub.CreateModel(rpc.CreateModelRequest(parent="projects/pg", model_id=f"c{i}"))
            for i in range(5)
        ] + [stub.GetModel(rpc.GetModelRequest(name=model.name))]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for outcome in outcomes:
            assert isinstance(outcome, grpc.aio.AioRpcError), outcome
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome.details()
            assert error_info(outcome)[0] == "DATABASE_UNAVAILABLE"
            assert retry_delay_s(outcome) > 0

        await proxy.start()  # back: the very same calls succeed, nothing half-made
        made = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/pg", model_id="c0"))
        assert made.name == "projects/pg/models/c0"
        listed = await stub.ListModels(rpc.ListModelsRequest(parent="projects/pg"))
        assert sorted(m.name.rsplit("/", 1)[1] for m in listed.models) == ["c0", "m"]
        done = await stub.WaitOperation(
            rpc.WaitOperationRequest(name=started.name, timeout=Duration(seconds=30))
        )
        assert done.done and not done.HasField("error"), done
    await proxy.cut()
