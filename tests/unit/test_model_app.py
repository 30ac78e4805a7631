"""A replica's work without Ray: load a built artifact's function, answer requests."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import EXAMPLES
from workers import loader
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
    with pytest.raises(LoadError) as failed:
        load_function(str(tmp_path), "model.py", "predict")
    assert failed.value.reason == "function 'predict' not found in model.py"
    with pytest.raises(LoadError, match=r"other\.py"):
        load_function(str(tmp_path), "other.py", "predict")


def test_a_load_error_is_one_marked_line_caused_by_the_models_exception(tmp_path: Path) -> None:
    """Serve shows the replica's exception inside a long message: the marked line is what
    the deployment's message keeps (loader.reason_in); the cause goes to the replica's log."""
    (tmp_path / "model.py").write_text("x = 1\nraise RuntimeError('cannot reach the store')\n")
    with pytest.raises(LoadError) as failed:
        load_function(str(tmp_path), "model.py", "predict")
    reason = "RuntimeError while importing model.py (model.py line 2): cannot reach the store"
    assert str(failed.value) == loader.MARK + reason
    assert isinstance(failed.value.__cause__, RuntimeError)
    assert loader.reason_in(f"Error:\nTraceback ...\nLoadError: {failed.value}\n") == reason
