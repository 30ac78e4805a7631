"""Lock files, pip's report, runtimes: the pure parts of a build's dependencies."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers import requirements
from workers.backend import ResolvedPackage
from workers.runtime import Runtime, current, mismatch, parse


@pytest.mark.parametrize(
    "text",
    [
        "six==1.16.0\n",
        "# comment\n\nNumPy==2.1.0  # inline comment\n",
        "scikit-learn==1.5.2 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n",
        "requests[socks]==2.32.3\n--index-url https://pypi.org/simple\n",
        "pywin32==306 ; sys_platform == 'win32'\n",
        "typing-extensions===4.12.2\n",
    ],
)
def test_pinned_lock_files_pass(text: str) -> None:
    requirements.check_lock(text)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("six\n", "requirements.lock line 1: 'six' is not pinned (name==version)"),
        ("six==1.16\nnumpy>=2\n", "requirements.lock line 2: 'numpy>=2' is not pinned"),
        ("six==1.*\n", "requirements.lock line 1: 'six==1.*' is not pinned"),
        ("-r other.txt\n", "requirements.lock line 1: -r is not allowed in a lock"),
        ("-e .\n", "requirements.lock line 1: -e is not allowed in a lock"),
        ("a==1 \\\n  --hash=sha256:x\nb<2\n", "requirements.lock line 3: 'b<2' is not pinned"),
    ],
)
def test_loose_lock_files_fail_by_line(text: str, error: str) -> None:
    with pytest.raises(requirements.LockError) as e:
        requirements.check_lock(text)
    assert str(e.value).startswith(error)


def test_lock_wins_over_requirements(tmp_path: Path) -> None:
    assert requirements.find(tmp_path) is None
    (tmp_path / "requirements.txt").write_text("six\n")
    assert requirements.find(tmp_path) == requirements.Requirements("requirements.txt", False)
    (tmp_path / "requirements.lock").write_text("six==1.16.0\n")
    req = requirements.find(tmp_path)
    assert req == requirements.Requirements("requirements.lock", True)
    cmd = requirements.pip_install("py", tmp_path / "site", req, tmp_path / "r.json")
    assert cmd[:4] == ["py", "-m", "pip", "install"] and "--no-deps" in cmd
    assert cmd[-2:] == ["-r", "requirements.lock"] and "--report" in cmd


def test_resolved_from_pips_report() -> None:
    report = {
        "version": "1",
        "install": [
            {
                "metadata": {"name": "six", "version": "1.17.0"},
                "download_info": {"archive_info": {"hashes": {"sha256": "ab" * 32}}},
                "requested": True,
            },
            {
                "metadata": {"name": "Flask", "version": "3.0.0"},
                "download_info": {"archive_info": {"hash": "sha256=" + "cd" * 32}},
                "requested": False,
            },
            {"metadata": {"name": "local", "version": "0.1"}, "download_info": {"dir_info": {}}},
        ],
    }
    assert requirements.resolved(report) == (
        ResolvedPackage("Flask", "3.0.0", "cd" * 32, False),
        ResolvedPackage("local", "0.1", "", False),
        ResolvedPackage("six", "1.17.0", "ab" * 32, True),
    )


def test_runtime_round_trip_and_mismatch() -> None:
    here = current()
    assert parse(here.text()) == here and parse("") is None
    patch = Runtime(here.implementation, here.python + ".99", here.platform)
    assert mismatch(here, patch) == "", "patch releases run the same artifacts"
    other = Runtime("cpython", "3.99.0", here.platform)
    assert mismatch(here, other) == (
        f"it was built for {here.describe()} and the cluster runs cpython 3.99 on "
        f"{here.platform}; build it again on this cluster"
    )
