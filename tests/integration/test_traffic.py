"""Two builds live, through gRPC on the fake backend, on SQLite and PostgreSQL records:
canary steps judged on the new build's figures (made-up replica reports put into the
fake's collector), a bad build rolled back naming its gate, abort, promote now, a shadow,
SetTraffic in place, restart and stop of both builds, and bad input.
(tests/ray/test_traffic_ray.py sends real requests through real Serve replicas.)"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import (
    MODEL_V1,
    MODEL_V2,
    Stub,
    build,
    create_model,
    error_info,
    fake_settings,
    resources,
    wait,
)
from tests.integration.test_signals import figures
from workers.backend import TrafficShare, app_name_for, candidate_app_for
from workers.fake_backend import FakeBackend
from workers.signals import Report, latency_bucket

RS = pb.RolloutStatus


class Two:
    """A DEPLOYED model serving build 1, with build 2 built beside it."""

    def __init__(self, server: Server, stub: Stub, model: str) -> None:
        self.server = server
        self.stub = stub
        self.model = model
        project, model_id = model.split("/")[1], model.rsplit("/", 1)[-1]
        self.main = app_name_for(project, model_id)
        self.second = candidate_app_for(project, model_id)
        self.b1 = f"{model}/builds/1"
        self.b2 = f"{model}/builds/2"
        assert isinstance(server.backend, FakeBackend)
        self.fake: FakeBackend = server.backend
        self.started = time.time()  # the replicas started after the server: all counted
        self.sent = {self.b1: 0, self.b2: 0}
        self.failed = {self.b1: 0, self.b2: 0}

    def share(self) -> TrafficShare:
        """What the model's application's replicas are told to send the other build."""
        share = self.fake.apps[self.main].spec.share
        assert share is not None, "no share sent"
        return share

    def sent_percent(self, percent: int) -> bool:
        app = self.fake.apps.get(self.main)
        return app is not None and app.spec.share is not None and app.spec.share.percent == percent

    async def get(self) -> pb.Model:
        m: pb.Model = await self.stub.GetModel(rpc.GetModelRequest(name=self.model))
        return m

    async def op(self, name: str) -> pb.Operation:
        o: pb.Operation = await self.stub.GetOperation(rpc.GetOperationRequest(name=name))
        return o

    def answer(self, build: str, requests: int, errors: int = 0, ms: float = 4) -> None:
        """The build's replica reports ``requests`` more, ``errors`` of them failed."""
        self.sent[build] += requests
        self.failed[build] += errors
        self.fake.report(
            Report(
                figures(
                    self.main,
                    build,
                    f"replica-of-{build[-1]}",
                    requests=self.sent[build],
                    model_errors=self.failed[build],
                    latency=((latency_bucket(ms), self.sent[build]),),
                    start_time=self.started,
                ),
                (),
            )
        )

    async def canary(self, **kw: object) -> pb.Operation:
        op: pb.Operation = await self.stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=self.model,
                build=self.b2,
                rollout=pb.RolloutStrategy(canary=pb.CanaryRollout(**kw)),  # type: ignore[arg-type]
            )
        )
        return op

    async def phase(self, op: pb.Operation, phase: int, step: int = 1) -> pb.Operation:
        async def there() -> pb.Operation:
            got = await self.op(op.name)
            assert (got.rollout.phase, got.rollout.step) == (phase, step), got
            return got

        return await eventually(f"phase {phase} step {step}", there)


@pytest.fixture
async def two(database_url: str, tmp_path: Path, project: str) -> AsyncIterator[Two]:
    settings = fake_settings(
        database_url, tmp_path, signals_interval_s=0.05, rollout_interval_s=0.05
    )
    server = Server(settings, backend=FakeBackend(num_gpus=2))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = Stub(channel)
            model = await create_model(stub, project)
            op = await build(
                stub, model.name, MODEL_V1, deploy=rpc.DeployOptions(resources=resources(2))
            )
            assert not op.HasField("error"), op.error
            op = await build(stub, model.name, MODEL_V2, function="classify")
            assert not op.HasField("error"), op.error
            yield Two(server, stub, model.name)
    finally:
        await server.stop()


GATES = pb.RolloutGates(max_error_rate=0.05, max_p99_ms=100, min_requests=10)


async def test_a_canary_steps_through_its_shares_and_promotes(two: Two) -> None:
    op = await two.canary(steps=[10, 50], bake_seconds=0.3, gates=GATES)
    assert op.rollout.phase == RS.PHASE_STARTING and not op.done
    m = await two.get()
    assert m.state == pb.MODEL_STATE_DEPLOYING
    assert m.traffic.candidate.build == two.b2 and m.traffic.stable.build == two.b1
    # The candidate's own application: no route of its own, reached from the model's.
    second = await eventually("the candidate's app", lambda: two.fake.apps.get(two.second))
    assert second is not None
    assert second.spec.route_prefix is None and second.spec.build_name == two.b2
    assert second.spec.signals_app == two.main
    main_ids = {r.id for r in two.fake.apps[two.main].replicas}

    await two.phase(op, RS.PHASE_BAKING, 1)
    # No share while its replicas start; the first step's once they run.
    await eventually("its share sent", lambda: two.sent_percent(10))
    share = two.share()
    assert (share.from_build, share.to_app) == (two.b1, two.second)
    # Until the new build answered min_requests, the step waits (the bake is long over).
    two.answer(two.b2, 5)

    async def short_of_requests() -> bool:
        got = await two.op(op.name)
        assert got.rollout.step == 1 and got.rollout.candidate.requests == 5, got.rollout
        return "waiting for 5 more requests" in got.progress

    await eventually("the step waits for 5 more requests", short_of_requests)
    two.answer(two.b2, 7)
    two.answer(two.b1, 100)
    at_50 = await two.phase(op, RS.PHASE_BAKING, 2)
    assert at_50.rollout.percent == 50
    assert (await two.get()).traffic.candidate.percent == 50
    await eventually("50% sent", lambda: two.sent_percent(50))
    # Shares change in place: the model's replicas are the same ones.
    assert {r.id for r in two.fake.apps[two.main].replicas} == main_ids
    two.answer(two.b2, 30)
    done = await wait(two.stub, op)
    assert not done.HasField("error"), done.error
    m = await two.get()
    assert m.state == pb.MODEL_STATE_DEPLOYED and not m.HasField("traffic")
    dep = await two.stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    assert dep.build == two.b2 and dep.state == pb.DEPLOYMENT_STATE_DEPLOYED
    await eventually("the candidate's app gone", lambda: two.second not in two.fake.apps)
    assert two.fake.apps[two.main].spec.build_name == two.b2
    assert two.fake.apps[two.main].spec.share is None


async def test_a_bad_canary_is_rolled_back_naming_its_gate(two: Two) -> None:
    op = await two.canary(steps=[10, 100], bake_seconds=60, gates=GATES)
    await two.phase(op, RS.PHASE_BAKING, 1)
    stable = (await two.get()).traffic.stable.deployment
    two.answer(two.b2, 30, errors=10)
    done = await wait(two.stub, op)
    assert done.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "gate max_error_rate failed" in done.error.message
    assert "33.3% (10 of 30 requests)" in done.error.message
    assert "threshold 5%" in done.error.message and "step 1/2 (10%)" in done.error.message
    m = await two.get()
    assert m.state == pb.MODEL_STATE_DEPLOYED and m.active_deployment == stable
    assert not m.HasField("traffic") and "rolled back" in m.message
    candidate = await two.stub.GetDeployment(rpc.GetDeploymentRequest(name=op.deployment))
    assert candidate.state == pb.DEPLOYMENT_STATE_FAILED
    await eventually("the candidate's app gone", lambda: two.second not in two.fake.apps)
    assert two.fake.apps[two.main].spec.share is None
    assert two.fake.apps[two.main].spec.build_name == two.b1


async def test_cancel_aborts_and_promote_now_takes_over(two: Two) -> None:
    op = await two.canary(steps=[10, 50, 100], bake_seconds=600, gates=GATES)
    await two.phase(op, RS.PHASE_BAKING, 1)
    cancelled = await two.stub.CancelOperation(rpc.CancelOperationRequest(name=op.name))
    assert cancelled.done and cancelled.error.code == grpc.StatusCode.CANCELLED.value[0]
    m = await two.get()
    assert m.state == pb.MODEL_STATE_DEPLOYED and not m.HasField("traffic")
    await eventually("the candidate's app gone", lambda: two.second not in two.fake.apps)

    op = await two.canary(steps=[10, 50, 100], bake_seconds=600, gates=GATES)
    await two.phase(op, RS.PHASE_BAKING, 1)
    promoted = await two.stub.PromoteRollout(rpc.PromoteRolloutRequest(name=op.name))
    assert promoted.rollout.phase == RS.PHASE_PROMOTING
    done = await wait(two.stub, op)
    assert not done.HasField("error"), done.error
    m = await two.get()
    dep = await two.stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    assert dep.build == two.b2 and not m.HasField("traffic")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await two.stub.PromoteRollout(rpc.PromoteRolloutRequest(name=op.name))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(e.value)[0] == "NOT_PROMOTABLE"


async def test_a_shadow_gets_a_copy_then_takes_over(two: Two) -> None:
    op = await two.stub.CreateDeployment(
        rpc.CreateDeploymentRequest(
            parent=two.model,
            build=two.b2,
            rollout=pb.RolloutStrategy(
                shadow=pb.ShadowRollout(percent=30, duration_seconds=0.2, gates=GATES)
            ),
        )
    )
    await two.phase(op, RS.PHASE_BAKING, 1)
    await eventually("a copy sent", lambda: two.sent_percent(30))
    assert two.share().shadow
    assert (await two.get()).traffic.shadow
    two.answer(two.b1, 40, ms=4)
    two.answer(two.b2, 12, ms=4)
    done = await wait(two.stub, op)
    assert not done.HasField("error"), done.error
    assert two.fake.apps[two.main].spec.build_name == two.b2


async def test_set_traffic_splits_in_place_then_ends(two: Two) -> None:
    async def set_traffic(weights: dict[str, int], header: str = "") -> pb.Operation:
        op = await two.stub.SetTraffic(
            rpc.SetTrafficRequest(
                name=two.model,
                weights=[rpc.TrafficWeight(build=b, percent=p) for b, p in weights.items()],
                sticky_header=header,
            )
        )
        return await wait(two.stub, op)

    done = await set_traffic({two.b1: 90, two.b2: 10}, "X-User")
    assert not done.HasField("error") and done.kind == pb.OPERATION_KIND_SET_TRAFFIC
    m = await two.get()
    assert m.state == pb.MODEL_STATE_DEPLOYED
    assert (m.traffic.stable.percent, m.traffic.candidate.percent) == (90, 10)
    assert m.traffic.sticky_header == "X-User"
    await eventually("10% sent", lambda: two.sent_percent(10))
    assert two.share().sticky_header == "X-User"
    main_ids = {r.id for r in two.fake.apps[two.main].replicas}
    second_ids = {r.id for r in two.fake.apps[two.second].replicas}

    await set_traffic({two.b1: 70, two.b2: 30}, "X-User")
    await eventually("30% sent", lambda: two.sent_percent(30))
    assert {r.id for r in two.fake.apps[two.main].replicas} == main_ids
    assert {r.id for r in two.fake.apps[two.second].replicas} == second_ids

    # Restart re-initializes both builds' replicas; the split stays.
    op = await two.stub.RestartModel(rpc.RestartModelRequest(name=two.model))
    op = await wait(two.stub, op)
    assert not op.HasField("error"), op.error
    assert not {r.id for r in two.fake.apps[two.main].replicas} & main_ids
    assert not {r.id for r in two.fake.apps[two.second].replicas} & second_ids
    assert (await two.get()).traffic.candidate.percent == 30

    # Stop stops both; a restart starts both again, with the same weights.
    op = await wait(two.stub, await two.stub.StopModel(rpc.StopModelRequest(name=two.model)))
    assert not op.HasField("error"), op.error
    assert two.main not in two.fake.apps and two.second not in two.fake.apps
    m = await two.get()
    assert m.state == pb.MODEL_STATE_STOPPED and m.traffic.candidate.percent == 30
    with pytest.raises(grpc.aio.AioRpcError) as e:  # weights change while it serves
        await set_traffic({two.b1: 50, two.b2: 50})
    assert error_info(e.value)[0] == "MODEL_NOT_SERVING"
    op = await two.stub.RestartModel(rpc.RestartModelRequest(name=two.model))
    op = await wait(two.stub, op)
    assert not op.HasField("error"), op.error
    assert {two.main, two.second} <= set(two.fake.apps)
    m = await two.get()
    assert m.state == pb.MODEL_STATE_DEPLOYED

    # A re-deploy replaces both: the new deployment serves alone.
    stable, candidate = m.traffic.stable.deployment, m.traffic.candidate.deployment
    op = await two.stub.CreateDeployment(
        rpc.CreateDeploymentRequest(parent=two.model, build=two.b1, resources=resources(3))
    )
    op = await wait(two.stub, op)
    assert not op.HasField("error"), op.error
    m = await two.get()
    assert not m.HasField("traffic") and m.active_deployment not in (stable, candidate)
    for name in (stable, candidate):
        d = await two.stub.GetDeployment(rpc.GetDeploymentRequest(name=name))
        assert d.state == pb.DEPLOYMENT_STATE_REPLACED
    await eventually("the second app gone", lambda: two.second not in two.fake.apps)
    assert len(two.fake.apps[two.main].replicas) == 3
    assert two.fake.apps[two.main].spec.share is None

    # Split again; one build at 100: the serving one keeps everything, the other goes.
    await set_traffic({two.b1: 60, two.b2: 40})
    await set_traffic({two.b1: 100})
    m = await two.get()
    assert not m.HasField("traffic") and m.state == pb.MODEL_STATE_DEPLOYED
    await eventually("the second app gone", lambda: two.second not in two.fake.apps)

    # Split again, then the other build takes everything (promoted).
    await set_traffic({two.b1: 50, two.b2: 50})
    done = await set_traffic({two.b2: 100})
    assert not done.HasField("error"), done.error
    m = await two.get()
    dep = await two.stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    assert dep.build == two.b2 and not m.HasField("traffic")
    await eventually("the second app gone", lambda: two.second not in two.fake.apps)


@pytest.mark.parametrize(
    ("strategy", "field"),
    [
        (pb.RolloutStrategy(canary=pb.CanaryRollout(steps=[])), "rollout.canary.steps"),
        (pb.RolloutStrategy(canary=pb.CanaryRollout(steps=[50, 10])), "rollout.canary.steps"),
        (pb.RolloutStrategy(canary=pb.CanaryRollout(steps=[10, 120])), "rollout.canary.steps"),
        (
            pb.RolloutStrategy(canary=pb.CanaryRollout(steps=[10], bake_seconds=-1)),
            "rollout.canary.bake",
        ),
        (
            pb.RolloutStrategy(
                canary=pb.CanaryRollout(steps=[10], gates=pb.RolloutGates(max_error_rate=2))
            ),
            "rollout.canary.gates.max_error_rate",
        ),
        (pb.RolloutStrategy(shadow=pb.ShadowRollout(percent=0)), "rollout.shadow.percent"),
    ],
)
async def test_a_bad_rollout_is_refused_and_changes_nothing(
    two: Two, strategy: pb.RolloutStrategy, field: str
) -> None:
    before = await two.get()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await two.stub.CreateDeployment(
            rpc.CreateDeploymentRequest(parent=two.model, build=two.b2, rollout=strategy)
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (e.value.details() or "")
    assert (await two.get()).etag == before.etag


async def test_splits_that_cannot_be_are_refused(two: Two) -> None:
    async def refused(call: object, code: grpc.StatusCode) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call  # type: ignore[misc]
        assert e.value.code() == code, e.value.details()
        return error_info(e.value)[0]

    same = two.stub.CreateDeployment(
        rpc.CreateDeploymentRequest(
            parent=two.model,
            build=two.b1,
            rollout=pb.RolloutStrategy(canary=pb.CanaryRollout(steps=[10])),
        )
    )
    assert await refused(same, grpc.StatusCode.FAILED_PRECONDITION) == "SAME_BUILD"
    for weights in ({two.b1: 90, two.b2: 20}, {two.b1: 50}, {f"{two.b1[:-1]}7": 100}):
        bad = two.stub.SetTraffic(
            rpc.SetTrafficRequest(
                name=two.model,
                weights=[rpc.TrafficWeight(build=b, percent=p) for b, p in weights.items()],
            )
        )
        code = (
            grpc.StatusCode.NOT_FOUND
            if weights == {f"{two.b1[:-1]}7": 100}
            else grpc.StatusCode.INVALID_ARGUMENT
        )
        if code is grpc.StatusCode.NOT_FOUND:
            code = grpc.StatusCode.FAILED_PRECONDITION  # one build alone is not a split
        await refused(bad, code)
    header = two.stub.SetTraffic(
        rpc.SetTrafficRequest(
            name=two.model,
            weights=[
                rpc.TrafficWeight(build=two.b1, percent=50),
                rpc.TrafficWeight(build=two.b2, percent=50),
            ],
            sticky_header="not a header",
        )
    )
    await refused(header, grpc.StatusCode.INVALID_ARGUMENT)
    op = await two.canary(steps=[10], bake_seconds=600, gates=GATES)
    busy = two.stub.SetTraffic(
        rpc.SetTrafficRequest(
            name=two.model,
            weights=[rpc.TrafficWeight(build=two.b1, percent=100)],
        )
    )
    assert await refused(busy, grpc.StatusCode.ABORTED) == "OPERATION_IN_PROGRESS"
    stop = two.stub.StopModel(rpc.StopModelRequest(name=two.model))
    assert await refused(stop, grpc.StatusCode.ABORTED) == "OPERATION_IN_PROGRESS"
    await two.stub.CancelOperation(rpc.CancelOperationRequest(name=op.name))
