"""The states of every resource, as the contract names them (without prefixes)."""

from __future__ import annotations

from enum import StrEnum


class ModelState(StrEnum):
    NOT_DEPLOYED = "NOT_DEPLOYED"
    PENDING = "PENDING"
    DEPLOYING = "DEPLOYING"
    DEPLOYED = "DEPLOYED"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"

    @property
    def active(self) -> bool:
        """A model is active while it is DEPLOYING, DEPLOYED or STOPPING."""
        return self in ACTIVE_MODEL_STATES


ACTIVE_MODEL_STATES = frozenset({ModelState.DEPLOYING, ModelState.DEPLOYED, ModelState.STOPPING})


class BuildState(StrEnum):
    QUEUED = "QUEUED"
    BUILDING = "BUILDING"
    BUILT = "BUILT"
    FAILED = "FAILED"


class DeploymentState(StrEnum):
    PENDING = "PENDING"
    DEPLOYING = "DEPLOYING"
    DEPLOYED = "DEPLOYED"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"
    REPLACED = "REPLACED"


class ReplicaState(StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    FAILED = "FAILED"


class OperationKind(StrEnum):
    CREATE_BUILD = "CREATE_BUILD"
    CREATE_DEPLOYMENT = "CREATE_DEPLOYMENT"
    STOP_MODEL = "STOP_MODEL"
    RESTART_MODEL = "RESTART_MODEL"
    SET_TRAFFIC = "SET_TRAFFIC"


class EventType(StrEnum):
    CURRENT = "CURRENT"
    CREATED = "CREATED"
    UPDATED = "UPDATED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"


class ResourceKind(StrEnum):
    MODEL = "model"
    BUILD = "build"
    DEPLOYMENT = "deployment"
    OPERATION = "operation"
