"""The `filter` of WatchModels: which events of a project a watcher wants.

Space-separated terms, all of which must hold: ``kind=model|build|deployment|operation``
and ``model=<model id>``; a key given more than once matches any of its values.
BOOKMARK events always pass (they carry only the revision).
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.domain.errors import invalid_field
from controlplane.domain.names import check_id
from controlplane.domain.states import EventType
from controlplane.domain.types import Build, Deployment, Event, Model, Operation

KINDS: dict[str, type[Model | Build | Deployment | Operation]] = {
    "model": Model,
    "build": Build,
    "deployment": Deployment,
    "operation": Operation,
}
MAX_FILTER = 2000


@dataclass(frozen=True)
class WatchFilter:
    kinds: frozenset[str] = frozenset()  # empty: every kind
    models: frozenset[str] = frozenset()  # model ids; empty: every model

    def matches(self, event: Event) -> bool:
        if event.type is EventType.BOOKMARK:
            return True
        if self.models and event.model.rsplit("/", 1)[-1] not in self.models:
            return False
        if self.kinds:
            return any(isinstance(event.resource, KINDS[k]) for k in self.kinds)
        return True


def parse(text: str) -> WatchFilter:
    if len(text) > MAX_FILTER:
        raise invalid_field("filter", f"at most {MAX_FILTER} characters")
    kinds: set[str] = set()
    models: set[str] = set()
    for term in text.split():
        key, sep, value = term.partition("=")
        if not sep or not value:
            raise invalid_field("filter", f"{term!r} is not key=value (keys: kind, model)")
        if key == "kind":
            if value not in KINDS:
                raise invalid_field(
                    "filter", f"kind {value!r} is not one of {', '.join(sorted(KINDS))}"
                )
            kinds.add(value)
        elif key == "model":
            models.add(check_id(value, "filter"))
        else:
            raise invalid_field("filter", f"unknown key {key!r} in {term!r} (keys: kind, model)")
    return WatchFilter(frozenset(kinds), frozenset(models))
