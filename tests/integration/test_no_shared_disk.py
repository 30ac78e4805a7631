"""Two `modelctl serve` processes on one PostgreSQL, each with a data dir of its own
(``--artifact-store database``): a source uploaded and a build made through the first is
built from, deployed, rolled back to, exported and its log read through the second after
the first server and its whole data dir are gone. A build running on the first is
followed live through the second. With the default store, the second server says the
build's image is not there instead of failing later."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from controlplane.api.client import Client
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually, gated
from tests.helpers.api import Stub, error_info, resources, start_build, upload, wait, zip_bytes
from tests.helpers.ray_nodes import seen_by, sharing_no_disk
from tests.helpers.servers import Cluster, channel

V1 = "def predict(body):\n    return {'version': 1}\n"
V2 = "def predict(body):\n    return {'version': 2}\n"


def server(
    tmp_path: Path, name: str, db_url: str, store: str = "database", prefix: Sequence[str] = ()
) -> Cluster:
    (tmp_path / name).mkdir()
    return Cluster(
        tmp_path / name / "data",
        db_url,
        server_id=name,
        extra=[f"--artifact-store={store}"],
        prefix=prefix,
    )


async def image_of(stub: Stub, build_name: str) -> str:
    b = await stub.GetBuild(rpc.GetBuildRequest(name=build_name))
    assert b.state == pb.BUILD_STATE_BUILT
    return b.image.removeprefix("artifact://sha256:")


async def test_a_build_outlives_the_server_and_the_disk_it_was_made_on(
    tmp_path: Path, fresh_postgres: str
) -> None:
    a = server(tmp_path, "a", fresh_postgres)
    b = server(tmp_path, "b", fresh_postgres)
    a.start()
    try:
        async with channel(a) as sa:
            model = (
                await sa.CreateModel(rpc.CreateModelRequest(parent="projects/nd", model_id="m"))
            ).name
            two = await upload(sa, model, zip_bytes({"model.py": V2}))
            first = await wait(sa, await start_build(sa, model, {"model.py": V1}), 120)
            assert not first.HasField("error"), first.error
            first_build = str(first.target)
            digest = await image_of(sa, first_build)
    finally:
        a.kill()
    shutil.rmtree(tmp_path / "a")  # the first server's disk: gone with it

    b.start()
    try:
        async with channel(b) as sb:
            assert await image_of(sb, first_build) == digest
            # A source uploaded through A builds through B (B never received it).
            op = await sb.CreateBuild(
                rpc.CreateBuildRequest(
                    parent=model,
                    source_sha256=two.sha256,
                    file_path="model.py",
                    function_name="predict",
                    deploy=rpc.DeployOptions(resources=resources(1)),
                )
            )
            done = await wait(sb, op, 120)
            assert not done.HasField("error"), done.error
            m = await sb.GetModel(rpc.GetModelRequest(name=model))
            assert m.state == pb.MODEL_STATE_DEPLOYED
            # A rollback to A's build: its artifact comes from the database to B's disk.
            op = await sb.CreateDeployment(
                rpc.CreateDeploymentRequest(parent=model, build=first_build, resources=resources(2))
            )
            done = await wait(sb, op, 120)
            assert not done.HasField("error"), done.error
            artifact = b.data / "artifacts" / digest
            assert (artifact / "model.py").read_text() == V1
            app = b.running_apps()["nd.m"]["spec"]
            assert isinstance(app, dict) and app["artifact_path"] == str(artifact)
            assert app["build_name"] == first_build
            # Its log, written on A's disk, read through B.
            lines = [
                line.text
                async for line in sb.StreamBuildLogs(rpc.StreamBuildLogsRequest(name=first_build))
            ]
            assert any("build succeeded" in text for text in lines), lines[-3:]
        # Exported through B.
        async with Client(b.address) as c:
            manifest = await c.export_build(
                first_build, tmp_path / "layout", base_image="scratch", tag="v1"
            )
        assert manifest.startswith("sha256:") and (tmp_path / "layout" / "index.json").is_file()
    finally:
        b.kill()


async def test_without_the_database_store_another_disk_says_the_image_is_not_there(
    tmp_path: Path, fresh_postgres: str
) -> None:
    a = server(tmp_path, "a", fresh_postgres, store="disk")
    b = server(tmp_path, "b", fresh_postgres, store="disk")
    a.start()
    try:
        async with channel(a) as sa:
            model = (
                await sa.CreateModel(rpc.CreateModelRequest(parent="projects/nd2", model_id="m"))
            ).name
            first = await wait(sa, await start_build(sa, model, {"model.py": V1}), 120)
            assert not first.HasField("error"), first.error
    finally:
        a.kill()
    b.start()
    try:
        async with channel(b) as sb:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await sb.CreateDeployment(
                    rpc.CreateDeploymentRequest(
                        parent=model, build=first.target, resources=resources(1)
                    )
                )
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_info(e.value)[0] == "IMAGE_COLLECTED"
    finally:
        b.kill()


async def test_a_build_running_on_one_server_is_followed_live_through_another(
    tmp_path: Path, fresh_postgres: str
) -> None:
    a = server(tmp_path, "a", fresh_postgres)
    gate = tmp_path / "gate"  # A's build stays at its import check until B saw it there
    b_temp = tmp_path / "b-temp"
    b_temp.mkdir()  # B runs as on a machine of its own: A's disk hidden from it
    b = server(tmp_path, "b", fresh_postgres, prefix=sharing_no_disk(tmp_path / "a", str(b_temp)))
    a.start()
    try:
        async with channel(a) as sa:
            model = (
                await sa.CreateModel(rpc.CreateModelRequest(parent="projects/nd3", model_id="m"))
            ).name
            op = await start_build(sa, model, {"model.py": gated(gate, V1)})
            build_name = str(op.target)

            async def building() -> bool:
                got = await sa.GetBuild(rpc.GetBuildRequest(name=build_name))
                assert got.state == pb.BUILD_STATE_BUILDING, pb.BuildState.Name(got.state)
                return True

            await eventually("the build runs on A", building, 30, 0.1)
            await asyncio.to_thread(b.start)  # after A took the job: A runs the build
            async with channel(b) as sb:
                lines = []
                while_building = []
                # Fails loudly (TimeoutError) if B never shows the line the gate waits on.
                async with asyncio.timeout(60):
                    async for line in sb.StreamBuildLogs(
                        rpc.StreamBuildLogsRequest(name=build_name, follow=True)
                    ):
                        lines.append(line)
                        got = await sb.GetBuild(rpc.GetBuildRequest(name=build_name))
                        if got.state == pb.BUILD_STATE_BUILDING:
                            while_building.append(line.text)
                        if "step 3/4" in line.text:
                            gate.touch()  # seen through B while A builds: the build goes on
            done = await wait(sa, op, 60)
            assert not done.HasField("error"), done.error
            on_a = [
                line
                async for line in sa.StreamBuildLogs(rpc.StreamBuildLogsRequest(name=build_name))
            ]
            assert b.popen is not None and seen_by(b.popen.pid, tmp_path / "a") == []
    finally:
        gate.touch()
        a.kill()
        b.kill()
    assert any("step 3/4" in text for text in while_building), (
        "B streamed A's lines while A still built",
        while_building,
    )
    assert [(x.number, x.text) for x in lines] == [(x.number, x.text) for x in on_a]
    assert "build succeeded" in lines[-1].text, [x.text for x in lines[-3:]]
