"""The WatchModels filter: parsing (with clear errors) and matching."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from controlplane.domain import watch_filter
from controlplane.domain.errors import InvalidArgument
from controlplane.domain.states import EventType, ModelState, OperationKind
from controlplane.domain.types import Event, Model, Operation, Resource

NOW = datetime.now(UTC)


def event(model: str, resource: Resource | None, type_: EventType) -> Event:
    return Event(revision=1, time=NOW, type=type_, resource=resource, model=model)


def model(name: str) -> Model:
    return Model(name, "", "", ModelState.NOT_DEPLOYED, "", "", NOW, NOW, "1")


def test_empty_filter_matches_everything() -> None:
    f = watch_filter.parse("  ")
    assert f.matches(event("projects/p/models/a", model("projects/p/models/a"), EventType.CREATED))


def test_terms_all_hold_and_repeated_keys_match_any_value() -> None:
    f = watch_filter.parse("kind=model model=a model=b")
    a = event("projects/p/models/a", model("projects/p/models/a"), EventType.UPDATED)
    c = event("projects/p/models/c", model("projects/p/models/c"), EventType.UPDATED)
    op = Operation("operations/x", OperationKind.STOP_MODEL, "", False, None, NOW, NOW, "")
    a_op = event("projects/p/models/a", op, EventType.UPDATED)
    assert f.matches(a) and not f.matches(c) and not f.matches(a_op)
    assert f.matches(event("", None, EventType.BOOKMARK)), "bookmarks always pass"


@pytest.mark.parametrize(
    "text", ["kind=image", "kind=", "model=Bad", "owner=me", "kind", "=model", "x" * 2001]
)
def test_bad_filters_name_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        watch_filter.parse(text)
    assert [v.field for v in err.value.violations] == ["filter"]
