"""A benchmark's smoke run from the tests: `bench/NAME.py --smoke` under a deadline, its
figures read back from bench/results/NAME.json; or several in one table (bench/run.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from tests.helpers import ROOT


def smoke_figures(name: str, deadline_s: float = 360) -> dict[str, Any]:
    """Runs the benchmark's smoke; past ``deadline_s`` it gets SIGTERM, so that it stops
    its own Ray cluster on the way out, and the test fails saying so."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--smoke"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=50)
        raise AssertionError(
            f"bench/{name}.py --smoke took over {deadline_s:g} s: {out[-2000:]}"
        ) from None
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    loaded: dict[str, Any] = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
    return loaded


def smoke_table(names: Sequence[str], deadline_s: float) -> subprocess.CompletedProcess[str]:
    """`bench/run.py --smoke --only NAMES`: each benchmark's smoke, then one table of
    their figures; the test fails unless every one ran."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--only", *names],
        capture_output=True,
        text=True,
        timeout=deadline_s,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| benchmark | figure | ours | anchor | ratio | target | met |" in done.stdout
    return done
