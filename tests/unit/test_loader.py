"""One loader (workers.loader) for the build's check, a replica and the exported image:
each model case loads, or fails with the same one line, in all three."""

from __future__ import annotations

import ast
import http.client
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.model_cases import (
    BODY,
    CASES,
    FUNCTION,
    Case,
    write_artifact,
    write_image_server,
)
from workers import image_server, import_check, loader
from workers.model_app import LoadError, invoke, load_function

SRC = Path(__file__).resolve().parents[2] / "src"
IDS = [case.name for case in CASES]
CHECK = [sys.executable, "-I", "-B", "-m", import_check.__name__]  # as the build runs it


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    """Loading in this process changes sys.path, sys.modules and the working directory,
    as it does in a replica: put them back."""
    path, modules, cwd = list(sys.path), set(sys.modules), os.getcwd()
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    os.chdir(cwd)


# --------------------------------------------------------------------------- in process


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_loader_loads_each_case_or_says_why_in_one_line(tmp_path: Path, case: Case) -> None:
    root = write_artifact(tmp_path / "artifact", case)
    if case.error:
        with pytest.raises(loader.LoadFailed) as failed:
            loader.load(str(root), case.file_path, FUNCTION)
        assert failed.value.reason == str(failed.value) == case.error
        assert failed.value.__cause__ is not None, "the model's own exception, for the log"
    else:
        fn = loader.load(str(root), case.file_path, FUNCTION)
        assert fn(BODY) == case.response


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_replica_loads_each_case_the_same_way(tmp_path: Path, case: Case) -> None:
    root = write_artifact(tmp_path / "artifact", case)
    if case.error:
        with pytest.raises(LoadError) as failed:
            load_function(str(root), case.file_path, FUNCTION)
        assert str(failed.value) == loader.MARK + case.error
        assert failed.value.reason == case.error
    else:
        fn = load_function(str(root), case.file_path, FUNCTION)
        reply = invoke(fn, json.dumps(BODY).encode(), "r", "b")
        assert reply.status == 200 and json.loads(reply.body)["response"] == case.response


def test_sys_path_and_working_directory(tmp_path: Path) -> None:
    root = write_artifact(tmp_path / "artifact", CASES[0])
    loader.load(str(root), "serve/model.py", FUNCTION)
    assert sys.path[:3] == [str(root / "serve"), str(root), str(root / ".cp_site")]
    assert os.getcwd() == str(root)
    module = sys.modules[loader.module_name("serve/model.py")]
    assert module.__name__ == "_cp_model_serve_model" and module.__package__ == ""
    loader.load(str(root), "serve/model.py", FUNCTION)  # again: each entry once
    assert sys.path.count(str(root)) == 1


def test_relative_imports_inside_a_package_of_the_model_work(tmp_path: Path) -> None:
    """Only the loaded file has no package; a package it imports is a package."""
    (tmp_path / "mylib").mkdir()
    (tmp_path / "mylib" / "__init__.py").write_text("")
    (tmp_path / "mylib" / "tokenize.py").write_text("from . import vocab\nWORDS = vocab.WORDS\n")
    (tmp_path / "mylib" / "vocab.py").write_text("WORDS = ['a', 'b']\n")
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "model.py").write_text(
        "from mylib import tokenize\n\ndef predict(body):\n    return tokenize.WORDS\n"
    )
    assert loader.load(str(tmp_path), "serve/model.py", FUNCTION)(None) == ["a", "b"]


def test_missing_and_not_callable_functions(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text("predict = 3\n")
    with pytest.raises(loader.LoadFailed, match=r"^'predict' in model.py is not callable"):
        loader.load(str(tmp_path), "model.py", "predict")
    with pytest.raises(loader.LoadFailed, match=r"^function 'other' not found in model.py$"):
        loader.load(str(tmp_path), "model.py", "other")
    with pytest.raises(loader.LoadFailed, match=r"^nope.py is not in the artifact "):
        loader.load(str(tmp_path), "nope.py", "predict")


def test_errors_name_the_models_own_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "model.py").write_text("import helper\n")
    (tmp_path / "serve" / "helper.py").write_text("x = 1\nraise ValueError('no weights')\n")
    with pytest.raises(loader.LoadFailed) as failed:
        loader.load(str(tmp_path), "serve/model.py", FUNCTION)
    assert failed.value.reason == (
        "ValueError while importing serve/model.py (serve/helper.py line 2): no weights"
    )
    (tmp_path / "serve" / "helper.py").write_text("def broken(:\n")
    with pytest.raises(loader.LoadFailed, match=r"^SyntaxError in serve/helper.py line 1: "):
        loader.load(str(tmp_path), "serve/model.py", FUNCTION)


def test_the_marked_line_is_found_in_serves_deployment_message() -> None:
    line = "ImportError in serve/model.py line 3: attempted relative import with no known parent"
    message = (
        "The deployment failed to start 3 times in a row. This may be due to a problem "
        "with its constructor or initial health check failing. See controller logs for "
        "details. Error:\nTraceback (most recent call last):\n"
        '  File "/home/ray/ray/serve/_private/replica.py", line 1021, in initialize\n'
        "    await self._user_callable_wrapper.initialize_callable()\n"
        f"workers.model_app.LoadError: {loader.MARK}{line}\n"
    )
    assert loader.reason_in(message) == line
    assert loader.reason_in(str(LoadError(line))) == line
    other = "Deployment 'model' has 1 replicas that could not be scheduled."
    assert loader.reason_in(other) == other  # anything else stays as it is


def test_the_image_files_need_only_the_standard_library() -> None:
    """The image runs them on its base's Python, where no workers package exists."""
    for module in (loader, image_server):
        path = Path(str(module.__file__))
        tree = ast.parse(path.read_text(), feature_version=(3, 8))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        outside = {
            n for n in names if n.split(".")[0] not in sys.stdlib_module_names | {"__future__"}
        }
        # image_server imports workers.loader only in this repository (beside it otherwise)
        assert outside <= {"workers"}, (path.name, outside)


# --------------------------------------------------------------------------- the check


def run_check(root: Path, case: Case) -> dict[str, object]:
    """The check's JSON result for ``case`` in the artifact ``root``."""
    done = subprocess.run(
        [*CHECK, str(root), case.file_path, FUNCTION],
        cwd=root,
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    if case.error:
        assert "Traceback (most recent call last)" in done.stderr, "the log gets the traceback"
    return result


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_import_check_loads_each_case_the_same_way(tmp_path: Path, case: Case) -> None:
    root = write_artifact(tmp_path / "artifact", case)
    expected = {"ok": False, "error": case.error} if case.error else {"ok": True}
    assert run_check(root, case) == expected
    assert not list(root.rglob("__pycache__")), "-B: no bytecode in the artifact"


def test_the_import_check_reports_on_stdout_only(tmp_path: Path) -> None:
    """What the model prints goes to stderr (the build log), and its threads do not
    keep the check running."""
    (tmp_path / "model.py").write_text(
        "import threading, time\n"
        "print('hello from the model')\n"
        "threading.Thread(target=time.sleep, args=(600,)).start()\n"
        "def predict(body):\n    return body\n"
    )
    done = subprocess.run(
        [*CHECK, str(tmp_path), "model.py", "predict"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(done.stdout) == {"ok": True}
    assert "hello from the model" in done.stderr


# --------------------------------------------------------------------------- the image


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_image_server_loads_each_case_the_same_way(tmp_path: Path, case: Case) -> None:
    """The image's own files (.cp_serve.py and .cp_loader.py), run with only the stdlib."""
    root = write_artifact(tmp_path / "artifact", case)
    script = write_image_server(tmp_path / "image")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CP_MODEL_ROOT": str(root),
        "CP_MODEL_FILE": case.file_path,
        "CP_MODEL_FUNCTION": FUNCTION,
        "CP_HOST": "127.0.0.1",
        "PORT": "0",
    }
    with subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", str(script)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            if case.error:
                _out, err = proc.communicate(timeout=60)
                assert proc.returncode == 1
                assert err.splitlines()[-1] == f"cannot load {case.file_path}:predict: {case.error}"
                assert "Traceback (most recent call last)" in err
                return
            assert proc.stdout is not None
            first = proc.stdout.readline()
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", first)
            assert found, (first, proc.stderr.read() if proc.stderr else "")
            status, body = post(int(found.group(1)), BODY)
            assert status == 200 and body["response"] == case.response, body
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def post(port: int, body: object) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/", body=json.dumps(body), headers={"Content-Type": "text/json"})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()
