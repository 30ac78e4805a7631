"""The watch streams' serializer: one message object sent on many streams is encoded once."""

from __future__ import annotations

from google.protobuf.message import Message

from controlplane.api.wiring import SHARED_MESSAGES, EncodeOnce, method_handlers
from modellifecycle.v1 import resources_pb2 as pb


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, message: Message) -> bytes:
        self.calls += 1
        return message.SerializeToString()


def event(revision: int) -> pb.ModelEvent:
    e = pb.ModelEvent(revision=revision, type=pb.EVENT_TYPE_UPDATED)
    e.model.name = f"projects/p/models/m{revision}"
    return e


def test_the_same_object_is_serialized_once() -> None:
    counting = Counting()
    encode = EncodeOnce(counting)
    shared = event(1)
    sent = [encode(shared) for _ in range(1000)]
    assert counting.calls == 1
    assert all(b == shared.SerializeToString() for b in sent)


def test_equal_but_distinct_objects_are_each_serialized() -> None:
    counting = Counting()
    encode = EncodeOnce(counting)
    a, b = event(1), event(2)
    assert encode(a) != encode(b)
    assert pb.ModelEvent.FromString(encode(b)).revision == 2
    assert counting.calls == 2


def test_evicted_messages_are_serialized_again_and_stay_right() -> None:
    counting = Counting()
    encode = EncodeOnce(counting, kept=2)
    events = [event(i) for i in range(5)]
    for e in events:
        encode(e)
    assert counting.calls == 5
    assert pb.ModelEvent.FromString(encode(events[0])).revision == 0  # gone: again
    assert counting.calls == 6
    assert pb.ModelEvent.FromString(encode(events[4])).revision == 4  # kept
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
    for name in SHARED_MESSAGES:
        assert isinstance(table[name].response_serializer, EncodeOnce), name
    assert not isinstance(table["GetModel"].response_serializer, EncodeOnce)
    assert table["GetModel"].request_deserializer is not None
