"""Builds over real gRPC: provenance, the cache, live logs, one-line failures, GC."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest

from controlplane.gc import collect_once
from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers.api import (
    MODEL_V1,
    Stub,
    build,
    create_model,
    error_info,
    fake_settings,
    resources,
    running,
    start_build,
    upload,
    wait,
    zip_bytes,
)
from workers.fake_backend import FakeBackend
from workers.runtime import Runtime, current

# An import that takes a while (what is tested: its lines arrive while it runs).
SLOW_IMPORT = (
    "import sys, time\n"
    "print('loading weights', flush=True)\n"
    "time.sleep(1.5)\n"
    "print('weights loaded', flush=True)\n" + MODEL_V1
)


async def log_lines(stub: Stub, build_name: str, follow: bool = False) -> list[rpc.BuildLogLine]:
    req = rpc.StreamBuildLogsRequest(name=build_name, follow=follow)
    return [line async for line in stub.StreamBuildLogs(req)]


async def get_build(stub: Stub, name: str) -> pb.Build:
    b: pb.Build = await stub.GetBuild(rpc.GetBuildRequest(name=name))
    return b


async def test_build_records_runtime_and_an_unchanged_rebuild_hits_the_cache(
    stub: Stub, project: str
) -> None:
    model = (await create_model(stub, project)).name
    first = await get_build(stub, (await build(stub, model)).target)
    rt = current()
    assert first.state == pb.BUILD_STATE_BUILT and not first.cache_hit
    assert (first.runtime.implementation, first.runtime.python_version) == (
        rt.implementation,
        rt.python_version,
    )
    assert first.runtime.platform == rt.platform and first.image_size_bytes > 0
    assert list(first.packages) == [], "no requirements: nothing installed"

    again = await get_build(stub, (await build(stub, model)).target)
    assert again.version == first.version + 1, "a new build version..."
    assert again.image == first.image, "...pointing at the same image"
    assert again.cache_hit and again.runtime == first.runtime
    text = "\n".join(line.text for line in await log_lines(stub, again.name))
    assert f"built by {first.name}" in text and "step 2/4" not in text

    op = await start_build(stub, model, {"model.py": MODEL_V1}, no_cache=True)
    forced = await get_build(stub, (await wait(stub, op)).target)
    assert not forced.cache_hit and forced.image == first.image, "same inputs, same digest"


@pytest.mark.slow
async def test_logs_stream_live_while_the_build_runs_and_replay_after(
    stub: Stub, project: str
) -> None:
    model = (await create_model(stub, project)).name
    op = await start_build(stub, model, {"model.py": SLOW_IMPORT})
    seen: list[tuple[str, int]] = []  # (text, build state when the line arrived)
    async for line in stub.StreamBuildLogs(rpc.StreamBuildLogsRequest(name=op.target, follow=True)):
        seen.append((line.text, (await get_build(stub, op.target)).state))
    texts = [text for text, _ in seen]
    loading = next(i for i, text in enumerate(texts) if text == "import | loading weights")
    assert seen[loading][1] == pb.BUILD_STATE_BUILDING, "the line came while still building"
    assert texts.index("import | weights loaded") > loading
    assert texts[-1].startswith("build succeeded in"), "the stream ends with the build"
    assert (await get_build(stub, op.target)).state == pb.BUILD_STATE_BUILT

    replay = await log_lines(stub, op.target)
    assert [line.text for line in replay] == texts
    assert [line.number for line in replay] == list(range(1, len(texts) + 1))
    assert all(line.HasField("time") for line in replay)


@pytest.mark.slow
async def test_logs_of_a_queued_build_wait_for_it(stub: Stub, project: str, server: Server) -> None:
    backend = server.backend
    assert isinstance(backend, FakeBackend)
    backend.builds_may_start.clear()  # the cluster has no free CPU yet
    model = (await create_model(stub, project)).name
    op = await start_build(stub, model, {"model.py": MODEL_V1})
    follower = asyncio.create_task(log_lines(stub, op.target, follow=True))
    # What is tested is that nothing happens: the follower must not end within a window
    # of several of the log's polls (it fails at once if it does).
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(follower), 0.5)
    assert not follower.done(), "following a build that has not started waits"
    backend.builds_may_start.set()
    lines = await asyncio.wait_for(follower, 30)
    assert lines[-1].text.startswith("build succeeded in")


@pytest.mark.parametrize(
    ("files", "function", "error"),
    [
        ({"model.py": MODEL_V1}, "classify", "function 'classify' not found in model.py"),
        (
            {"model.py": "def predict(body):\n    return (\n"},
            "predict",
            "SyntaxError in model.py line 2: '(' was never closed",
        ),
        (
            {"model.py": "import numpy_does_not_exist\n" + MODEL_V1},
            "predict",
            "ImportError in model.py: No module named 'numpy_does_not_exist'",
        ),
        (
            {"model.py": MODEL_V1, "requirements.txt": "--no-index\nno-such-package-cp==1.0\n"},
            "predict",
            "requirement failed: No matching distribution found for no-such-package-cp==1.0",
        ),
        (
            {"model.py": MODEL_V1, "requirements.lock": "numpy\n"},
            "predict",
            "requirements.lock line 1: 'numpy' is not pinned (name==version)",
        ),
    ],
    ids=["missing-function", "syntax-error", "import-error", "requirement", "loose-lock"],
)
async def test_each_failure_names_its_cause_in_one_line_and_keeps_the_log(
    stub: Stub, project: str, files: dict[str, str], function: str, error: str
) -> None:
    model = (await create_model(stub, project)).name
    op = await wait(stub, await start_build(stub, model, files, function))
    b = await get_build(stub, op.target)
    assert b.state == pb.BUILD_STATE_FAILED
    assert b.error == error
    assert op.error.message == f"build {b.version} failed: {error}"
    text = "\n".join(line.text for line in await log_lines(stub, b.name))
    assert "build FAILED after" in text and error in text
    if "requirement" in error and "lock" not in error:
        assert "pip | ERROR:" in text, "pip's own output stays in the log"
    if "ImportError" in error:
        assert "import | Traceback (most recent call last):" in text


async def test_build_logs_of_what_does_not_exist(stub: Stub, project: str) -> None:
    model = (await create_model(stub, project)).name
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await log_lines(stub, f"{model}/builds/9")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await log_lines(stub, "builds/9")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(e.value)[2] == ["name"]


@pytest.mark.slow
async def test_builds_of_different_models_run_at_once(stub: Stub, project: str) -> None:
    models = [(await create_model(stub, project, f"m{i}")).name for i in range(2)]
    ops = [await start_build(stub, m, {"model.py": SLOW_IMPORT}) for m in models]
    done = [await wait(stub, op) for op in ops]
    spans = []
    for op in done:
        lines = await log_lines(stub, op.target)
        spans.append((lines[0].time.ToDatetime(), lines[-1].time.ToDatetime()))
    (a_start, a_end), (b_start, b_end) = spans
    assert a_start < b_end and b_start < a_end, f"the two builds overlap in time: {spans}"


async def test_a_build_made_for_another_python_is_refused_at_deploy(
    database_url: str, tmp_path: Path
) -> None:
    settings = fake_settings(database_url, tmp_path)
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.grpc_address) as ch:
        stub = Stub(ch)
        model = (await create_model(stub, "projects/rt")).name
        built = (await build(stub, model)).target
    other = Runtime("cpython", "3.99.1", current().platform)
    backend = FakeBackend(num_gpus=2)
    backend.cluster_runtime = other  # the cluster was upgraded since the build
    srv = Server(settings, backend=backend)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(srv.grpc_address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await Stub(ch).CreateDeployment(
                    rpc.CreateDeploymentRequest(parent=model, build=built, resources=resources())
                )
    finally:
        await srv.stop()
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reason, metadata, _ = error_info(e.value)
    assert reason == "RUNTIME_MISMATCH"
    assert metadata["cluster_runtime"] == other.abi
    assert f"built for {current().describe()}" in (e.value.details() or "")


async def test_gc_keeps_deployed_and_newest_builds(fresh_db: str, tmp_path: Path) -> None:
    settings = fake_settings(fresh_db, tmp_path, gc_keep_builds=1, gc_min_age_s=0)
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.grpc_address) as ch:
        stub = Stub(ch)
        model = (await create_model(stub, "projects/gc")).name
        ops = [await build(stub, model, MODEL_V1 + f"# v{i}\n") for i in range(3)]
        builds = [await get_build(stub, op.target) for op in ops]
        deploy = rpc.CreateDeploymentRequest(parent=model, build=builds[0].name)
        assert not (await wait(stub, await stub.CreateDeployment(deploy))).HasField("error")

        never_built = await upload(stub, model, zip_bytes({"model.py": MODEL_V1 + "# v9\n"}))
        assert srv.collector is not None and srv.collector.sources is not None
        sources = srv.collector.sources
        done = await asyncio.to_thread(collect_once, srv.db, srv.settings, None, sources)
        assert done is not None
        digests = [b.image.removeprefix("artifact://sha256:") for b in builds]
        assert done.removed == [digests[1]], "neither deployed nor the newest: removed"
        remaining = {p.name for p in settings.artifacts_dir.iterdir() if p.name[0] != "."}
        assert remaining == {digests[0], digests[2]}
        # The uploads go with them: v1's and the one never built; v0's and v2's stay.
        assert done.sources_removed == 2
        uploads = {p.stem for p in settings.sources_dir.glob("*.zip")}
        assert uploads == {builds[0].source_sha256, builds[2].source_sha256}
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateBuild(
                rpc.CreateBuildRequest(
                    parent=model,
                    source_sha256=never_built.sha256,
                    file_path="model.py",
                    function_name="predict",
                )
            )
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(e.value)[0] == "SOURCE_COLLECTED"

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateDeployment(
                rpc.CreateDeploymentRequest(parent=model, build=builds[1].name)
            )
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(e.value)[0] == "IMAGE_COLLECTED"

        rebuilt = await get_build(stub, (await build(stub, model, MODEL_V1 + "# v1\n")).target)
        assert rebuilt.image == builds[1].image and not rebuilt.cache_hit, "built again"

        again = await asyncio.to_thread(collect_once, srv.db, srv.settings)
        assert again is not None
        assert again.removed == [digests[2]], "v1 is the newest now; v2 is neither"


async def test_gc_spares_what_was_used_recently(fresh_db: str, tmp_path: Path) -> None:
    settings = fake_settings(fresh_db, tmp_path, gc_keep_builds=1)  # min age: an hour
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.grpc_address) as ch:
        stub = Stub(ch)
        model = (await create_model(stub, "projects/gc")).name
        for i in range(2):
            await build(stub, model, MODEL_V1 + f"# v{i}\n")
        done = await asyncio.to_thread(collect_once, srv.db, srv.settings)
        assert done is not None and done.removed == [] and done.kept == 2
        older = dataclasses.replace(srv.settings, gc_min_age_s=0)
        done = await asyncio.to_thread(collect_once, srv.db, older)
        assert done is not None and len(done.removed) == 1
