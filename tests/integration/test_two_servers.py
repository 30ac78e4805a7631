"""Two `modelctl serve` processes on one PostgreSQL and one (shared) cluster.

Jobs are claimed with SELECT ... FOR UPDATE SKIP LOCKED and leased: none runs
twice, and when one server dies the other takes its work over once the lease
runs out. Watchers on either server see every event, woken by LISTEN/NOTIFY.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, text

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import resources, start_build, upload, wait, zip_bytes
from tests.helpers.servers import Cluster, channel

MODEL = "def predict(body):\n    return body\n"
LEASE_S = 2.0


@pytest.fixture
async def pair(tmp_path: Path, fresh_postgres: str) -> AsyncIterator[tuple[Cluster, Cluster]]:
    # One data dir (sources and artifacts are shared, as on a shared volume), one database.
    data = tmp_path / "data"
    a = Cluster(data, fresh_postgres, server_id="server-a", job_lease_s=LEASE_S)
    b = Cluster(data, fresh_postgres, server_id="server-b", job_lease_s=LEASE_S)
    a.start()
    b.start()
    yield a, b
    a.kill()
    b.kill()


def job_attempts(url: str, models: list[str]) -> list[tuple[str, str, int]]:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            rows = c.execute(
                text("SELECT kind, state, attempts FROM jobs WHERE model = ANY(:models)"),
                {"models": models},
            ).all()
            return [(str(k), str(s), int(n)) for k, s, n in rows]
    finally:
        engine.dispose()


async def test_jobs_spread_over_two_servers_run_once_and_watchers_see_all(
    pair: tuple[Cluster, Cluster],
) -> None:
    a, b = pair
    project = "projects/pair"
    async with channel(a) as sa, channel(b) as sb:
        # A watcher on B follows a model changed only through A.
        first = await sa.CreateModel(rpc.CreateModelRequest(parent=project, model_id="m0"))
        seen: list[pb.ModelEvent] = []

        async def follow() -> None:
            async for event in sb.WatchModel(rpc.WatchModelRequest(name=first.name)):
                seen.append(event)

        watcher = asyncio.create_task(follow())
        await eventually("B's watch open (its snapshot)", lambda: seen)
        # Six models built and deployed at once, half through each server.
        names = [first.name]
        for i in range(1, 6):
            stub = sa if i % 2 else sb
            m = await stub.CreateModel(rpc.CreateModelRequest(parent=project, model_id=f"m{i}"))
            names.append(m.name)
        ops = []
        for i, name in enumerate(names):
            stub = sa if i % 2 else sb
            deploy = rpc.DeployOptions(resources=resources(2))
            ops.append(await start_build(stub, name, {"model.py": MODEL}, deploy=deploy))
        done = [await wait(sb if i % 2 else sa, op, 60) for i, op in enumerate(ops)]
        assert all(not op.HasField("error") for op in done), [op.error for op in done]
        for name in names:
            m = await sb.GetModel(rpc.GetModelRequest(name=name))
            assert m.state == pb.MODEL_STATE_DEPLOYED
        apps = a.running_apps()
        assert sorted(apps) == sorted(f"pair.m{i}" for i in range(6))

        # Every job ran exactly once (no server lost one, none ran one twice).
        jobs = job_attempts(a.db_url, names)
        assert len(jobs) == 12 and {(s, n) for _, s, n in jobs} == {("done", 1)}, jobs

        # B's watcher got first's whole story, woken by A's commits.
        await eventually(
            "B's watcher sees the model DEPLOYED",
            lambda: any(
                e.HasField("model") and e.model.state == pb.MODEL_STATE_DEPLOYED for e in seen
            ),
        )
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        states = [pb.ModelState.Name(e.model.state) for e in seen if e.HasField("model")]
        assert states[0] == "MODEL_STATE_NOT_DEPLOYED"
        assert "MODEL_STATE_DEPLOYING" in states and states[-1] == "MODEL_STATE_DEPLOYED"
        revisions = [e.revision for e in seen if e.type != pb.EVENT_TYPE_BOOKMARK]
        assert revisions == sorted(set(revisions))


async def test_the_other_server_finishes_the_work_of_one_that_dies(
    pair: tuple[Cluster, Cluster],
) -> None:
    a, b = pair
    async with channel(a) as sa:
        model = await sa.CreateModel(rpc.CreateModelRequest(parent="projects/die", model_id="m"))
        src = await upload(sa, model.name, zip_bytes({"model.py": MODEL}))
    # B claims nothing for a while: A takes the job, and dies in the middle of the build.
    b.kill()
    a.arm("build.started")
    async with channel(a) as sa:
        op = await sa.CreateBuild(
            rpc.CreateBuildRequest(
                parent=model.name,
                source_sha256=src.sha256,
                file_path="model.py",
                function_name="predict",
                deploy=rpc.DeployOptions(resources=resources(2)),
            )
        )
    assert await a.died() == -9
    b.start()  # B (another server id) takes the job over once A's lease runs out
    async with channel(b) as sb:
        op = await wait(sb, op, 60)
        assert not op.HasField("error"), op.error
        m = await sb.GetModel(rpc.GetModelRequest(name=model.name))
        assert m.state == pb.MODEL_STATE_DEPLOYED
        builds = await sb.ListBuilds(rpc.ListBuildsRequest(parent=model.name))
        assert len(builds.builds) == 1 and builds.builds[0].state == pb.BUILD_STATE_BUILT
    jobs = job_attempts(a.db_url, [model.name])
    # The build job ran twice (A died in it), the apply once; nothing is left.
    assert sorted((k, s, n) for k, s, n in jobs) == [("apply", "done", 1), ("build", "done", 2)]


async def test_a_token_revoked_on_one_server_ends_its_idle_watch_on_the_other_within_2s(
    tmp_path: Path, fresh_postgres: str
) -> None:
    data = tmp_path / "data"
    a = Cluster(data, fresh_postgres, server_id="server-a", auth=True)
    b = Cluster(data, fresh_postgres, server_id="server-b", auth=True)
    try:
        a.start()
        b.start()
        admin = (("authorization", f"Bearer {(data / 'admin.token').read_text().strip()}"),)
        async with channel(a) as sa, channel(b) as sb:
            made = await sa.CreateToken(
                rpc.CreateTokenRequest(parent="projects/w", role=pb.ROLE_VIEWER), metadata=admin
            )
            viewer = (("authorization", f"Bearer {made.secret}"),)
            watch = sb.WatchModels(rpc.WatchModelsRequest(parent="projects/w"), metadata=viewer)
            first = await asyncio.wait_for(watch.read(), 10)
            assert isinstance(first, pb.ModelEvent) and first.type == pb.EVENT_TYPE_BOOKMARK
            await sa.RevokeToken(rpc.RevokeTokenRequest(name=made.token.name), metadata=admin)

            async def ends_by_itself() -> None:
                while True:  # nothing changes meanwhile: bookmarks at most
                    event = await watch.read()
                    assert isinstance(event, pb.ModelEvent), event
                    assert event.type == pb.EVENT_TYPE_BOOKMARK, event

            with pytest.raises(grpc.aio.AioRpcError) as e:
                await asyncio.wait_for(ends_by_itself(), 2.0)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        a.kill()
        b.kill()


async def test_a_model_changed_on_one_server_is_read_at_once_on_the_other(
    pair: tuple[Cluster, Cluster],
) -> None:
    """GetModel on PostgreSQL answers from memory only while the head revision has not
    moved: what one server wrote, the other reads in the very next call, however many
    times it was read (and kept) before."""
    a, b = pair
    project = "projects/ryw"
    async with channel(a) as sa, channel(b) as sb:
        for i in range(5):
            made = await sa.CreateModel(rpc.CreateModelRequest(parent=project, model_id="m"))
            for _ in range(3):  # kept on B after the first
                got = await sb.GetModel(rpc.GetModelRequest(name=made.name))
                assert got.create_time == made.create_time, i  # this one, not an earlier one
            await sa.DeleteModel(rpc.DeleteModelRequest(name=made.name))
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await sb.GetModel(rpc.GetModelRequest(name=made.name))
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND, i
