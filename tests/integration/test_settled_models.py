"""A settled model is not looked at again while nothing about it changes: the
reconciler's cost while idle does not grow with the number of models (bench/models.py).
A change to it, or to what Serve runs for it, is looked at as before."""

from __future__ import annotations

import pytest

from controlplane.domain.decisions import Observation
from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import Stub, build, create_model, reconciler_passes, resources, wait


async def test_a_settled_model_is_left_alone_until_it_changes(
    stub: Stub, project: str, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    reconciler = server.reconciler
    assert reconciler is not None
    models = []
    for i in range(3):
        m = await create_model(stub, project, f"m{i}")
        op = await build(stub, m.name, deploy=rpc.DeployOptions(resources=resources(1)))
        assert not op.HasField("error"), op
        models.append(m.name)

    # Looks at this test's models only (on PostgreSQL the database holds other tests'
    # models too, which the reconciler watches as well).
    looked: list[str] = []
    real = reconciler.reconcile

    def counting(
        model_name: str, obs: Observation | None, second: Observation | None = None
    ) -> None:
        looked.append(model_name)
        real(model_name, obs, second)

    monkeypatch.setattr(reconciler, "reconcile", counting)

    def ours() -> int:
        return sum(1 for name in looked if name in models)

    # Once the deploys' last writes settle (longer on a loaded machine), a run of passes
    # looks at none of them; with every settled model looked at, it never comes.
    async def quiet() -> bool:
        before = ours()
        await reconciler_passes(server, monkeypatch, 5)
        assert ours() == before, "a settled, unchanged model was looked at"
        return True

    await eventually("five passes that look at no settled model", quiet, 60, interval=0)
    looks = ours()

    op = await stub.CreateDeployment(
        rpc.CreateDeploymentRequest(
            parent=models[1], build=f"{models[1]}/builds/1", resources=resources(2)
        )
    )
    assert not (await wait(stub, op)).HasField("error")
    assert ours() > looks, "the change was followed"
    model = await stub.GetModel(rpc.GetModelRequest(name=models[1]))
    assert model.state == pb.MODEL_STATE_DEPLOYED
    deployment = await stub.GetDeployment(rpc.GetDeploymentRequest(name=model.active_deployment))

    async def two_running() -> bool:
        d = await stub.GetDeployment(rpc.GetDeploymentRequest(name=model.active_deployment))
        assert len(d.replicas) == 2, d.replicas
        return True

    await eventually("two replicas recorded", two_running)
    assert deployment.resources.replicas == 2
