"""A build on a node that does not see the control plane's disk (``workers.remote_build``):
the task gets its source as bytes, builds in a scratch folder of its own, and what it
returns lands where a build on the disk would have left it: the artifact under its
digest, its archive beside it, the build-cache entry, the log lines (sent while the build
runs, so a reader follows it live)."""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import gated
from workers import artifact_archive
from workers.backend import BuildSpec
from workers.builder import cached_build, run_build
from workers.remote_build import BuildResult, append_log, build_streamed, keep, sees
from workers.runtime import current

MODEL = "import helper\n\ndef predict(body):\n    return {'echo': helper.twice(body)}\n"


def source_zip(path: Path, model: str = MODEL) -> bytes:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model.py", model)
        z.writestr("helper.py", "def twice(x):\n    return [x, x]\n")
    return path.read_bytes()


def build_away(server_spec: BuildSpec, elsewhere: BuildSpec, source: bytes) -> BuildResult:
    """The task run to its end, as the driver takes it: each log message appended to the
    server's log on arrival (the log grows while the build runs), the result last."""
    result = None
    messages: list[bytes] = []
    for item in build_streamed(elsewhere, source):
        assert result is None, "the result comes last"
        if isinstance(item, bytes):
            append_log(server_spec, item)
            messages.append(item)
        else:
            result = item
    assert result is not None and messages
    return result


def on_server(tmp_path: Path, function: str = "predict") -> tuple[Path, bytes, BuildSpec]:
    """The server's folders with an uploaded source, and the build's spec for it."""
    server = tmp_path / "server"
    (server / "sources").mkdir(parents=True)
    (server / "artifacts").mkdir()
    source = source_zip(server / "sources" / "src.zip")
    return server, source, spec(server, source, function)


def spec(server: Path, source: bytes, function: str = "predict") -> BuildSpec:
    """The spec as the control plane makes it: paths on ITS disk."""
    return BuildSpec(
        build_name="projects/p/models/m/builds/1",
        source_zip=server / "sources" / "src.zip",
        file_path="model.py",
        function_name=function,
        artifacts_dir=server / "artifacts",
        log_path=server / "logs" / "build.log",
        timeout_s=120,
        source_sha256=hashlib.sha256(source).hexdigest(),
    )


def test_a_build_away_from_the_disk_lands_as_one_on_it(tmp_path: Path) -> None:
    server, source, wanted = on_server(tmp_path)
    elsewhere = dataclasses.replace(
        wanted,
        source_zip=tmp_path / "hidden" / "src.zip",
        artifacts_dir=tmp_path / "hidden" / "artifacts",
        log_path=tmp_path / "hidden" / "build.log",
    )
    assert not sees(elsewhere) and sees(wanted)

    result = build_away(wanted, elsewhere, source)  # on the other node: its paths do not exist
    assert result.outcome.ok and result.archive and result.cache_entries, result.outcome.error
    assert not (tmp_path / "hidden").exists(), "nothing is written where the server's disk is"
    outcome = keep(wanted, result)  # in the driver, with the server's paths

    digest = Path(outcome.artifact_path).name
    assert outcome.ok and Path(outcome.artifact_path) == (server / "artifacts" / digest).resolve()
    assert (server / "artifacts" / digest / "helper.py").is_file()
    assert artifact_archive.archived_sha256(server / "artifacts", digest) == result.archive_sha256
    log = (server / "logs" / "build.log").read_text()
    assert "step 4/4: store the artifact" in log and "build succeeded" in log
    # The same inputs built on the disk now: the cache entry it returned answers.
    cached = cached_build(wanted, current())
    assert cached is not None and cached.cache_hit and cached.artifact_path == outcome.artifact_path
    # And built on the disk itself, the same digest (same inputs, same content address).
    on_disk = run_build(dataclasses.replace(wanted, no_cache=True))
    assert Path(on_disk.artifact_path).name == digest


def test_a_failed_build_away_from_the_disk_keeps_its_log_and_nothing_else(
    tmp_path: Path,
) -> None:
    server, source, wanted = on_server(tmp_path, function="nope")
    elsewhere = dataclasses.replace(wanted, artifacts_dir=tmp_path / "hidden")
    result = build_away(wanted, elsewhere, source)
    assert not result.outcome.ok and "nope" in result.outcome.error and not result.archive
    outcome = keep(wanted, result)
    assert not outcome.ok
    assert "build FAILED" in (server / "logs" / "build.log").read_text()
    assert [p.name for p in (server / "artifacts").iterdir()] == []


def test_a_damaged_archive_is_not_kept(tmp_path: Path) -> None:
    server, source, wanted = on_server(tmp_path)
    elsewhere = dataclasses.replace(wanted, artifacts_dir=tmp_path / "x")
    result = build_away(wanted, elsewhere, source)
    bad = dataclasses.replace(result, archive=result.archive[:-1] + b"!")
    outcome = keep(wanted, bad)
    assert not outcome.ok and "damaged" in outcome.error
    assert [p.name for p in (server / "artifacts").iterdir() if not p.name.startswith(".")] == []


def until_the_import_check(task: Iterator[bytes | BuildResult]) -> bytes:
    """The log messages the task sends until the build is at its import check (step 3/4);
    their bytes together. Messages come every POLL_S with whatever lines were new."""
    sent = b""
    for item in task:
        assert isinstance(item, bytes), "the result came before the import check"
        sent += item
        if b"step 3/4" in sent:
            return sent
    raise AssertionError(f"the task ended without reaching its import check: {sent!r}")


def test_the_log_comes_while_the_build_runs(tmp_path: Path) -> None:
    server = tmp_path / "server"
    (server / "sources").mkdir(parents=True)
    gate = tmp_path / "gate"
    source = source_zip(server / "sources" / "src.zip", gated(gate, MODEL))
    elsewhere = dataclasses.replace(spec(server, source), artifacts_dir=tmp_path / "hidden")
    task = build_streamed(elsewhere, source)
    try:
        sent = until_the_import_check(task)
        assert b"build succeeded" not in sent, "sent while the import check still runs"
    finally:
        gate.touch()  # the import goes on
    rest = list(task)
    assert isinstance(rest[-1], BuildResult) and rest[-1].outcome.ok, rest[-1]
    assert any(isinstance(m, bytes) and b"build succeeded" in m for m in rest[:-1])


def test_closing_the_task_stops_the_build_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = tmp_path / "server"
    (server / "sources").mkdir(parents=True)
    never = tmp_path / "never"  # the import waits until the task is closed
    source = source_zip(server / "sources" / "src.zip", gated(never, MODEL))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    elsewhere = dataclasses.replace(spec(server, source), artifacts_dir=tmp_path / "hidden")
    task = build_streamed(elsewhere, source)
    until_the_import_check(task)
    started = time.monotonic()
    task.close()  # what Ray's cancel does to the generator (it raises in it)
    assert time.monotonic() - started < 30, "the import check was stopped, not waited for"
    assert list(scratch.iterdir()) == [], "the scratch folder went"
