"""Timestamps in every message the API sends: ``convert.timestamp`` builds the same
protobuf Timestamp as ``Timestamp.FromDatetime`` (seconds and nanos from the epoch, in
UTC), in a third of its time: a page of a list converts hundreds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import timestamp_pb2

from controlplane.api import convert


@pytest.mark.parametrize(
    "value",
    [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2026, 12, 6, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1960, 5, 5, 1, 2, 3, 4_567, tzinfo=UTC),  # before the epoch
        datetime(2026, 3, 29, 2, 30, tzinfo=timezone(timedelta(hours=-7, minutes=-30))),
    ],
)
def test_the_same_timestamp_as_protobuf_makes(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value.astimezone(UTC))
    got = convert.timestamp(value)
    assert got == expected
    assert got is not None and convert.from_timestamp(got) == value


def test_no_time_is_no_timestamp() -> None:
    assert convert.timestamp(None) is None
