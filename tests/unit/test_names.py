"""Resource names and ids (AIP-122), and resource validation."""

from __future__ import annotations

import pytest

from controlplane.domain import names
from controlplane.domain.errors import InvalidArgument
from controlplane.domain.types import Resources, validate_environment


@pytest.mark.parametrize("value", ["a", "iris", "iris-2", "a" * 63, "m1-x-9"])
def test_good_ids(value: str) -> None:
    assert names.check_id(value, "id") == value


@pytest.mark.parametrize("value", ["", "A", "1a", "-a", "a-", "a" * 64, "a_b", "a.b", "ä"])
def test_bad_ids(value: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        names.check_id(value, "model_id")
    assert e.value.violations[0].field == "model_id"


def test_round_trips() -> None:
    m = names.parse_model("projects/p/models/iris")
    assert str(m) == "projects/p/models/iris"
    assert str(m.build(3)) == "projects/p/models/iris/builds/3"
    assert names.parse_build(str(m.build(3))).version == 3
    assert names.parse_deployment(str(m.deployment(12))).number == 12
    assert names.parse_deployment("projects/p/models/iris/deployments/12").parent == m


@pytest.mark.parametrize(
    "value",
    [
        "projects/p/models/iris/builds/0",
        "projects/p/models/iris/builds/-1",
        "projects/p/models/iris/builds/x",
        "projects/p/models/iris/builds/01",
        "projects/p/models/iris/deployments/1",
        "projects/p/models/iris",
        "",
    ],
)
def test_bad_build_names(value: str) -> None:
    with pytest.raises(InvalidArgument):
        names.parse_build(value)


def test_resources_validation_lists_every_bad_field() -> None:
    with pytest.raises(InvalidArgument) as e:
        Resources(replicas=0, cpus=-1, memory_mib=-1, gpus=float("nan")).validate()
    assert {v.field for v in e.value.violations} == {
        "resources.replicas",
        "resources.cpus",
        "resources.memory_mib",
        "resources.gpus",
    }
    assert Resources(replicas=2, cpus=0.5, memory_mib=512, gpus=0.25).validate()


def test_environment_validation() -> None:
    assert validate_environment({"A_B": "1"}) == {"A_B": "1"}
    for bad in ({"": "x"}, {"1A": "x"}, {"A-B": "x"}, {"CP_X": "x"}, {"RAY_X": "x"}):
        with pytest.raises(InvalidArgument):
            validate_environment(bad)
