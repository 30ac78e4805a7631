"""The watch streams' messages: a change sent on many streams is encoded once, each
stream's own bookmarks and snapshot every time, and the bytes are the event's message."""

from __future__ import annotations

from datetime import UTC, datetime

from controlplane.api import convert
from controlplane.api.event_bytes import EncodedEvents, encode
from controlplane.api.wiring import PRE_ENCODED, method_handlers
from controlplane.domain.states import EventType
from controlplane.domain.types import Event
from modellifecycle.v1 import resources_pb2 as pb

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, event: Event) -> bytes:
        self.calls += 1
        return encode(event)


def change(revision: int) -> Event:
    return Event(
        revision=revision, time=T0, type=EventType.UPDATED, model=f"projects/p/models/m{revision}"
    )


def test_a_change_is_encoded_once_for_every_stream() -> None:
    counting = Counting()
    encoded = EncodedEvents(encoder=counting)
    sent = [encoded(change(1)) for _ in range(1000)]  # equal events, as each stream has it
    assert counting.calls == 1
    assert all(data == sent[0] for data in sent)
    assert pb.ModelEvent.FromString(sent[0]) == convert.event_to_pb(change(1))


def test_bookmarks_and_snapshots_are_encoded_per_stream_and_never_kept() -> None:
    counting = Counting()
    encoded = EncodedEvents(kept=1, encoder=counting)
    encoded(change(7))
    for kind in (EventType.BOOKMARK, EventType.CURRENT):
        mark = Event(revision=7, time=T0, type=kind, model="projects/p/models/m7")
        assert pb.ModelEvent.FromString(encoded(mark)).type == convert.event_to_pb(mark).type
    assert counting.calls == 3
    assert pb.ModelEvent.FromString(encoded(change(7))).type == pb.EVENT_TYPE_UPDATED
    assert counting.calls == 3, "the change at the same revision is still the one kept"


def test_evicted_changes_are_encoded_again_and_stay_right() -> None:
    counting = Counting()
    encoded = EncodedEvents(kept=2, encoder=counting)
    for rev in range(5):
        encoded(change(rev))
    assert counting.calls == 5
    assert pb.ModelEvent.FromString(encoded(change(0))).revision == 0  # gone: again
    assert counting.calls == 6
    assert pb.ModelEvent.FromString(encoded(change(4))).revision == 4  # kept
    assert counting.calls == 6


class Everything:
    """Answers every method name with a distinct callable (the handler's behavior)."""

    def __getattr__(self, name: str) -> object:
        return lambda request, context: name


def test_every_method_is_registered_with_its_kind_and_codec() -> None:
    table = method_handlers(Everything())  # type: ignore[arg-type]  # any object with the methods
    assert "GetModel" in table and "WatchModel" in table and "UploadSource" in table
    assert table["GetModel"].unary_unary is not None
    assert table["WatchModel"].unary_stream is not None
    assert table["UploadSource"].stream_unary is not None
    for name in PRE_ENCODED:
        assert table[name].response_serializer is None, name  # the handler writes bytes
    assert table["GetModel"].response_serializer is not None
    assert table["GetModel"].request_deserializer is not None
