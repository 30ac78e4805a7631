"""Judges every canary and shadow rollout's step from its builds' figures, once a second.

The loop only reads and writes: the rollouts in a step (``OperationRow.rollout`` in phase
BAKING), each build's requests, errors and p99 over the step from the signals' window
(``signals.Signals.series``, by build), then ``traffic.step_judged`` records the figures
and waits, steps on, promotes or rolls back. Every server of a database runs it; their
writes are serialized and a step already taken is not taken again. A restarted server
resumes each rollout at its recorded step; its window starts empty, so a step's gates are
judged on the figures gathered since (``min_requests`` again), and its bake goes on from
the recorded start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

from sqlmodel import col, select

from controlplane.domain.figures import Series
from controlplane.domain.traffic import Phase, StepFigures, record_from_json
from controlplane.lifecycle import traffic
from controlplane.series import STEP_S
from controlplane.signals import Signals
from controlplane.storage import repo
from controlplane.storage.changes import Changes, now
from controlplane.storage.db import Database
from controlplane.storage.tables import OperationRow

log = logging.getLogger(__name__)


def step_figures(series: Series | None) -> StepFigures:
    """A build's figures over the step (none yet: zeros)."""
    if series is None:
        return StepFigures()
    t = series.totals
    return StepFigures(t.requests, t.errors, t.latency_p99_ms)


class Rollouts:
    def __init__(
        self, db: Database, signals: Signals, http_base: str, interval_s: float = 1.0
    ) -> None:
        self.db = db
        self.signals = signals
        self.http_base = http_base
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="rollouts")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        said = ""
        while not self._stopping.is_set():
            try:
                await asyncio.to_thread(self.tick)
                said = ""
            except Exception as e:  # the database busy: next time (the loop never dies)
                if str(e) != said:
                    log.exception("rollouts: judging a step failed; retrying")
                said = str(e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)

    def tick(self) -> None:
        for model_name, op_name in self._baking():
            try:
                self.judge(model_name, op_name)
            except Exception:
                log.exception("rollouts: %s", op_name)

    def _baking(self) -> list[tuple[str, str]]:
        query = select(OperationRow.model, OperationRow.name, OperationRow.rollout).where(
            col(OperationRow.done).is_(False), OperationRow.rollout != ""
        )
        with self.db.read() as s:
            rows = s.exec(query).all()
        out = []
        for model, name, text in rows:
            record = record_from_json(text)
            if record is not None and record.phase is Phase.BAKING:
                out.append((model, name))
        return out

    def judge(self, model_name: str, op_name: str) -> None:
        with self.db.read() as s:
            model = repo.model_row(s, model_name)
            op = repo.operation_row(s, op_name)
            split = traffic.splits(model)
            record = record_from_json(op.rollout)
        if split is None or record is None or record.step_start is None:
            return
        at = now()
        elapsed = max(0.0, (at - record.step_start).total_seconds())
        window = max(STEP_S, math.ceil(elapsed / STEP_S) * STEP_S)
        builds = self.signals.series(model_name, window, window, replicas=False).builds
        candidate = step_figures(builds.get(split.candidate_build))
        current = step_figures(builds.get(split.stable_build))
        with self.db.write() as tx:
            c = Changes(tx, self.http_base)
            model = repo.model_row(c.session, model_name)
            op = repo.operation_row(c.session, op_name)
            traffic.step_judged(c, model, op, candidate, current, at)
