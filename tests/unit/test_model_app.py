"""A replica's work without Ray: load a built artifact's function, answer requests."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES
from workers.model_app import LoadError, invoke, load_function


@pytest.fixture(autouse=True)
def _keep_cwd() -> Iterator[None]:
    cwd = os.getcwd()
    yield
    os.chdir(cwd)  # load_function moves into the artifact, as a replica does


def test_iris_classifier_answers_in_the_contracts_shape() -> None:
    fn = load_function(str(EXAMPLES / "iris-v2"), "model.py", "classify")
    build = "projects/p/models/m/builds/2"
    reply = invoke(fn, b'{"features": [[5.1, 3.5, 1.4, 0.2]]}', "r1", build)
    body = json.loads(reply.body)
    assert reply.status == 200
    assert body["success"] is True and body["replica_id"] == "r1"
    assert body["build"] == build
    assert body["response"]["classes"] == ["setosa"] and body["response"]["version"] == 2


def test_user_errors_are_500_with_the_cause_and_bad_json_is_400(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(
        "import numpy as np\n"
        "def predict(body):\n"
        "    if body == 'boom':\n"
        "        raise ValueError('no such feature')\n"
        "    return np.arange(3)\n"
    )
    fn = load_function(str(tmp_path), "model.py", "predict")
    ok = invoke(fn, b"{}", "r", "b")
    assert ok.status == 200 and json.loads(ok.body)["response"] == [0, 1, 2]  # numpy -> list
    err = invoke(fn, b'"boom"', "r", "b")
    assert err.status == 500
    body = json.loads(err.body)
    assert body["success"] is False and "ValueError: no such feature" in body["error"]
    assert "model.py:4" in body["error"]
    bad = invoke(fn, b"{not json", "r", "b")
    assert bad.status == 400 and "not JSON" in json.loads(bad.body)["error"]


def test_loading_a_missing_function_or_file_says_which(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text("VALUE = 1\n")
    with pytest.raises(LoadError, match="no callable 'predict'"):
        load_function(str(tmp_path), "model.py", "predict")
    with pytest.raises(LoadError, match=r"other\.py"):
        load_function(str(tmp_path), "other.py", "predict")
