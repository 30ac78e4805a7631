"""Observes the backend and drives recorded states toward what actually runs.

The loop only reads and writes: it asks the backend what runs, turns each model's
application into a ``decisions.Observation``, and hands it to ``lifecycle``, which
records what ``domain.decisions`` judges (a rollout deployed when every replica of it
runs, judged by replica identities, not one status field; failed when Serve says so or
a deadline passes; stopped when the application is gone). The loop never dies: an error
on one model is recorded on that model and the loop goes on (after Ray Serve's
controller).

A model whose record and observation are both what they were at its last look is not
looked at again (a look is a write transaction, and they are serialized; what it would
decide differs only with time): a settled model (DEPLOYED, no operation, every replica
Serve wants running) for ``SETTLED_REFRESH_S``, so that with hundreds of models the
loop's cost while nothing changes stays flat (no decision about a settled model depends
on time: no deadline runs, and its scale record waits for nothing, see ``settled``; the
refresh is only a net under what a look might have missed); a changing one for
``CHANGING_REFRESH_S``,
so that a rollout's looks between two of Serve's steps (a replica starting takes
seconds) cost nothing, and a deadline is still seen within a second. A model whose
application Serve does not list, or whose traffic is split, is looked at every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

import sqlalchemy as sa
from sqlmodel import col, select

from controlplane import failpoints, lifecycle, logs
from controlplane.config import Settings
from controlplane.domain import names
from controlplane.domain.decisions import Limits, Observation, ServeStatus
from controlplane.domain.states import ModelState, ReplicaState
from controlplane.domain.types import Replica
from controlplane.lifecycle import traffic
from controlplane.storage import repo
from controlplane.storage.changes import Changes, now
from controlplane.storage.db import Database
from controlplane.storage.tables import DeploymentRow, ModelRow
from workers.backend import (
    AppObservation,
    Backend,
    ReplicaStatus,
    app_name_for,
    candidate_app_for,
)

log = logging.getLogger(__name__)

MISSING_GRACE_S = 2.0
OBSERVE_TIMEOUT_S = 30.0
SETTLED_REFRESH_S = 60.0
CHANGING_REFRESH_S = 1.0

WATCHED = (ModelState.DEPLOYING.value, ModelState.DEPLOYED.value, ModelState.STOPPING.value)
CHANGING = (ModelState.DEPLOYING.value, ModelState.STOPPING.value)

_REPLICA_STATE = {
    ReplicaStatus.STARTING: ReplicaState.STARTING,
    ReplicaStatus.RUNNING: ReplicaState.RUNNING,
    ReplicaStatus.STOPPING: ReplicaState.STOPPING,
    ReplicaStatus.FAILED: ReplicaState.FAILED,
}


def observation(app: AppObservation) -> Observation:
    """The backend's report of one application, as the domain's decisions read it."""
    return Observation(
        status=ServeStatus(app.status.value),
        message=app.message,
        replicas=tuple(
            Replica(
                id=r.id,
                state=_REPLICA_STATE[r.state],
                pid=r.pid,
                node=r.node,
                start_time=r.start_time,
            )
            for r in app.replicas
        ),
        unplaceable=app.unplaceable,
        target=app.target_replicas,
        lost_nodes=app.lost_nodes,
    )


def settled(obs: Observation | None) -> bool:
    """Serve runs every replica it wants and nothing else is under way: no decision
    about this application depends on time (scale records wait only while counts move)."""
    if obs is None or obs.status is not ServeStatus.RUNNING or obs.unplaceable:
        return False
    if obs.lost_nodes or any(r.state is not ReplicaState.RUNNING for r in obs.replicas):
        return False
    return obs.target is None or obs.target == len(obs.replicas)


def described(obs: Observation | None, second: Observation | None = None) -> str:
    """One line of what Serve says of a model's application(s), for the debug log."""

    def one(o: Observation | None) -> str:
        if o is None:
            return "no application"
        counts: dict[str, int] = {}
        for r in o.replicas:
            counts[r.state.value] = counts.get(r.state.value, 0) + 1
        replicas = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"
        wants = f", wants {o.target}" if o.target is not None else ""
        return f"{o.status.value}, replicas {replicas}{wants}"

    return one(obs) if second is None else f"{one(obs)}; second build: {one(second)}"


# A model's last look: its revision, whether Serve was handed its serving deployment (a
# silent write), and its applications as observed.
Seen = tuple[int, bool, Observation | None, Observation | None]


# Every model the cluster should reflect, read at every pass: built once.
_WATCHED = (
    sa.select(  # sqlmodel's select types four columns at most
        col(ModelRow.name),
        col(ModelRow.state),
        col(ModelRow.running_operation),
        col(ModelRow.revision),
        col(DeploymentRow.applied),
        col(ModelRow.traffic),
    )
    .join(
        DeploymentRow,
        col(DeploymentRow.name) == col(ModelRow.active_deployment),
        isouter=True,
    )
    .where(col(ModelRow.state).in_(WATCHED))
)


class Watched(NamedTuple):
    """A model the cluster should reflect, as the loop reads it every tick."""

    name: str
    state: str
    operation: str  # running, if any
    revision: int
    applied: bool  # its serving deployment handed to Serve
    split: bool  # two builds live


class Reconciler:
    def __init__(
        self,
        db: Database,
        backend: Backend,
        settings: Settings,
        http_base: str,
        load: Callable[[str], float | None] | None = None,
    ) -> None:
        """``load``: a model's requests in flight now, if known (the reasons of its scale
        decisions say it)."""
        self.db = db
        self.load = load
        self.backend = backend
        self.settings = settings
        self.http_base = http_base
        self.limits = Limits(settings.deploy_timeout_s, settings.placement_timeout_s)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # model -> when its application was first seen missing while it should serve.
        self._missing_since: dict[str, float] = {}
        self._unreachable = ""  # why the backend could not be observed, while it cannot
        self._observing: asyncio.Future[Mapping[str, AppObservation]] | None = None
        self._busy = False  # a model is changing: look again soon
        # A settled model's last look: what it saw, and when (its records not changed since).
        self._seen: dict[str, tuple[Seen, float]] = {}
        # Each application's observation as the backend reported it and as converted.
        self._converted: dict[str, tuple[AppObservation, Observation]] = {}
        self.looks = 0  # models looked at (written), for tests and benchmarks

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reconciler")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task:
            await self._task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.tick()
            except Exception as e:  # the loop never dies (the cluster may be unreachable)
                why = f"{type(e).__name__}: {e}"
                if why != self._unreachable:  # once per outage, not every tick
                    log.exception("reconciler: observing the backend failed; retrying")
                self._unreachable = why
            else:
                if self._unreachable:
                    log.warning("reconciler: the backend answers again (%s)", self._unreachable)
                    # What failed to apply meanwhile (a revoked key) is not left waiting.
                    await asyncio.to_thread(self._resync)
                self._unreachable = ""
            # Quick looks while a change is under way (how soon a rollout is seen to end
            # is how long a deploy takes), a slow pace when everything is settled.
            interval = (
                self.settings.reconcile_busy_interval_s
                if self._busy
                else self.settings.reconcile_interval_s
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def tick(self) -> None:
        started = time.monotonic()
        observed = await self._observe()
        seen_s = time.monotonic()
        watched = await asyncio.to_thread(self._watched_models)
        self._busy = any(w.state in CHANGING or w.operation for w in watched)
        if self._busy:
            log.debug(
                "tick: Serve observed in %.0f ms, records read in %.0f ms",
                (seen_s - started) * 1000,
                (time.monotonic() - seen_s) * 1000,
            )
        now_s = time.monotonic()
        converted = self._converted
        self._converted = {}
        for w in watched:
            n = names.parse_model(w.name)
            obs = self._observation(observed, converted, app_name_for(n.project, n.model))
            second = self._observation(observed, converted, candidate_app_for(n.project, n.model))
            if self._unchanged(w, (w.revision, w.applied, obs, second), now_s):
                continue
            self.looks += 1
            with logs.about(model=w.name, operation=w.operation):
                if (w.operation or w.state in CHANGING) and log.isEnabledFor(logging.DEBUG):
                    log.debug("look: model %s; Serve: %s", w.state, described(obs, second))
                try:
                    await asyncio.to_thread(self.reconcile, w.name, obs, second)
                except Exception as e:
                    self._seen.pop(w.name, None)  # looked at again next time
                    log.exception("reconciler: model %s", w.name)
                    why = f"{type(e).__name__}: {e}"
                    await asyncio.to_thread(self._record_error, w.name, why)
        still = {w.name for w in watched}
        self._seen = {k: v for k, v in self._seen.items() if k in still}

    def _observation(
        self,
        observed: Mapping[str, AppObservation],
        converted: Mapping[str, tuple[AppObservation, Observation]],
        app_name: str,
    ) -> Observation | None:
        """The application's observation in the domain's terms: the same object as at the
        last pass while the backend reports the same object (workers.observations), so
        that comparing it with the last look's is an identity check."""
        app = observed.get(app_name)
        if app is None:
            return None
        was = converted.get(app_name)
        obs = was[1] if was is not None and was[0] is app else observation(app)
        self._converted[app_name] = (app, obs)
        return obs

    def _unchanged(self, w: Watched, seen: Seen, now_s: float) -> bool:
        """A model whose record and applications are as at its last look (which wrote
        nothing new since: its revision is the same), looked at under its refresh ago:
        ``SETTLED_REFRESH_S`` if settled, else ``CHANGING_REFRESH_S``. Otherwise this look
        is remembered, unless Serve does not list its application or its traffic is split
        (both looked at every time: a missing application's grace, and the second build's
        records, are not in ``seen``)."""
        obs, second = seen[2], seen[3]
        if obs is None or w.split:
            self._seen.pop(w.name, None)
            return False
        calm = (
            w.state == ModelState.DEPLOYED.value
            and not w.operation
            and settled(obs)
            and (second is None or settled(second))
        )
        refresh = SETTLED_REFRESH_S if calm else CHANGING_REFRESH_S
        last = self._seen.get(w.name)
        if last is not None and last[0] == seen and now_s - last[1] < refresh:
            return True
        # Looked at now. Seen the same next time (this look wrote nothing: the revision
        # stays), it is skipped; a look that wrote moves the revision, and is looked again.
        self._seen[w.name] = (seen, now_s)
        return False

    async def _observe(self) -> Mapping[str, AppObservation]:
        """The backend's view. A look that hangs (a cluster that stopped answering) fails
        this tick after ``OBSERVE_TIMEOUT_S`` and is waited on again by the next ticks,
        never started twice: hung looks never pile up in worker threads."""
        if self._observing is None or self._observing.done():
            self._observing = asyncio.ensure_future(self.backend.observe())
            self._observing.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(self._observing), OBSERVE_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(
                f"the backend did not answer within {OBSERVE_TIMEOUT_S:g}s"
            ) from None

    def _watched_models(self) -> list[Watched]:
        """Every model the cluster should reflect."""
        with self.db.read() as s:
            return [
                Watched(name, state, op, rev, bool(applied), bool(traffic))
                for name, state, op, rev, applied, traffic in s.connection().execute(_WATCHED)
            ]

    def _resync(self) -> None:
        with self.db.write() as tx:
            Changes(tx, self.http_base).resync()

    def _record_error(self, model_name: str, why: str) -> None:
        with self.db.write() as tx:
            model = tx.session.exec(select(ModelRow).where(ModelRow.name == model_name)).first()
            if model is not None:
                lifecycle.reconcile_failed(Changes(tx, self.http_base), model, why)

    # ---- one model -------------------------------------------------------------------------

    def reconcile(
        self, model_name: str, obs: Observation | None, second: Observation | None = None
    ) -> None:
        """``second``: the application of the model's second live build, if Serve has one."""
        with self.db.write() as tx:
            c = Changes(tx, self.http_base)
            model = c.session.exec(select(ModelRow).where(ModelRow.name == model_name)).first()
            if model is None:
                return
            dep = repo.maybe_deployment_row(c.session, model.active_deployment)
            if dep is None or not dep.applied:
                return  # its job has not applied it yet
            state = ModelState(model.state)
            if state in (ModelState.DEPLOYING, ModelState.STOPPING):
                failpoints.hit("reconcile.writing")
            if state in (ModelState.DEPLOYING, ModelState.DEPLOYED) and self._gone_for_good(
                model.name, obs
            ):
                lifecycle.app_missing(c, dep)
            split = traffic.splits(model)
            if split is not None:  # two builds live: both applications are followed
                traffic.observed(c, model, split, obs, second, now(), self.limits)
            elif state is ModelState.DEPLOYING:
                lifecycle.rollout_observed(c, model, dep, obs, now(), self.limits)
            elif state is ModelState.DEPLOYED and obs is not None:
                lifecycle.serving_observed(c, model, dep, obs)
            elif state is ModelState.STOPPING:
                lifecycle.stopping_observed(c, model, dep, obs)
            if obs is not None and model.state in (
                ModelState.DEPLOYING.value,
                ModelState.DEPLOYED.value,
            ):
                serving = repo.maybe_deployment_row(c.session, model.active_deployment)
                if serving is not None:
                    lifecycle.scale_observed(
                        c,
                        model,
                        serving,
                        obs,
                        now(),
                        lambda: self._load(model_name),
                        self.settings.scale_coalesce_s,
                    )

    def _load(self, model_name: str) -> float | None:
        """The model's requests in flight as its replicas last reported (the reason of a
        scale decision); None when unknown. The figures are written by the signals loop
        meanwhile: a read that races a write says nothing rather than fail the look."""
        if self.load is None:
            return None
        try:
            return self.load(model_name)
        except RuntimeError:  # e.g. a dict changed size while it was read
            return None

    def _gone_for_good(self, model_name: str, obs: Observation | None) -> bool:
        """The application of a model that should serve has been missing from Serve for a
        short grace (an app can vanish from the details for a moment while it rolls): it
        is applied again, once (the grace starts over)."""
        if obs is not None:
            self._missing_since.pop(model_name, None)
            return False
        loop_time = time.monotonic()
        since = self._missing_since.setdefault(model_name, loop_time)
        if loop_time - since < MISSING_GRACE_S:
            return False
        self._missing_since.pop(model_name, None)
        return True
