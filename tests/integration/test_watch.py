"""Watching over real gRPC: WatchModels for a project, filters, resume with no gap and no
repeat, BOOKMARKs for idle watchers, slow watchers cut off, expired revisions, many
watchers at once. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.domain.errors import ResourceExhausted
from controlplane.domain.states import EventType
from controlplane.domain.types import Event
from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import (
    Stub,
    build,
    error_info,
    fake_settings,
    resources,
    running,
)


@pytest.fixture
async def wserver(database_url: str, tmp_path: Path) -> AsyncIterator[Server]:
    settings = fake_settings(
        database_url, tmp_path, watch_bookmark_s=0.3, watch_queue_size=20, grace_s=0.5
    )
    async with running(settings) as srv:
        yield srv


@pytest.fixture
async def wstub(wserver: Server) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(wserver.grpc_address) as channel:
        yield Stub(channel)


class Follower:
    """Reads a stream in the background; ``until`` waits for a condition on what came."""

    def __init__(self, stream: grpc.aio.UnaryStreamCall[Any, pb.ModelEvent]) -> None:
        self.stream = stream
        self.events: list[pb.ModelEvent] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self.stream:
                self.events.append(event)
        except asyncio.CancelledError:
            return  # stop() cancelled the call
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = e

    async def until(self, what: str, ok: Callable[..., bool], seconds: float = 10) -> None:
        def check() -> bool:
            assert ok(), f"the events so far: {self.summary()}"
            return True

        await eventually(what, check, seconds, interval=0.02)

    def stop(self) -> None:
        self.stream.cancel()

    def changes(self) -> list[pb.ModelEvent]:
        return [e for e in self.events if e.type != pb.EVENT_TYPE_BOOKMARK]

    def summary(self) -> list[tuple[int, str, str]]:
        return [
            (e.revision, pb.EventType.Name(e.type), e.WhichOneof("resource") or "")
            for e in self.events
        ]


def deployed(f: Follower, model: str) -> bool:
    return any(
        e.HasField("model") and e.model.name == model and e.model.state == pb.MODEL_STATE_DEPLOYED
        for e in f.events
    )


def subject(e: pb.ModelEvent) -> str:
    kind = e.WhichOneof("resource")
    assert kind is not None
    name: str = getattr(e, kind).name
    return name


async def test_watch_models_follows_every_model_of_the_project(wstub: Stub, project: str) -> None:
    stub = wstub
    a = await stub.CreateModel(rpc.CreateModelRequest(parent=project, model_id="a"))
    other = await stub.CreateModel(rpc.CreateModelRequest(parent=project + "x", model_id="a"))
    everything = Follower(stub.WatchModels(rpc.WatchModelsRequest(parent=project)))
    only_models = Follower(
        stub.WatchModels(rpc.WatchModelsRequest(parent=project, filter="kind=model model=b"))
    )
    await everything.until("the snapshot", lambda: len(everything.events) >= 2)
    first = everything.events
    assert first[0].type == pb.EVENT_TYPE_CURRENT and first[0].model.name == a.name
    assert first[1].type == pb.EVENT_TYPE_BOOKMARK and first[1].revision >= first[0].revision

    b = await stub.CreateModel(rpc.CreateModelRequest(parent=project, model_id="b"))
    deploy = rpc.DeployOptions(resources=resources(1))
    assert not (await build(stub, a.name, deploy=deploy)).HasField("error")
    assert not (await build(stub, b.name, deploy=deploy)).HasField("error")
    assert not (await build(stub, other.name, deploy=deploy)).HasField("error")
    await everything.until("both deployed", lambda: deployed(everything, b.name))
    await only_models.until("b deployed", lambda: deployed(only_models, b.name))
    everything.stop()
    only_models.stop()

    changes = everything.changes()
    revisions = [e.revision for e in changes]
    assert revisions == sorted(set(revisions)), "out of order or repeated"
    names = {subject(e) for e in changes}
    assert a.name in names and b.name in names
    assert not any(n.startswith(other.name) for n in names), "another project's event"
    kinds = {e.WhichOneof("resource") for e in changes}
    assert kinds == {"model", "build", "deployment", "operation"}
    # The filter: model events of b only (and BOOKMARKs).
    assert only_models.changes(), "nothing passed the filter"
    assert all(e.model.name == b.name for e in only_models.changes())


async def test_bad_filters_and_parents_are_invalid_argument(wstub: Stub, project: str) -> None:
    cases = {
        "kind=image": "filter",
        "model=Bad_Id": "filter",
        "owner=me": "filter",
        "kind": "filter",
    }
    for text, field in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in wstub.WatchModels(rpc.WatchModelsRequest(parent=project, filter=text)):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, text
        assert error_info(err.value)[2] == [field], text
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in wstub.WatchModels(rpc.WatchModelsRequest(parent="projects/Bad")):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_resume_after_a_disconnect_has_no_gap_and_no_repeat(
    wstub: Stub, project: str
) -> None:
    stub = wstub
    model = await stub.CreateModel(rpc.CreateModelRequest(parent=project, model_id="m"))
    reference = Follower(stub.WatchModels(rpc.WatchModelsRequest(parent=project)))
    first = Follower(stub.WatchModels(rpc.WatchModelsRequest(parent=project)))
    await first.until("the snapshot", lambda: len(first.events) >= 2)
    deploy = rpc.DeployOptions(resources=resources(2))
    changing = asyncio.create_task(build(stub, model.name, deploy=deploy))
    # Disconnect in the middle of the changes, then resume from the last revision seen.
    await first.until("some changes", lambda: len(first.changes()) >= 3)
    first.stop()
    await first.task
    last = first.events[-1].revision
    resumed = Follower(
        stub.WatchModels(rpc.WatchModelsRequest(parent=project, since_revision=last))
    )
    assert not (await changing).HasField("error")
    await reference.until("deployed", lambda: deployed(reference, model.name))
    await resumed.until("deployed", lambda: deployed(resumed, model.name))
    resumed.stop()
    reference.stop()
    # Compare up to the model's DEPLOYED event, which every stream waited for.
    end = min(
        e.revision
        for e in reference.events
        if e.HasField("model") and e.model.state == pb.MODEL_STATE_DEPLOYED
    )
    seen = [e.revision for e in first.changes() + resumed.changes() if e.revision <= end]
    want = [e.revision for e in reference.changes() if e.revision <= end]
    assert seen == want, (seen, want)
    assert len(seen) == len(set(seen)), "an event came twice"
    assert resumed.events[0].type != pb.EVENT_TYPE_CURRENT, "a resume sends no snapshot"


async def test_an_idle_watcher_gets_bookmarks_with_the_latest_revision(
    wstub: Stub, project: str
) -> None:
    stub = wstub
    quiet = await stub.CreateModel(rpc.CreateModelRequest(parent=project, model_id="quiet"))
    busy = await stub.CreateModel(rpc.CreateModelRequest(parent=project, model_id="busy"))
    idle = Follower(stub.WatchModel(rpc.WatchModelRequest(name=quiet.name)))
    await idle.until("the snapshot", lambda: len(idle.events) >= 2)
    # Changes of another model move the revision on; the idle watcher's bookmarks follow.
    assert not (await build(stub, busy.name)).HasField("error")
    latest = max(e.revision for e in idle.events)

    def bookmarked_past() -> bool:
        marks = [e for e in idle.events if e.type == pb.EVENT_TYPE_BOOKMARK]
        return len(marks) >= 2 and marks[-1].revision > latest

    await idle.until("a bookmark past the other model's changes", bookmarked_past)
    idle.stop()
    assert not idle.changes()[1:], "the quiet model did not change"


async def test_a_slow_watcher_is_cut_off_and_never_slows_the_others(
    wserver: Server, wstub: Stub, project: str
) -> None:
    hub = wserver.hub
    assert hub is not None
    model = await wstub.CreateModel(rpc.CreateModelRequest(parent=project, model_id="m"))
    fast = Follower(wstub.WatchModel(rpc.WatchModelRequest(name=model.name)))
    got: list[Event] = []
    stuck = asyncio.Event()

    async def send(event: Event) -> None:
        got.append(event)
        if event.type is EventType.BOOKMARK:  # the snapshot is sent: never drain again
            await stuck.wait()

    slow = asyncio.ensure_future(hub.watch(model.name, 0, send))
    try:
        await eventually(
            "the slow watcher's snapshot", lambda: bool(got) and got[-1].type is EventType.BOOKMARK
        )
        # Five builds (about 30 events) with a queue of 20 that the slow watcher never drains.
        for _ in range(5):
            assert not (await build(wstub, model.name)).HasField("error")
        await fast.until("every change", lambda: len(fast.changes()) >= 25)
        assert not slow.done(), "the slow watcher is still stuck in its send"
        stuck.set()
        with pytest.raises(ResourceExhausted) as cut:
            await asyncio.wait_for(slow, 10)
    finally:
        slow.cancel()
    assert cut.value.reason == "WATCHER_TOO_SLOW"
    assert cut.value.metadata["last_revision"] == str(got[-1].revision)
    fast.stop()


async def test_a_revision_older_than_retention_is_out_of_range(
    wserver: Server, wstub: Stub, project: str
) -> None:
    hub = wserver.hub
    assert hub is not None
    model = await wstub.CreateModel(rpc.CreateModelRequest(parent=project, model_id="m"))
    for i in range(3):
        await wstub.CreateModel(rpc.CreateModelRequest(parent=project, model_id=f"n{i}"))
    hub.retention_count, hub.retention_s = 0, 0.0
    await asyncio.to_thread(hub.prune)
    for request in (
        wstub.WatchModel(rpc.WatchModelRequest(name=model.name, since_revision=1)),
        wstub.WatchModels(rpc.WatchModelsRequest(parent=project, since_revision=1)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in request:
                pass
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error_info(err.value)[0] == "REVISION_EXPIRED"


@pytest.mark.slow
async def test_two_hundred_watchers_each_get_the_change(wstub: Stub, project: str) -> None:
    model = await wstub.CreateModel(rpc.CreateModelRequest(parent=project, model_id="m"))
    watchers = [
        Follower(wstub.WatchModel(rpc.WatchModelRequest(name=model.name))) for _ in range(200)
    ]
    for w in watchers:
        await w.until("the snapshot", lambda w=w: len(w.events) >= 2)
    op = await build(wstub, model.name, deploy=rpc.DeployOptions(resources=resources(1)))
    assert not op.HasField("error")
    for w in watchers:
        await w.until("deployed", lambda w=w: deployed(w, model.name))
    with contextlib.suppress(Exception):
        for w in watchers:
            w.stop()
    # Every watcher got the same events, in the same order, up to the model's DEPLOYED.
    done = min(
        e.revision
        for e in watchers[0].events
        if e.HasField("model") and e.model.state == pb.MODEL_STATE_DEPLOYED
    )
    first = [e.revision for e in watchers[0].changes() if e.revision <= done]
    assert len(first) > 5
    for w in watchers:
        assert [e.revision for e in w.changes() if e.revision <= done] == first
