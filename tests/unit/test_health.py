"""The health rules, on made-up figures: what a person reads in Model.health."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from controlplane.domain.health import BuildErrors, HealthRules, Recent, Usage, judge, merge
from controlplane.domain.redaction import redact

RULES = HealthRules()


def recent(**kw: object) -> Recent:
    base: dict[str, object] = {
        "usage": Usage(minutes=10, cpu_used=0.6, cpu_requested=1.0),
        "replicas": 3,
    }
    return Recent(**{**base, **kw})  # type: ignore[arg-type]


def test_a_model_that_serves_well_is_ok() -> None:
    assert judge(recent(), RULES) == "ok"


def test_nothing_to_say_without_replicas() -> None:
    assert judge(recent(replicas=0, usage=Usage(0, 0, 0)), RULES) == ""


def test_idle_cpus_for_the_whole_period_are_over_provisioned() -> None:
    usage = Usage(minutes=10, cpu_used=0.12, cpu_requested=2.0)
    assert judge(recent(usage=usage), RULES) == (
        "over-provisioned: replicas use 6% of 2 CPUs requested for 10 min"
    )


def test_idle_cpus_for_less_than_the_period_say_nothing_yet() -> None:
    usage = Usage(minutes=4, cpu_used=0.0, cpu_requested=2.0)
    assert judge(recent(usage=usage), RULES) == "ok"


def test_busy_cpus_are_under_provisioned() -> None:
    usage = Usage(minutes=10, cpu_used=0.97, cpu_requested=1.0)
    assert judge(recent(usage=usage), RULES) == (
        "under-provisioned: replicas use 97% of 1 CPU requested for 10 min"
    )


def test_idle_gpus_are_said_where_they_are_measured() -> None:
    usage = Usage(10, 0.5, 1.0, gpu_used=0.02, gpu_requested=1.0)
    assert judge(recent(usage=usage), RULES) == (
        "over-provisioned: replicas use 2% of 1 GPU requested for 10 min"
    )
    unmeasured = Usage(10, 0.5, 1.0, gpu_used=-1.0, gpu_requested=1.0)
    assert judge(recent(usage=unmeasured), RULES) == "ok"


def test_refused_requests_are_dropping_requests_with_how_busy_replicas_were() -> None:
    said = judge(recent(refused=37, busy_replicas=3), RULES)
    assert said == "dropping requests: 37 refused in the last 5 min at 3/3 replicas busy"


def test_waiting_requests_without_refusals_are_queueing() -> None:
    said = judge(recent(queued=40, busy_replicas=3), RULES)
    assert said == "queueing: 40 requests waiting at 3/3 replicas busy"


def test_a_builds_error_rate_names_the_build_and_since_when() -> None:
    since = datetime(2026, 12, 5, 12, 3, tzinfo=UTC)
    builds = (BuildErrors("build 3", 500, 0, None), BuildErrors("build 4", 100, 12, since))
    assert judge(recent(builds=builds), RULES) == (
        "errors: 12% of requests failed on build 4 since 12:03"
    )


def test_a_few_requests_are_not_enough_to_judge_an_error_rate() -> None:
    builds = (BuildErrors("build 4", 10, 5, None),)
    assert judge(recent(builds=builds), RULES) == "ok"


def test_several_findings_most_urgent_first() -> None:
    said = judge(
        recent(
            builds=(BuildErrors("build 2", 100, 50, None),),
            refused=5,
            busy_replicas=2,
            usage=Usage(10, 0.99, 1.0),
        ),
        RULES,
    )
    assert said.split("; ") == [
        "errors: 50% of requests failed on build 2",
        "dropping requests: 5 refused in the last 5 min at 2/3 replicas busy",
        "under-provisioned: replicas use 99% of 1 CPU requested for 10 min",
    ]


def test_thresholds_are_settings() -> None:
    strict = HealthRules(error_ratio=0.01, error_min_requests=5, idle_ratio=0.5, busy_ratio=0.95)
    assert judge(recent(builds=(BuildErrors("build 1", 100, 2, None),)), strict).startswith(
        "errors: 2%"
    )
    assert judge(recent(usage=Usage(10, 0.4, 1.0)), strict).startswith("over-provisioned: ")


@pytest.mark.parametrize(
    "bad",
    [{"error_ratio": 0}, {"idle_ratio": 1.5}, {"error_minutes": 0}, {"idle_ratio": 0.9}],
)
def test_nonsense_thresholds_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="health rule"):
        HealthRules(**bad)  # type: ignore[arg-type]


def test_secret_values_are_redacted_whole_and_however_short() -> None:
    assert redact("token=abc123 and abc", {"abc123", "abc"}) == "token=[redacted] and [redacted]"
    assert redact("nothing here", {"s3cr3t"}) == "nothing here"
    assert redact("x", set()) == "x"


OVER = "over-provisioned: replicas use 6% of 2 CPUs requested for 10 min"
DROPPING = "dropping requests: 37 refused in the last 5 min at 3/3 replicas busy"
ERRORS = "errors: 12% of requests failed on build 4 since 12:03"


def test_a_server_that_read_long_enough_says_what_it_sees() -> None:
    assert merge("ok", OVER, read_minutes=11, rules=RULES) == "ok"
    assert merge(DROPPING, f"{ERRORS}; {OVER}", read_minutes=11, rules=RULES) == DROPPING


def test_a_young_server_keeps_what_it_cannot_judge_yet() -> None:
    # Started 3 minutes ago (another server, or this one again): 10 minutes are needed to
    # say a model is over-provisioned, or that it is not.
    assert merge("ok", OVER, read_minutes=3, rules=RULES) == OVER
    assert merge(DROPPING, OVER, read_minutes=3, rules=RULES) == f"{DROPPING}; {OVER}"
    # 5 minutes judge dropping requests: after 6, its own "none" stands.
    assert merge("ok", f"{DROPPING}; {OVER}", read_minutes=6, rules=RULES) == OVER


def test_a_young_servers_own_finding_of_a_kind_replaces_the_stored_one() -> None:
    newer = "errors: 40% of requests failed on build 5 since 12:10"
    assert merge(newer, f"{ERRORS}; {OVER}", read_minutes=2, rules=RULES) == f"{newer}; {OVER}"


def test_nothing_reported_to_a_young_server_leaves_what_was_said() -> None:
    assert merge("", "ok", read_minutes=0.1, rules=RULES) == "ok"
    assert merge("", "ok", read_minutes=30, rules=RULES) == ""
    assert merge("ok", "", read_minutes=0.1, rules=RULES) == "ok"
