"""run_build for real: small zips in tmp_path, a real pip, a real import check."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.model_cases import CASES, FUNCTION, Case, source_files, zip_source
from workers.archive import zip_directory
from workers.backend import BuildOutcome, BuildSpec
from workers.builder import MANIFEST, SITE_DIR, STAGING_DIR, cached_build, run_build
from workers.runtime import Runtime, current

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODEL = "def predict(body):\n    return {'echo': body}\n"
NO_SUCH_PACKAGE = "this-package-does-not-exist-cp-test==0.0.1"


def make_zip(tmp_path: Path, files: dict[str, str], name: str = "src.zip") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
    return path


def spec_for(
    tmp_path: Path,
    source: Path,
    file_path: str = "model.py",
    function_name: str = "predict",
    timeout_s: float = 120.0,
    log_name: str = "build.log",
    **more: Any,
) -> BuildSpec:
    return BuildSpec(
        build_name="projects/p/models/m/builds/1",
        source_zip=source,
        file_path=file_path,
        function_name=function_name,
        artifacts_dir=tmp_path / "artifacts",
        log_path=tmp_path / "logs" / log_name,
        timeout_s=timeout_s,
        source_sha256=hashlib.sha256(source.read_bytes()).hexdigest(),
        **more,
    )


def build(
    tmp_path: Path,
    files: dict[str, str],
    file_path: str = "model.py",
    function_name: str = "predict",
) -> BuildOutcome:
    return run_build(spec_for(tmp_path, make_zip(tmp_path, files), file_path, function_name))


def artifacts(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "artifacts").iterdir() if not p.name.startswith("."))


def assert_failed_cleanly(tmp_path: Path, outcome: BuildOutcome) -> None:
    assert not outcome.ok
    assert outcome.image == outcome.artifact_path == ""
    assert "\n" not in outcome.error and outcome.error
    assert list((tmp_path / "artifacts" / STAGING_DIR).iterdir()) == [], "staging is cleaned"
    assert artifacts(tmp_path) == [], "no artifact is left behind"
    log = (tmp_path / "logs" / "build.log").read_text()
    assert "build FAILED after" in log and outcome.error in log


def test_success_is_content_addressed(tmp_path: Path) -> None:
    source = make_zip(tmp_path, {"model.py": MODEL, "pkg/util.py": "X = 1\n"})
    first = run_build(spec_for(tmp_path, source))
    assert first.ok, first.error
    assert first.error == ""
    match = re.fullmatch(r"artifact://sha256:([0-9a-f]{64})", first.image)
    assert match
    final = Path(first.artifact_path)
    assert final.is_absolute() and final == (tmp_path / "artifacts" / match[1]).resolve()
    assert (final / "model.py").read_text() == MODEL
    assert (final / "pkg" / "util.py").is_file()
    assert not (final / "__pycache__").exists(), "the import check writes no bytecode"
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["site_files"] == [] and len(manifest["source_sha256"]) == 64

    again = run_build(spec_for(tmp_path, source, log_name="again.log"))
    assert (again.image, again.artifact_path) == (first.image, first.artifact_path)
    assert "exists already" in (tmp_path / "logs" / "again.log").read_text()
    assert artifacts(tmp_path) == [match[1]]
    assert list((tmp_path / "artifacts" / STAGING_DIR).iterdir()) == []

    other = make_zip(tmp_path, {"model.py": MODEL + "# changed\n"}, name="other.zip")
    changed = run_build(spec_for(tmp_path, other, log_name="changed.log"))
    assert changed.ok and changed.image != first.image


def test_log_has_the_steps(tmp_path: Path) -> None:
    source = make_zip(tmp_path, {"model.py": "print('hello from the model')\n" + MODEL})
    outcome = run_build(spec_for(tmp_path, source))
    assert outcome.ok, outcome.error
    lines = (tmp_path / "logs" / "build.log").read_text().splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
    assert all(re.match(stamp, line) for line in lines)
    text = "\n".join(lines)
    for step in (
        "build projects/p/models/m/builds/1: model.py:predict",
        "step 1/4: extract source",
        "extracted 1 files",
        "step 2/4: install requirements",
        "no requirements.txt",
        "step 3/4: import model.py",
        "import | hello from the model",
        "step 4/4: store the artifact",
        "build succeeded in",
        outcome.image,
    ):
        assert step in text


def test_missing_function_is_named(tmp_path: Path) -> None:
    outcome = build(tmp_path, {"model.py": MODEL}, function_name="classify")
    assert outcome.error == "function 'classify' not found in model.py"
    assert_failed_cleanly(tmp_path, outcome)


def test_not_callable(tmp_path: Path) -> None:
    outcome = build(tmp_path, {"model.py": "predict = 3\n"})
    assert outcome.error == "'predict' in model.py is not callable (it is a int)"
    assert_failed_cleanly(tmp_path, outcome)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    outcome = build(tmp_path, {"model.py": "x = 1\n\ndef predict(:\n    pass\n"})
    assert outcome.error.startswith("SyntaxError in model.py line 3: ")
    assert_failed_cleanly(tmp_path, outcome)


def test_syntax_error_in_an_imported_module(tmp_path: Path) -> None:
    files = {"app/model.py": "from app import helper\n" + MODEL, "app/helper.py": "if True\n"}
    outcome = build(tmp_path, files, file_path="app/model.py")
    assert outcome.error.startswith("SyntaxError in app/helper.py line 1: ")
    assert_failed_cleanly(tmp_path, outcome)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_the_check_loads_as_a_replica_will(tmp_path: Path, case: Case) -> None:
    """workers.loader's cases: a sibling import, a data file and a requirement (installed
    from requirements.txt into .cp_site) build; a package-relative import fails the build
    in one line, as it would fail every replica."""
    source = tmp_path / "src.zip"
    source.write_bytes(zip_source(source_files(case)))
    outcome = run_build(spec_for(tmp_path, source, case.file_path, FUNCTION))
    if case.error:
        assert outcome.error == case.error
        assert_failed_cleanly(tmp_path, outcome)
        return
    assert outcome.ok, outcome.error
    if case.site:
        assert [(p.name, p.version) for p in outcome.packages] == [("tinypkg", "1.0")]
        assert (Path(outcome.artifact_path) / SITE_DIR / "tinypkg" / "__init__.py").is_file()


def test_import_error(tmp_path: Path) -> None:
    outcome = build(tmp_path, {"model.py": "import cp_missing_module_xyz\n" + MODEL})
    assert outcome.error == "ImportError in model.py: No module named 'cp_missing_module_xyz'"
    assert_failed_cleanly(tmp_path, outcome)
    assert "Traceback" in (tmp_path / "logs" / "build.log").read_text()


def test_exception_at_import(tmp_path: Path) -> None:
    outcome = build(tmp_path, {"model.py": "x = 1\nraise ValueError('no weights')\n"})
    assert outcome.error == "ValueError while importing model.py (model.py line 2): no weights"
    assert_failed_cleanly(tmp_path, outcome)


def test_exit_at_import(tmp_path: Path) -> None:
    outcome = build(tmp_path, {"model.py": "import os\nos._exit(3)\n"})
    assert outcome.error.startswith("importing model.py ended with status 3 and no result")
    assert_failed_cleanly(tmp_path, outcome)


def test_missing_file_path(tmp_path: Path) -> None:
    outcome = build(tmp_path, {"model.py": MODEL}, file_path="other.py")
    assert outcome.error == "file_path 'other.py' not found in the source"
    assert_failed_cleanly(tmp_path, outcome)


def test_bad_file_path(tmp_path: Path) -> None:
    outcome = build(tmp_path, {"model.py": MODEL}, file_path="../model.py")
    assert outcome.error == "file_path '../model.py' contains a '..' component"
    assert_failed_cleanly(tmp_path, outcome)


def test_unsafe_archive_is_never_extracted(tmp_path: Path) -> None:
    outcome = build(tmp_path, {"model.py": MODEL, "../evil.py": "x"})
    assert outcome.error == "rejected source archive: entry '../evil.py' contains a '..' component"
    assert_failed_cleanly(tmp_path, outcome)
    assert not (tmp_path / "evil.py").exists()


def test_failed_requirement_offline(tmp_path: Path) -> None:
    files = {"model.py": MODEL, "requirements.txt": f"--no-index\n{NO_SUCH_PACKAGE}\n"}
    outcome = build(tmp_path, files)
    assert outcome.error.startswith("requirement failed: ")
    assert NO_SUCH_PACKAGE in outcome.error
    assert_failed_cleanly(tmp_path, outcome)
    assert "pip | ERROR:" in (tmp_path / "logs" / "build.log").read_text()


def test_invalid_requirement_line(tmp_path: Path) -> None:
    outcome = build(tmp_path, {"model.py": MODEL, "requirements.txt": "not a requirement!!\n"})
    assert outcome.error.startswith("requirement failed: ")
    assert_failed_cleanly(tmp_path, outcome)


def test_timeout_kills_the_import(tmp_path: Path) -> None:
    source = make_zip(tmp_path, {"model.py": "import time\ntime.sleep(60)\n"})
    started = time.monotonic()
    outcome = run_build(spec_for(tmp_path, source, timeout_s=1.5))
    assert time.monotonic() - started < 10
    assert outcome.error == "build timed out after 1.5 s while importing model.py"
    assert_failed_cleanly(tmp_path, outcome)


def test_cancel(tmp_path: Path) -> None:
    source = make_zip(tmp_path, {"model.py": "import time\ntime.sleep(60)\n"})
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    outcome = run_build(spec_for(tmp_path, source), cancel=cancel)
    assert time.monotonic() - started < 10
    assert outcome.error == "build cancelled while importing model.py"
    assert_failed_cleanly(tmp_path, outcome)


@pytest.mark.parametrize(("folder", "function"), [("iris-v1", "predict"), ("iris-v2", "classify")])
def test_examples_build(tmp_path: Path, folder: str, function: str) -> None:
    source = tmp_path / f"{folder}.zip"
    zip_directory(EXAMPLES / folder, source)
    outcome = run_build(spec_for(tmp_path, source, function_name=function))
    assert outcome.ok, outcome.error


def test_renamed_entry_function_fails_by_name(tmp_path: Path) -> None:
    source = tmp_path / "iris-v2.zip"
    zip_directory(EXAMPLES / "iris-v2", source)
    outcome = run_build(spec_for(tmp_path, source, function_name="predict"))
    assert outcome.error == "function 'predict' not found in model.py"
    assert_failed_cleanly(tmp_path, outcome)


@pytest.mark.network
def test_failed_requirement_from_the_index(tmp_path: Path) -> None:
    outcome = build(tmp_path, {"model.py": MODEL, "requirements.txt": f"{NO_SUCH_PACKAGE}\n"})
    assert outcome.error.startswith("requirement failed: ")
    assert NO_SUCH_PACKAGE in outcome.error
    assert_failed_cleanly(tmp_path, outcome)


@pytest.mark.network
def test_requirement_is_installed_and_importable(tmp_path: Path) -> None:
    model = "import six\n\ndef predict(body):\n    return {'six': six.__file__}\n"
    source = make_zip(tmp_path, {"model.py": model, "requirements.txt": "six==1.17.0\n"})
    outcome = run_build(spec_for(tmp_path, source))
    assert outcome.ok, outcome.error
    final = Path(outcome.artifact_path)
    assert (final / SITE_DIR / "six.py").is_file()
    site_files = [name for name, _ in json.loads((final / MANIFEST).read_text())["site_files"]]
    assert "six.py" in site_files
    log = (tmp_path / "logs" / "build.log").read_text()
    assert "pip | Successfully installed six-1.17.0" in log
    # What pip resolved is recorded, with the sha256 of the file the index served.
    (six,) = outcome.packages
    assert (six.name, six.version, six.requested) == ("six", "1.17.0", True)
    assert re.fullmatch(r"[0-9a-f]{64}", six.sha256)
    assert f"resolved six==1.17.0 sha256:{six.sha256}" in log
    assert not (final / ".cp_pip_report.json").exists()

    again = run_build(spec_for(tmp_path, source, log_name="again.log", no_cache=True))
    assert again.image == outcome.image, "the same resolution gives the same digest"
    assert (
        "pip | Successfully installed six-1.17.0" in (tmp_path / "logs" / "again.log").read_text()
    )


@pytest.mark.network
def test_lock_file_installs_exactly_what_it_pins(tmp_path: Path) -> None:
    """requirements.lock wins over requirements.txt and installs with --no-deps."""
    model = "import six\n\ndef predict(body):\n    return six.__version__\n"
    files = {
        "model.py": model,
        "requirements.txt": "six\n",
        "requirements.lock": "# pinned\nsix==1.16.0 \\\n    --hash=sha256:"
        "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254\n",
    }
    outcome = build(tmp_path, files)
    assert outcome.ok, outcome.error
    assert [(p.name, p.version) for p in outcome.packages] == [("six", "1.16.0")]
    log = (tmp_path / "logs" / "build.log").read_text()
    assert "requirements.lock: every requirement pinned" in log and "--no-deps" in log


def test_lock_file_with_a_loose_requirement_fails_by_line(tmp_path: Path) -> None:
    files = {"model.py": MODEL, "requirements.lock": "six==1.16.0\n\nnumpy>=1\n"}
    outcome = build(tmp_path, files)
    assert outcome.error == "requirements.lock line 3: 'numpy>=1' is not pinned (name==version)"
    assert_failed_cleanly(tmp_path, outcome)


def test_size_limit(tmp_path: Path) -> None:
    files = {"model.py": MODEL, "weights.bin": "x" * (2 * 1024 * 1024)}
    source = make_zip(tmp_path, files)
    outcome = run_build(spec_for(tmp_path, source, max_size_bytes=1024 * 1024))
    assert outcome.error == (
        "the build is 2.0 MiB, over the limit of 1 MiB (code and installed requirements)"
    )
    assert_failed_cleanly(tmp_path, outcome)


def test_runtime_and_size_are_recorded(tmp_path: Path) -> None:
    outcome = build(tmp_path, {"model.py": MODEL})
    assert outcome.runtime == current().text()
    assert outcome.size_bytes >= len(MODEL) and not outcome.cache_hit
    manifest = json.loads((Path(outcome.artifact_path) / MANIFEST).read_text())
    assert manifest["runtime"] == current().text() and manifest["packages"] == []


def test_unchanged_rebuild_is_a_cache_hit(tmp_path: Path) -> None:
    source = make_zip(tmp_path, {"model.py": MODEL})
    first = run_build(spec_for(tmp_path, source))
    assert first.ok, first.error
    spec = spec_for(tmp_path, source, log_name="again.log")
    hit = cached_build(spec, current())
    assert hit is not None and hit.cache_hit
    assert (hit.image, hit.artifact_path, hit.runtime) == (
        first.image,
        first.artifact_path,
        first.runtime,
    )
    log = (tmp_path / "logs" / "again.log").read_text()
    assert "cache hit: the same source, requirements and runtime were built by" in log
    assert "build succeeded (cached)" in log and "step 2/4" not in log


def test_what_misses_the_cache(tmp_path: Path) -> None:
    source = make_zip(tmp_path, {"model.py": MODEL + "def other(body):\n    return 1\n"})
    assert run_build(spec_for(tmp_path, source)).ok
    other_python = Runtime("cpython", "3.99.0", current().platform)
    assert cached_build(spec_for(tmp_path, source, function_name="other"), current()) is None
    assert cached_build(spec_for(tmp_path, source), other_python) is None
    assert cached_build(spec_for(tmp_path, source, no_cache=True), current()) is None
    changed = make_zip(tmp_path, {"model.py": MODEL + "# changed\n"}, name="changed.zip")
    assert cached_build(spec_for(tmp_path, changed), current()) is None
    for artifact in artifacts(tmp_path):  # collected since: build again
        shutil.rmtree(tmp_path / "artifacts" / artifact)
    assert cached_build(spec_for(tmp_path, source), current()) is None


def test_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_zip(tmp_path, {"model.py": MODEL})
    spec = BuildSpec("b", Path("src.zip"), "model.py", "predict", Path("arts"), Path("b.log"))
    outcome = run_build(spec)
    assert outcome.ok, outcome.error
    assert Path(outcome.artifact_path).is_absolute()
    assert Path(outcome.artifact_path).parent == tmp_path / "arts"
    assert (Path(outcome.artifact_path).stat().st_mode & 0o777) == 0o755


def test_leftover_background_process_is_killed(tmp_path: Path) -> None:
    """A model that leaves a child holding the output does not hang the build."""
    model = "import subprocess, sys\nsubprocess.Popen(['sleep', '60'])\n" + MODEL
    started = time.monotonic()
    outcome = build(tmp_path, {"model.py": model})
    assert outcome.ok, outcome.error
    assert time.monotonic() - started < 10
