"""Resources <-> JSON, for event bodies (the resource as it was at that revision)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from controlplane.domain import scaling, traffic
from controlplane.domain.states import (
    BuildState,
    DeploymentState,
    ModelState,
    OperationKind,
    ReplicaState,
    ResourceKind,
)
from controlplane.domain.types import (
    Build,
    Deployment,
    Model,
    Operation,
    OperationError,
    Package,
    Replica,
    Resource,
    Resources,
)


def utc(value: datetime) -> datetime:
    """Times come back naive from SQLite: they are UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return utc(value).isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _time(value: str | None) -> datetime | None:
    return None if value is None else utc(datetime.fromisoformat(value))


def _req_time(value: str) -> datetime:
    out = _time(value)
    assert out is not None
    return out


def kind_of(resource: Resource) -> ResourceKind:
    if isinstance(resource, Model):
        return ResourceKind.MODEL
    if isinstance(resource, Build):
        return ResourceKind.BUILD
    if isinstance(resource, Deployment):
        return ResourceKind.DEPLOYMENT
    return ResourceKind.OPERATION


def dumps(resource: Resource) -> str:
    data = asdict(resource)
    if isinstance(resource, Deployment):
        data["environment"] = dict(resource.environment)
    if isinstance(resource, Model):  # the records' own JSON, as the tables keep them
        data["traffic"] = traffic.split_to_json(resource.traffic)
        data["scale"] = scaling.scale_to_json(resource.scale)
    if isinstance(resource, Operation):
        data["rollout"] = traffic.record_to_json(resource.rollout)
        data.pop("plan", None)  # only a validate_only answer has one; never recorded
    return json.dumps(data, default=_default, separators=(",", ":"), sort_keys=True)


def loads(kind: ResourceKind, body: str) -> Resource:
    d = json.loads(body)
    if kind is ResourceKind.MODEL:
        return Model(
            **{
                **d,
                "state": ModelState(d["state"]),
                "create_time": _req_time(d["create_time"]),
                "update_time": _req_time(d["update_time"]),
                "traffic": traffic.split_from_json(d.get("traffic") or ""),
                "scale": scaling.scale_from_json(d.get("scale")),
            }
        )
    if kind is ResourceKind.BUILD:
        return Build(
            **{
                **d,
                "state": BuildState(d["state"]),
                "create_time": _req_time(d["create_time"]),
                "finish_time": _time(d["finish_time"]),
                "packages": tuple(Package(**p) for p in d.get("packages", ())),
            }
        )
    if kind is ResourceKind.DEPLOYMENT:
        return Deployment(
            **{
                **d,
                "state": DeploymentState(d["state"]),
                "resources": Resources(
                    **{
                        **d["resources"],
                        "autoscaling": scaling.Autoscaling(**d["resources"]["autoscaling"])
                        if d["resources"].get("autoscaling")
                        else None,
                    }
                ),
                "replicas": tuple(replica_from_dict(r) for r in d["replicas"]),
                "secret_environment_keys": tuple(d.get("secret_environment_keys", ())),
                "create_time": _req_time(d["create_time"]),
                "update_time": _req_time(d["update_time"]),
            }
        )
    error = d.get("error")
    return Operation(
        **{
            **d,
            "kind": OperationKind(d["kind"]),
            "error": OperationError(**error) if error else None,
            "create_time": _req_time(d["create_time"]),
            "update_time": _req_time(d["update_time"]),
            "rollout": traffic.record_from_json(d.get("rollout") or ""),
        }
    )


def replica_to_dict(r: Replica) -> dict[str, Any]:
    return {
        "id": r.id,
        "state": r.state.value,
        "pid": r.pid,
        "node": r.node,
        "start_time": utc(r.start_time).isoformat() if r.start_time else None,
    }


def replica_from_dict(d: dict[str, Any]) -> Replica:
    return Replica(
        id=d["id"],
        state=ReplicaState(d["state"]),
        pid=int(d["pid"]),
        node=d["node"],
        start_time=_time(d.get("start_time")),
    )


def packages_to_json(packages: Iterable[Package]) -> str:
    return json.dumps([asdict(p) for p in packages], sort_keys=True)


def packages_from_json(text: str) -> tuple[Package, ...]:
    return tuple(Package(**p) for p in json.loads(text or "[]"))
