"""What the change log keeps of a model and an operation comes back as it went in: the
traffic split and a rollout's step included (a watch replays them after a restart)."""

from __future__ import annotations

from datetime import UTC, datetime

from controlplane.domain.states import ModelState, OperationKind
from controlplane.domain.traffic import (
    Gates,
    Phase,
    RolloutRecord,
    Split,
    StepFigures,
    Strategy,
    StrategyKind,
)
from controlplane.domain.types import Model, Operation
from controlplane.storage import codec

T = datetime(2026, 12, 6, 4, 30, tzinfo=UTC)


def test_a_model_with_two_builds_live_round_trips() -> None:
    split = Split("d/1", "d/2", "b/1", "b/2", percent=10, shadow=False, sticky_header="X-User")
    for traffic in (split, None):
        model = Model(
            "projects/p/models/m",
            "m",
            "",
            ModelState.DEPLOYING,
            "d/1",
            "http://e",
            T,
            T,
            '"3"',
            traffic=traffic,
        )
        assert codec.loads(codec.kind_of(model), codec.dumps(model)) == model


def test_an_operation_at_a_canary_step_round_trips() -> None:
    record = RolloutRecord(
        Strategy(StrategyKind.CANARY, (10, 50), 60.0, Gates(max_error_rate=0.01)),
        Phase.BAKING,
        step=1,
        step_start=T,
        candidate=StepFigures(40, 1, 12.5),
        current=StepFigures(400, 0, 10.0),
    )
    for rollout in (record, None):
        op = Operation(
            "operations/x",
            OperationKind.CREATE_DEPLOYMENT,
            "d/2",
            False,
            None,
            T,
            T,
            "m",
            rollout=rollout,
        )
        assert codec.loads(codec.kind_of(op), codec.dumps(op)) == op
