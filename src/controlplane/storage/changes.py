"""The one write path for state: check the transition, write the row, emit the event.

Nothing else in the control plane assigns a ``state`` or emits an event. Each
call happens inside a ``Database.write()`` transaction, so a change, its event
and the job it needs commit together or not at all.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from controlplane import tracing
from controlplane.domain import transitions
from controlplane.domain.states import BuildState, DeploymentState, EventType, ModelState
from controlplane.domain.types import OperationError, Resource
from controlplane.storage import codec, jobs, repo
from controlplane.storage.db import FinishedOperation, WriteTx
from controlplane.storage.tables import (
    BuildRow,
    DeploymentRow,
    EventRow,
    ModelRow,
    OperationRow,
)


def now() -> datetime:
    return datetime.now(UTC)


def project_of(model_name: str) -> str:
    return model_name.split("/")[1]


class Changes:
    def __init__(self, tx: WriteTx, http_base: str) -> None:
        self.tx = tx
        self.session = tx.session
        self.http_base = http_base

    # ---- events ------------------------------------------------------------------------------

    def _emit(
        self, model: str, type_: EventType, resource: Resource, revision: int | None = None
    ) -> int:
        revision = revision or self.tx.next_revision()
        self.session.add(
            EventRow(
                revision=revision,
                model=model,
                project=project_of(model),
                time=now(),
                type=type_.value,
                kind=codec.kind_of(resource).value,
                body=codec.dumps(resource),
            )
        )
        return revision

    def _record(
        self, row: ModelRow | BuildRow | DeploymentRow | OperationRow, type_: EventType
    ) -> None:
        """Writes the row with a new revision (its resource version) and emits its event."""
        row.revision = self.tx.next_revision()
        if not isinstance(row, BuildRow):
            row.update_time = now()
        self.session.add(row)
        model_name = row.name if isinstance(row, ModelRow) else row.model
        self._emit(model_name, type_, self.resource(row), row.revision)

    def resource(self, row: ModelRow | BuildRow | DeploymentRow | OperationRow) -> Resource:
        if isinstance(row, ModelRow):
            return repo.to_model(row, self.http_base)
        if isinstance(row, BuildRow):
            return repo.to_build(row)
        if isinstance(row, DeploymentRow):
            return repo.to_deployment(row)
        return repo.to_operation(row)

    # ---- creation and deletion ---------------------------------------------------------------

    def created(self, row: ModelRow | BuildRow | DeploymentRow | OperationRow) -> None:
        self._record(row, EventType.CREATED)

    def model_deleted(self, row: ModelRow) -> None:
        resource = repo.to_model(row, self.http_base)
        self._emit(row.name, EventType.DELETED, resource)
        self.session.delete(row)

    # ---- state changes -----------------------------------------------------------------------

    def model(self, row: ModelRow, state: ModelState | None = None, **fields: Any) -> None:
        if state is not None:
            transitions.check(transitions.MODEL_TRANSITIONS, row.name, ModelState(row.state), state)
            fields["state"] = state.value
        self._update(row, fields)

    def build(self, row: BuildRow, state: BuildState | None = None, **fields: Any) -> None:
        if state is not None:
            transitions.check(transitions.BUILD_TRANSITIONS, row.name, BuildState(row.state), state)
            fields["state"] = state.value
        self._update(row, fields)

    def deployment(
        self, row: DeploymentRow, state: DeploymentState | None = None, **fields: Any
    ) -> None:
        if state is not None:
            transitions.check(
                transitions.DEPLOYMENT_TRANSITIONS, row.name, DeploymentState(row.state), state
            )
            fields["state"] = state.value
        self._update(row, fields)

    def cancel_requested(self, row: OperationRow) -> None:
        """Marks a running operation for cancellation (the server running its job acts)."""
        if not row.done and not row.cancel_requested:
            self._update(row, {"cancel_requested": True, "progress": "cancelling"})

    def operation_progress(self, row: OperationRow, progress: str) -> None:
        if row.done or row.progress == progress:
            return
        self._update(row, {"progress": progress})

    def operation_rollout(self, row: OperationRow, rollout: str, progress: str) -> None:
        """A judged rollout's record (``domain.traffic.RolloutRecord``) and progress line."""
        if row.done or (row.rollout, row.progress) == (rollout, progress):
            return
        self._update(row, {"rollout": rollout, "progress": progress})

    def operation_done(
        self,
        row: OperationRow,
        model: ModelRow,
        progress: str = "done",
        error: OperationError | None = None,
    ) -> None:
        """Finishes an operation and releases its model for the next one."""
        if row.done:
            return
        fields: dict[str, Any] = {"done": True, "progress": progress}
        if error is not None:
            fields.update(
                error_code=error.code, error_message=error.message, error_reason=error.reason
            )
        self._update(row, fields)
        self.tx.finished_operations.append(
            FinishedOperation(
                row.name,
                row.model,
                row.kind,
                error.code if error is not None else "",
                (now() - codec.utc(row.create_time)).total_seconds(),
            )
        )
        if model.running_operation == row.name:
            self._update(model, {"running_operation": ""})

    def _update(
        self, row: ModelRow | BuildRow | DeploymentRow | OperationRow, fields: dict[str, Any]
    ) -> None:
        """Writes ``fields``; an event (and a new revision) only if a client can see the
        difference: bookkeeping (applied, restart generation, which replicas ever ran) is
        saved silently, so every watcher is not sent a copy of what it already has."""
        before = self.resource(row)
        for key, value in fields.items():
            if not hasattr(row, key):
                raise AttributeError(f"{type(row).__name__} has no field {key}")
            setattr(row, key, value)
        if self.resource(row) == before:
            self.session.add(row)
            return
        self._record(row, EventType.UPDATED)

    # ---- jobs ------------------------------------------------------------------------------

    def enqueue(
        self,
        kind: jobs.JobKind,
        model: str,
        operation: str = "",
        target: str = "",
        delay_s: float = 0,
    ) -> None:
        """A job for the dispatcher, committed with the change that needs it; its run
        continues this call's trace."""
        jobs.enqueue(self.session, kind, model, operation, target, delay_s, tracing.traceparent())

    def resync(self, delay_s: float = 0) -> None:
        """The whole desired Serve config is to be applied again (``jobs.resync``)."""
        jobs.resync(self.session, delay_s, tracing.traceparent())

    def cancel_pending_builds(self, operation: str) -> int:
        return jobs.cancel_pending_builds(self.session, operation)
