"""What the Ray backend makes of Serve's details (no cluster): the dict the controller
returns, parsed into ``ServeInstanceDetails``, becomes one ``AppObservation`` per
application."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import pydantic
import pytest
from ray.serve.schema import (
    ApplicationDetails,
    ApplicationStatus,
    ReplicaDetails,
    ServeInstanceDetails,
)

from workers import ray_backend
from workers.backend import AppObservation, AppStatus, ReplicaObservation, ReplicaStatus
from workers.ray_backend import RayBackend, _Serve

APP = "p1--iris"
T0 = 1_700_000_000.5
CLUSTER = {"CPU": 4.0, "GPU": 2.0, "memory": 8.0 * 2**30}


def replica(replica_id: str, state: str, start_time_s: float = T0, **more: Any) -> dict[str, Any]:
    """A replica as Serve lists it: pid and node fields only once the actor has them."""
    return {"replica_id": replica_id, "state": state, "start_time_s": start_time_s, **more}


def deployment(
    status: str = "HEALTHY",
    replicas: list[dict[str, Any]] | None = None,
    message: str = "",
    required: Mapping[str, float] | None = None,
    target: int = 2,
    **more: Any,
) -> dict[str, Any]:
    return {
        "name": "model",
        "status": status,
        "status_trigger": "CONFIG_UPDATE_STARTED",
        "message": message,
        "deployment_config": {"name": "model", "num_replicas": target},
        "target_num_replicas": target,
        "required_resources": dict(required or {"CPU": 1.0}),
        "replicas": replicas or [],
        **more,
    }


def application(
    status: str, deployments: dict[str, Any] | None = None, message: str = "", **more: Any
) -> dict[str, Any]:
    return {
        "name": APP,
        "route_prefix": "/p1/iris",
        "docs_path": None,
        "status": status,
        "message": message,
        "last_deployed_time_s": T0,
        "source": "declarative",
        "deployments": deployments if deployments is not None else {},
        "external_scaler_enabled": False,
        **more,
    }


class FakeClient:
    """Serve's controller client: ``get_serve_details`` answers as the controller does,
    a dump of ``ServeInstanceDetails`` (enum members, unset fields left out)."""

    def __init__(self, applications: dict[str, Any]) -> None:
        raw = {"proxies": {}, "applications": applications}
        self.answer = ServeInstanceDetails.model_validate(raw).model_dump(exclude_unset=True)

    def get_serve_details(self) -> dict[str, Any]:
        return self.answer


def observe(app: dict[str, Any], cluster: Mapping[str, float] = CLUSTER) -> AppObservation:
    details = _Serve(cast(Any, FakeClient({APP: app}))).details()
    return ray_backend._observation(APP, details.applications[APP], cluster)


def test_a_running_application() -> None:
    obs = observe(
        application(
            "RUNNING",
            {
                "model": deployment(
                    replicas=[
                        replica("r1", "RUNNING", pid=101, node_ip="10.0.0.1", node_id="n1"),
                        replica("r2", "RUNNING", pid=102, node_ip="10.0.0.2", node_id="n2"),
                    ]
                )
            },
        )
    )
    started = datetime.fromtimestamp(T0, UTC)
    assert obs == AppObservation(
        app_name=APP,
        status=AppStatus.RUNNING,
        message="",
        replicas=(
            ReplicaObservation("r1", ReplicaStatus.RUNNING, 101, "10.0.0.1", started),
            ReplicaObservation("r2", ReplicaStatus.RUNNING, 102, "10.0.0.2", started),
        ),
        unplaceable="",
        target_replicas=2,  # what Serve wants now (an autoscaled deployment: its decision)
    )


def test_a_deploying_application_with_starting_replicas() -> None:
    obs = observe(
        application(
            "DEPLOYING",
            {
                "model": deployment(
                    "UPDATING",
                    replicas=[
                        replica("old", "RUNNING", pid=7, node_ip="10.0.0.1"),
                        replica("new1", "STARTING", node_id="n2"),  # no pid nor node ip yet
                        replica("new2", "UPDATING"),
                        replica("new3", "RECOVERING"),
                        replica("gone", "STOPPING", pid=6, node_ip="10.0.0.1"),
                    ],
                )
            },
        )
    )
    assert obs.status is AppStatus.DEPLOYING
    assert [(r.id, r.state, r.pid, r.node) for r in obs.replicas] == [
        ("old", ReplicaStatus.RUNNING, 7, "10.0.0.1"),
        ("new1", ReplicaStatus.STARTING, 0, "n2"),
        ("new2", ReplicaStatus.STARTING, 0, ""),
        ("new3", ReplicaStatus.STARTING, 0, ""),
        ("gone", ReplicaStatus.STOPPING, 6, "10.0.0.1"),
    ]
    assert obs.message == "" and obs.unplaceable == ""


def test_deploy_failed_says_the_deployment_s_cause() -> None:
    cause = "The deployment failed to start 3 times in a row: ZeroDivisionError: division by zero"
    obs = observe(
        application(
            "DEPLOY_FAILED",
            {"model": deployment("DEPLOY_FAILED", message=cause)},
            message="Deploying app 'p1--iris' failed: deployment 'model' failed.",
        )
    )
    assert obs.status is AppStatus.DEPLOY_FAILED
    assert obs.message == cause, "the deployment's words, not the application's"
    assert obs.replicas == () and obs.unplaceable == ""


def test_the_application_s_message_when_no_deployment_has_one() -> None:
    obs = observe(
        application(
            "DEPLOY_FAILED", {"model": deployment("HEALTHY")}, message="app failed to build"
        )
    )
    assert (obs.status, obs.message) == (AppStatus.DEPLOY_FAILED, "app failed to build")


def test_replicas_asking_for_more_than_the_cluster_has_are_unplaceable() -> None:
    why = "replicas cannot be placed: each needs 4 GPU; the cluster has 2 GPU in all"
    app = application(
        "DEPLOYING",
        {"model": deployment("UPDATING", required={"CPU": 1.0, "GPU": 4.0})},
    )
    obs = observe(app)
    assert (obs.status, obs.unplaceable, obs.message) == (AppStatus.DEPLOYING, why, why)

    none_here = observe(application("DEPLOYING", {"model": deployment(required={"TPU": 0.5})}))
    assert none_here.unplaceable == (
        "replicas cannot be placed: each needs 0.5 TPU; the cluster has 0 TPU in all"
    )

    fits = observe(application("DEPLOYING", {"model": deployment(required={"GPU": 2.0})}))
    assert (fits.unplaceable, fits.message) == ("", "")

    unknown_cluster = observe(app, cluster={})  # the cluster's resources unknown
    assert (unknown_cluster.unplaceable, unknown_cluster.message) == ("", "")


def test_serve_s_own_message_comes_first_but_unplaceable_stays() -> None:
    said = "Deployment 'model' has 1 replicas that have taken more than 30s to be scheduled."
    obs = observe(
        application(
            "DEPLOYING",
            {"model": deployment("UPDATING", message=said, required={"GPU": 3.0})},
        )
    )
    assert obs.message == said
    assert obs.unplaceable.startswith("replicas cannot be placed: each needs 3 GPU")


def test_missing_fields_read_as_nothing_and_unread_ones_are_ignored() -> None:
    no_deployments_yet = observe(application("NOT_STARTED", message="waiting"))
    assert no_deployments_yet == AppObservation(APP, AppStatus.DEPLOYING, "waiting", ())

    dead = replica("dead", "STOPPED", pid=5)
    obs = observe(
        application(
            "RUNNING",
            {
                "model": deployment(
                    replicas=[replica("r1", "RUNNING", start_time_s=0)],
                    recent_dead_replicas=[dead],  # kept for their logs: not replicas
                    autoscaling_detail=None,
                )
            },
            deployment_topology=None,
        )
    )
    assert obs.replicas == (ReplicaObservation("r1", ReplicaStatus.RUNNING, 0, "", None),)


def test_every_serve_status_and_replica_state_has_its_meaning() -> None:
    assert {s.value for s in ApplicationStatus} <= ray_backend._APP_STATUS.keys()
    replica_state = ReplicaDetails.model_fields["state"].annotation
    assert replica_state is not None
    assert {s.value for s in replica_state} <= ray_backend._REPLICA_STATUS.keys()


def test_a_status_it_does_not_know_reads_as_in_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(ray_backend._APP_STATUS, "UNHEALTHY")
    monkeypatch.delitem(ray_backend._REPLICA_STATUS, "PENDING_MIGRATION")
    obs = observe(
        application(
            "UNHEALTHY", {"model": deployment(replicas=[replica("r1", "PENDING_MIGRATION")])}
        )
    )
    assert obs.status is AppStatus.DEPLOYING
    assert [r.state for r in obs.replicas] == [ReplicaStatus.STARTING]


def test_an_answer_not_in_serve_s_schema_fails_loudly() -> None:
    client = FakeClient({APP: application("RUNNING", {"model": deployment()})})
    del client.answer["applications"][APP]["deployments"]["model"]["replicas"]
    with pytest.raises(pydantic.ValidationError):
        _Serve(cast(Any, client)).details()


async def test_observe_reads_every_application(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def cluster_facts() -> tuple[dict[str, float], frozenset[str]]:
        asked.append("cluster")
        return dict(CLUSTER), frozenset({"10.0.0.9"})

    monkeypatch.setattr(ray_backend, "_cluster_facts", cluster_facts)
    backend = RayBackend(None, "127.0.0.1", 8000, num_cpus=4, num_gpus=0)
    with pytest.raises(RuntimeError, match="not started"):
        await backend.observe()

    backend._serve = _Serve(cast(Any, FakeClient({})))
    assert await backend.observe() == {}
    assert asked == [], "no application: the cluster is not asked"

    apps = {
        APP: application("RUNNING", {"model": deployment(replicas=[replica("r1", "RUNNING")])}),
        "p1--big": {
            **application("DEPLOYING", {"model": deployment(required={"GPU": 8.0})}),
            "name": "p1--big",
            "route_prefix": "/p1/big",
        },
    }
    backend._serve = _Serve(cast(Any, FakeClient(apps)))
    seen = await backend.observe()
    assert {name: obs.status for name, obs in seen.items()} == {
        APP: AppStatus.RUNNING,
        "p1--big": AppStatus.DEPLOYING,
    }
    assert seen["p1--big"].unplaceable.startswith("replicas cannot be placed")
    assert seen[APP].lost_nodes == frozenset({"10.0.0.9"}), "nodes the cluster lost, said"
    assert asked == ["cluster"]


def test_details_are_read_without_pickling_any_request_router(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Serve's schema would import and cloudpickle each deployment's router class as it
    parses it (milliseconds each, for nothing this backend reads): the details are read
    with the class marked as serialized already."""
    from ray._common.utils import import_module_and_attr
    from ray.serve import config as serve_config

    config = {
        "name": APP,
        "route_prefix": "/p1/iris",
        "import_path": "workers.ray_backend:build_app",
        "deployments": [{"name": "model", "num_replicas": 2}],
    }
    model = deployment(replicas=[replica("r1", "RUNNING")])
    # As the controller sends it: the router's config set (its default class).
    model["deployment_config"]["request_router_config"] = {
        "request_router_class": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
        "request_router_kwargs": {},
    }
    app = application("RUNNING", {"model": model}, deployed_app_config=config)
    client = FakeClient({APP: app})  # built before the imports are counted

    imported: list[str] = []  # (an exception in there would be taken for a failed branch)
    real = import_module_and_attr

    def counted(path: str) -> Any:
        imported.append(path)
        return real(path)

    monkeypatch.setattr(serve_config, "import_module_and_attr", counted)
    details = _Serve(cast(Any, client)).details()
    assert imported == [], "a request router was imported to be pickled"
    parsed = details.applications[APP]
    assert [r.replica_id for r in parsed.deployments["model"].replicas] == ["r1"]
    assert parsed.deployed_app_config is not None
    assert parsed.deployed_app_config.deployments[0].name == "model"


def test_each_look_reads_what_serve_says_now() -> None:
    """What is parsed once is kept only while Serve says the same: an application that
    changed, and the instance's own fields, are read again."""
    client = FakeClient({APP: application("DEPLOYING", {"model": deployment()})})
    serve = _Serve(cast(Any, client))
    first = serve.details()
    assert first.applications[APP].status == ApplicationStatus.DEPLOYING
    again = FakeClient({APP: application("RUNNING", {"model": deployment()})}).answer
    again["target_capacity"] = 50.0
    client.answer = again
    second = serve.details()
    assert second.applications[APP].status == ApplicationStatus.RUNNING
    assert second.target_capacity == 50.0 and first.target_capacity is None


def app_config(import_path: str = "workers.ray_backend:build_app") -> dict[str, Any]:
    """One application as its config was handed over (a model's: our import path)."""
    return {
        "name": APP,
        "route_prefix": "/p1/iris",
        "import_path": import_path,
        "args": {"build": "p1/iris/builds/1"},
        "deployments": [{"name": "model", "num_replicas": 1}],
    }


def building(config: dict[str, Any], status: str = "DEPLOYING") -> dict[str, Any]:
    """An application as Serve lists it while its build task imports it: the config it
    was handed, no deployment yet."""
    return application(status, {}, deployed_app_config=config)


def built() -> dict[str, Any]:
    return application("DEPLOYING", {"model": deployment()}, deployed_app_config=app_config())


def seen(*apps: dict[str, Any]) -> dict[str, ApplicationDetails]:
    client = FakeClient({a["name"]: a for a in apps})
    return dict(_Serve(cast(Any, client)).details().applications)


def test_the_model_applications_serve_is_building_are_known() -> None:
    """Serve compares code versions only once a build is done: an application handed
    over again while it builds would have its build cancelled and started over."""
    assert ray_backend._building(seen(building(app_config()))) == [APP]
    assert ray_backend._building(seen(built())) == [], "built: its deployment is listed"
    for status in ("DEPLOY_FAILED", "DELETING"):
        assert ray_backend._building(seen(building(app_config(), status))) == [], status
    theirs = building(app_config("someone.elses:app"))
    assert ray_backend._building(seen(theirs)) == [], "not a model's application"


async def test_an_apply_waits_for_serve_to_finish_building(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It looks again until Serve lists the application's deployment; one that never
    finishes is waited for BUILD_WAIT_S, then the apply goes on."""
    monkeypatch.setattr(ray_backend, "BUILD_LOOK_S", 0.0)  # no reconciler looks here
    answers = [building(app_config())] * 3 + [built()]
    asked: list[int] = []

    class Building(FakeClient):
        def get_serve_details(self) -> dict[str, Any]:
            asked.append(1)
            return FakeClient({APP: answers[min(len(asked), len(answers)) - 1]}).answer

    backend = RayBackend(None, "127.0.0.1", 8000, num_cpus=4, num_gpus=0)
    backend._serve = _Serve(cast(Any, Building({})))
    assert await backend.until_built() == 1
    assert len(asked) == 4, "looked until the deployment was listed"

    asked.clear()
    answers[:] = [built()]
    assert await backend.until_built() == 0 and len(asked) == 1, "nothing to wait for"

    asked.clear()
    answers[:] = [building(app_config())]
    monkeypatch.setattr(ray_backend, "BUILD_WAIT_S", 0.05)
    assert await backend.until_built() == 1
    assert len(asked) > 1, "looked while it waited, then gave up"
