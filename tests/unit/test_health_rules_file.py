"""`modelctl serve --health-rules FILE`: thresholds from JSON, or a clear stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.domain.health import HealthRules
from controlplane.serve_cmd import health_rules


def test_named_rules_change_and_the_others_keep_their_defaults(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text('{"error_ratio": 0.02, "provisioning_minutes": 30}')
    rules = health_rules(path)
    assert rules.error_ratio == 0.02 and rules.provisioning_minutes == 30
    assert rules.idle_ratio == HealthRules().idle_ratio
    assert health_rules(None) == HealthRules()


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('{"error_rate": 0.1}', "unknown rules ['error_rate']"),
        ('{"idle_ratio": 2}', "idle_ratio must be in (0, 1]"),
        ("[1, 2]", "one JSON object"),
        ("{not json", "Expecting property name"),
    ],
)
def test_a_wrong_file_stops_the_server_saying_why(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "rules.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        health_rules(path)
    assert str(path) in str(e.value) and said in str(e.value)


def test_a_missing_file_stops_the_server(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="No such file"):
        health_rules(tmp_path / "none.json")
