"""`make bench`: every benchmark in one run, one table of figures beside their anchors.

Runs each benchmark script as its own process (each starts its own servers, and the
control plane beside its anchor, in the same run), then prints one table: our figure,
the anchor's, the ratio, the target and whether it is met. Writes
bench/results/summary.json (with the machine it ran on) and bench/results/summary.md
(the table, for the README). Exits 1 if a benchmark failed to run; a missed target is
reported in the table, not as a failure.

    .venv/bin/python bench/run.py [--smoke] [--only serve rpc ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from serverproc import RESULTS, ROOT, Row

BENCHMARKS = (
    "serve",
    "models",
    "signals",
    "rpc",
    "pgreads",
    "operations",
    "watchers",
    "records",
    "builds",
    "console",
    "traffic",
    "autoscale",
    "artifacts",
    "big_build",
)


def machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "ray": metadata.version("ray"),
        "grpcio": metadata.version("grpcio"),
    }


def run_one(name: str, smoke: bool) -> tuple[bool, float]:
    """Runs bench/<name>.py, its output shown as it goes; (succeeded, seconds)."""
    print(f"\n=== {name}{' (smoke)' if smoke else ''}", flush=True)
    started = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), *(["--smoke"] if smoke else [])]
    done = subprocess.run(cmd, check=False)
    return done.returncode == 0, time.perf_counter() - started


def fmt(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 1 else f"{value:.2f}"


def table(rows: list[tuple[str, Row]]) -> list[str]:
    lines = [
        "| benchmark | figure | ours | anchor | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(
            f"| {name} | {r.figure} | {fmt(r.ours)} | {fmt(r.anchor)} | {fmt(r.ratio)} "
            f"| {r.target} | {met} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: every benchmark in minutes")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = p.parse_args()
    rows: list[tuple[str, Row]] = []
    runs: dict[str, Any] = {}
    failed = []
    for name in args.only:
        ok, seconds = run_one(name, args.smoke)
        runs[name] = {"ok": ok, "seconds": round(seconds, 1)}
        if not ok:
            failed.append(name)
            continue
        result = json.loads((RESULTS / f"{name}.json").read_text())
        runs[name]["result"] = result
        rows.extend((name, r) for r in importlib.import_module(name).summary(result))
    lines = table(rows)
    print("\n" + "\n".join(lines))
    missed = [f"{n}: {r.figure}" for n, r in rows if r.met is False]
    print(f"\ntargets: {sum(r.met is True for _, r in rows)} met, {len(missed)} missed")
    summary = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "machine": machine(),
        "rows": [{"benchmark": n, **r.__dict__, "ratio": r.ratio} for n, r in rows],
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    m = summary["machine"]
    header = (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"Ray {m['ray']}, grpcio {m['grpcio']}; {summary['time']}"
        f"{' (smoke sizes)' if args.smoke else ''}"
    )
    (RESULTS / "summary.md").write_text(header + "\n\n" + "\n".join(lines) + "\n")
    if failed:
        raise SystemExit(f"benchmarks that did not run to the end: {', '.join(failed)}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
