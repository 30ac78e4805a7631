"""Domain errors -> gRPC status: a value quoted by its start, the whole within the budget
any client's default metadata limit (8 KB) takes; errors of normal values unchanged."""

from __future__ import annotations

import time

from google.rpc import error_details_pb2, status_pb2

from controlplane.api import status
from controlplane.domain import errors, types
from controlplane.domain.errors import FieldViolation, InvalidArgument
from controlplane.domain.names import check_id

A = "a" * status.VALUE_CHARS


def parsed(err: errors.DomainError) -> tuple[status_pb2.Status, int, dict[str, str], list[str]]:
    """The status sent for ``err``, its size in the trailers, its ErrorInfo metadata and
    its violations (as "field: description")."""
    st = status.to_status(err)
    size = len(st.details.encode())
    proto = status_pb2.Status()
    for key, value in st.trailing_metadata:
        size += len(key) + len(value)
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            proto.ParseFromString(value)
    info = error_details_pb2.ErrorInfo()
    assert proto.details[0].Unpack(info)
    fields: list[str] = []
    for detail in proto.details[1:]:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        fields += [f"{v.field}: {v.description}" for v in bad.field_violations]
    assert proto.message == st.details
    return proto, size, dict(info.metadata), fields


def error_of(fn: object, *args: object) -> errors.DomainError:
    try:
        fn(*args)  # type: ignore[operator]
    except errors.DomainError as e:
        return e
    raise AssertionError("no error")


def test_normal_values_are_quoted_whole() -> None:
    name = "projects/p/models/" + "m" * 63
    proto, _, metadata, _ = parsed(errors.not_found("model", name))
    assert proto.message == f"model {name!r} not found"
    assert metadata == {"name": name}
    err = error_of(check_id, "Iris", "model_id")
    proto, _, metadata, fields = parsed(err)
    assert proto.message == err.message
    assert fields == [f"model_id: {err.violations[0].description}"]
    # A value of exactly VALUE_CHARS characters is not cut either.
    proto, _, metadata, _ = parsed(errors.not_found("model", A))
    assert proto.message == f"model {A!r} not found" and metadata == {"name": A}


def test_a_long_value_is_quoted_by_its_start_and_length() -> None:
    long = "a" * 100_000
    proto, size, metadata, _ = parsed(errors.not_found("model", long))
    assert proto.message == f"model '{A}…' (100000 characters) not found"
    assert metadata == {"name": f"{A}… (100000 characters)"}
    assert size < status.TRAILER_BUDGET
    err = error_of(check_id, long, "model_id")
    proto, size, metadata, fields = parsed(err)
    assert proto.message.startswith(f"model_id: '{A}…' (100000 characters) is not a valid id")
    assert fields == [proto.message]  # as the description says it
    assert metadata == {"field": "model_id"}
    assert size < status.TRAILER_BUDGET


def test_values_with_spaces_quotes_and_escapes() -> None:
    text = "the model's name " + repr("x y\n" * 30_000) + " and " + repr("b'" * 300) + " end"
    short = status.shorten_values(text)
    assert short.startswith("the model's name 'x y\\nx y\\n")
    assert "…' (120000 characters) and \"" in short
    assert short.endswith('…" (600 characters) end')
    # An unquoted value: its start and length, as a run of characters.
    assert status.shorten_values("got " + "z" * 1000 + ".") == f"got {'z' * 200}… (1001 characters)"


def test_the_field_of_a_violation_is_cut_too() -> None:
    # A field that quotes what it names (e.g. an environment key) is cut like a value.
    field = f"environment[{'bad-' + 'k' * 100_000!r}]"
    err = InvalidArgument(
        message=f"{field}: names are letters, digits and _",
        reason="INVALID_ENVIRONMENT",
        metadata={"field": field},
        violations=(FieldViolation(field, "names are letters, digits and _"),),
    )
    _, size, metadata, fields = parsed(err)
    assert size < status.TRAILER_BUDGET
    assert metadata["field"].startswith("environment['bad-kkk")
    assert metadata["field"].endswith("…' (100004 characters)]")
    assert fields == [f"{metadata['field']}: names are letters, digits and _"]


def test_an_environment_name_over_the_limit_is_refused_in_a_few_words() -> None:
    err = error_of(types.validate_environment, {"k" * 100_000: "v"})
    _, size, _metadata, fields = parsed(err)
    assert size < status.TRAILER_BUDGET
    assert fields == [f"environment: a name over {types.MAX_ENV_NAME} characters"]


def test_many_long_violations_and_wide_characters_stay_within_the_budget() -> None:
    wide = "\U0001f600" * 50_000  # 4 bytes each in UTF-8, percent-encoded in grpc-message
    err = InvalidArgument(
        message="; ".join([f"{wide} {wide!r}"] * 10),
        reason="R" * 10_000,
        metadata={f"{wide}{i}": f"{wide} {wide}" for i in range(100)},
        violations=[FieldViolation(f"f[{wide!r}]", f"{wide} x {wide}")] * 1000,
    )
    _, size, metadata, fields = parsed(err)
    assert size < status.TRAILER_BUDGET
    assert 1 <= len(fields) <= 20 and metadata


def test_cutting_takes_linear_time() -> None:
    for text in ("'" + "\\'" * 200_000, "x'" * 200_000, "' " * 200_000, "a" * 400_000):
        start = time.monotonic()
        status.to_status(InvalidArgument(text, metadata={"v": text}))
        assert time.monotonic() - start < 2, text[:10]
