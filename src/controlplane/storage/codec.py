"""Resources <-> JSON, for event bodies (the resource as it was at that revision)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from controlplane.domain import states as st
from controlplane.domain import types as t


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


def kind_of(resource: t.Resource) -> st.ResourceKind:
    if isinstance(resource, t.Model):
        return st.ResourceKind.MODEL
    if isinstance(resource, t.Build):
        return st.ResourceKind.BUILD
    if isinstance(resource, t.Deployment):
        return st.ResourceKind.DEPLOYMENT
    return st.ResourceKind.OPERATION


def dumps(resource: t.Resource) -> str:
    data = asdict(resource)
    if isinstance(resource, t.Deployment):
        data["environment"] = dict(resource.environment)
    return json.dumps(data, default=_default, separators=(",", ":"), sort_keys=True)


def loads(kind: st.ResourceKind, body: str) -> t.Resource:
    d = json.loads(body)
    if kind is st.ResourceKind.MODEL:
        return t.Model(
            **{
                **d,
                "state": st.ModelState(d["state"]),
                "create_time": _req_time(d["create_time"]),
                "update_time": _req_time(d["update_time"]),
            }
        )
    if kind is st.ResourceKind.BUILD:
        return t.Build(
            **{
                **d,
                "state": st.BuildState(d["state"]),
                "create_time": _req_time(d["create_time"]),
                "finish_time": _time(d["finish_time"]),
                "packages": tuple(t.Package(**p) for p in d.get("packages", ())),
            }
        )
    if kind is st.ResourceKind.DEPLOYMENT:
        return t.Deployment(
            **{
                **d,
                "state": st.DeploymentState(d["state"]),
                "resources": t.Resources(**d["resources"]),
                "replicas": tuple(replica_from_dict(r) for r in d["replicas"]),
                "secret_environment_keys": tuple(d.get("secret_environment_keys", ())),
                "create_time": _req_time(d["create_time"]),
                "update_time": _req_time(d["update_time"]),
            }
        )
    error = d.get("error")
    return t.Operation(
        **{
            **d,
            "kind": st.OperationKind(d["kind"]),
            "error": t.OperationError(**error) if error else None,
            "create_time": _req_time(d["create_time"]),
            "update_time": _req_time(d["update_time"]),
        }
    )


def replica_to_dict(r: t.Replica) -> dict[str, Any]:
    return {
        "id": r.id,
        "state": r.state.value,
        "pid": r.pid,
        "node": r.node,
        "start_time": utc(r.start_time).isoformat() if r.start_time else None,
    }


def replica_from_dict(d: dict[str, Any]) -> t.Replica:
    return t.Replica(
        id=d["id"],
        state=st.ReplicaState(d["state"]),
        pid=int(d["pid"]),
        node=d["node"],
        start_time=_time(d.get("start_time")),
    )


def packages_to_json(packages: Iterable[t.Package]) -> str:
    return json.dumps([asdict(p) for p in packages], sort_keys=True)


def packages_from_json(text: str) -> tuple[t.Package, ...]:
    return tuple(t.Package(**p) for p in json.loads(text or "[]"))
