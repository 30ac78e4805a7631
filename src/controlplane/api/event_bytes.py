"""The watch streams' messages, encoded: a change goes to every stream that watches its
model, and is encoded once for all of them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from controlplane.api import convert
from controlplane.domain.states import EventType
from controlplane.domain.types import Event

KEPT = 4096  # recent changes kept encoded
# Made for one stream (its snapshot, its bookmarks): never shared, never kept.
PER_STREAM = frozenset({EventType.BOOKMARK, EventType.CURRENT})


def encode(event: Event) -> bytes:
    return convert.event_to_pb(event).SerializeToString()


class EncodedEvents:
    """``event`` -> its ModelEvent's bytes; a change's (keyed by its revision, which no
    other change has) kept for the next stream that sends it."""

    def __init__(self, kept: int = KEPT, encoder: Callable[[Event], bytes] = encode) -> None:
        self.kept = kept
        self.encoder = encoder
        self._bytes: OrderedDict[int, bytes] = OrderedDict()

    def __call__(self, event: Event) -> bytes:
        if event.type in PER_STREAM:
            return self.encoder(event)
        data = self._bytes.get(event.revision)
        if data is None:
            data = self._bytes[event.revision] = self.encoder(event)
            if len(self._bytes) > self.kept:
                self._bytes.popitem(last=False)
        return data
