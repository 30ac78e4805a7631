"""The reconciler's judgement, as pure functions over typed snapshots.

Nothing here reads a database, a clock or a cluster: the caller hands in what was
recorded and what Serve reports now, and gets back a verdict (a rollout in progress,
deployed, or failed and why) or the serving record as it should now be written. The
lifecycle module writes what these functions decide; unit tests call them with made-up
replicas for every branch (after Ray Serve's ``test_deployment_state.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from controlplane.domain.states import ModelState, ReplicaState
from controlplane.domain.types import Replica


class ServeStatus(StrEnum):
    """An application's status as Serve reports it."""

    DEPLOYING = "DEPLOYING"
    RUNNING = "RUNNING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


@dataclass(frozen=True)
class Observation:
    """One model's application as Serve reports it now."""

    status: ServeStatus
    message: str = ""
    replicas: tuple[Replica, ...] = ()
    unplaceable: str = ""  # why a replica can never be placed (the cluster is too small)
    target: int | None = None  # replicas Serve wants now (its autoscaler's); None: not said
    lost_nodes: frozenset[str] = frozenset()  # nodes the cluster lost (dead, not back)


@dataclass(frozen=True)
class Limits:
    deploy_timeout_s: float
    placement_timeout_s: float


# ---- a rollout ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """A deployment on its way to DEPLOYED, as recorded when it started."""

    wanted: int  # replicas
    replaced: frozenset[str] = frozenset()  # ids of replicas it must replace (a rolling change)
    applied_at: datetime | None = None  # when its job put it on Serve; None: not yet
    autoscaled: bool = False  # wanted is what Serve's autoscaler wants (Observation.target)


@dataclass(frozen=True)
class InProgress:
    running: int  # replicas of this rollout running
    wanted: int

    @property
    def progress(self) -> str:
        return f"{self.running}/{self.wanted} replicas running"


@dataclass(frozen=True)
class Deployed:
    pass


@dataclass(frozen=True)
class Failed:
    message: str
    code: str  # a grpc.StatusCode name
    reason: str  # the ErrorInfo reason


Verdict = InProgress | Deployed | Failed


def judge_rollout(
    rollout: Rollout, obs: Observation | None, now: datetime, limits: Limits
) -> Verdict:
    """Deployed once Serve runs exactly ``wanted`` replicas, none of them one the rollout
    replaces; failed when Serve says so, or when a deadline passes (sooner when a replica
    can never be placed); else in progress."""
    if obs is not None and obs.status is ServeStatus.DEPLOY_FAILED:
        return Failed(
            obs.message or "Serve reported DEPLOY_FAILED", "FAILED_PRECONDITION", "DEPLOY_FAILED"
        )
    if rollout.autoscaled and obs is not None and obs.target is not None:
        rollout = replace(rollout, wanted=obs.target)
    replicas = obs.replicas if obs is not None else ()
    fresh = [
        r for r in replicas if r.state is ReplicaState.RUNNING and r.id not in rollout.replaced
    ]
    if (
        obs is not None
        and obs.status is ServeStatus.RUNNING
        and len(replicas) == rollout.wanted
        and len(fresh) == rollout.wanted
    ):
        return Deployed()
    progress = InProgress(len(fresh), rollout.wanted)
    if rollout.applied_at is None:
        return progress
    elapsed = (now - rollout.applied_at).total_seconds()
    unplaceable = obs.unplaceable if obs is not None else ""
    if unplaceable and elapsed > limits.placement_timeout_s:
        return Failed(
            f"{progress.progress} after {limits.placement_timeout_s:g}s: {unplaceable}",
            "DEADLINE_EXCEEDED",
            "PLACEMENT_TIMEOUT",
        )
    if elapsed > limits.deploy_timeout_s:
        detail = f": {obs.message}" if obs is not None and obs.message else ""
        return Failed(
            f"{progress.progress} after {limits.deploy_timeout_s:g}s (replicas could not be "
            f"placed or never became healthy){detail}",
            "DEADLINE_EXCEEDED",
            "STARTUP_TIMEOUT",
        )
    return progress


# ---- what a failure falls back to -----------------------------------------------------------


class FallbackKind(StrEnum):
    SERVE_LAST_GOOD = "SERVE_LAST_GOOD"  # another deployment still serves: it is active again
    KEEP_PREVIOUS_REPLICAS = "KEEP_PREVIOUS_REPLICAS"  # a failed restart: the old ones stay
    FAIL_MODEL = "FAIL_MODEL"  # nothing served before (a first deploy): the model FAILED


@dataclass(frozen=True)
class Fallback:
    kind: FallbackKind
    deployment_note: str  # the failed deployment's message
    model_note: str  # the model's message
    kept: tuple[Replica, ...] = ()  # KEEP_PREVIOUS_REPLICAS: the replicas that stay


def choose_fallback(
    deployment: str,
    why: str,
    cancelled: bool,
    last_good: str,
    restart: bool,
    replaced: frozenset[str],
    observed: tuple[Replica, ...],
) -> Fallback:
    """What a rollout that failed (or was cancelled) of ``deployment`` falls back to.

    ``last_good``: the newest other deployment of the model still DEPLOYED (its replicas
    never stopped); ``restart``: the rollout restarts the deployment that served, whose
    replicas before it were ``replaced``; ``observed``: the replicas seen last.
    """
    if last_good:
        what = f"{deployment}: {why}" if cancelled else f"{deployment} failed: {why}"
        return Fallback(FallbackKind.SERVE_LAST_GOOD, why, f"{what}; serving {last_good} again")
    if restart and replaced:
        what = f"restart {why}" if cancelled else f"restart failed: {why}"
        kept = tuple(r for r in observed if r.id in replaced)
        return Fallback(
            FallbackKind.KEEP_PREVIOUS_REPLICAS,
            f"{what}; the replicas from before it keep serving",
            what,
            kept,
        )
    return Fallback(FallbackKind.FAIL_MODEL, why, why)


def state_before_pending(before: str | None, before_stopped: bool) -> ModelState:
    """Where a model that was PENDING on a build that will never deploy goes back to:
    NOT_DEPLOYED when it had no deployment, STOPPED when that one was stopped, else
    FAILED (its last deployment failed)."""
    if before is None:
        return ModelState.NOT_DEPLOYED
    return ModelState.STOPPED if before_stopped else ModelState.FAILED


# ---- a deployment that serves ---------------------------------------------------------------

SERVE_REPORTS = "Serve reports the application "
RUNNING_AGAIN = f"{SERVE_REPORTS}RUNNING again"
REPLACING = "Serve is starting a replacement"
_DOWN = (ReplicaState.STOPPING, ReplicaState.FAILED)


@dataclass(frozen=True)
class ServingRecord:
    """What is recorded of a deployment's replicas, as typed fields."""

    replicas: tuple[Replica, ...] = ()  # as Serve last listed them, by id
    ran: frozenset[str] = frozenset()  # ids of those seen RUNNING (only those can be lost)
    awaiting: tuple[Replica, ...] = ()  # lost replicas whose replacement Serve has not listed
    note: str = ""  # for people: what happened last (e.g. which replica was replaced)
    health: str = ""  # for people: Serve's report while the application is not RUNNING

    @property
    def message(self) -> str:
        return compose_message(self.note, self.health)


def compose_message(note: str, health: str) -> str:
    return f"{note}; {health}" if note and health else note or health


def observe_replicas(record: ServingRecord, obs: Observation) -> ServingRecord:
    """The replicas as Serve lists them now; a replica seen RUNNING is remembered as one
    that ran for as long as Serve lists it."""
    replicas = tuple(sorted(obs.replicas, key=lambda r: r.id))
    ran = frozenset(r.id for r in replicas if r.id in record.ran or r.state is ReplicaState.RUNNING)
    return replace(record, replicas=replicas, ran=ran)


def judge_serving(record: ServingRecord, obs: Observation, notice_replaced: bool) -> ServingRecord:
    """A DEPLOYED deployment's record after this look.

    With no change of ours in flight (``notice_replaced``), replicas that ran and are
    gone (or stopping), beyond those Serve's autoscaler removed (its target dropped below
    the replicas that ran), stopped unexpectedly: the note names them and the replicas Serve
    started instead, or says a replacement is starting and names it when Serve lists it.
    Serve's details leave a deployment out for a moment while it updates it (its
    replicas serve on): an empty list then says nothing, unless Serve wants no replica
    (an autoscaled deployment scaled to zero). The health note follows
    Serve's status: set while UNHEALTHY or DEPLOY_FAILED, gone once RUNNING again.
    """
    after = record
    if not (notice_replaced and not obs.replicas and obs.target != 0):
        after = observe_replicas(record, obs)
        if notice_replaced:
            after = _replacements(record, after, obs.target, obs.lost_nodes)
    after = _lost_with_node(after, obs.lost_nodes)
    if after.note != record.note:  # a new note replaces what was said, health included
        after = replace(after, health="")
    return replace(after, health=_health(after, obs))


def _replacements(
    before: ServingRecord,
    after: ServingRecord,
    target: int | None,
    obs_lost_nodes: frozenset[str] = frozenset(),
) -> ServingRecord:
    now = {r.id: r for r in after.replicas}
    lost = tuple(
        r
        for r in before.replicas
        if r.id in before.ran
        and r.state not in _DOWN
        and (r.id not in now or now[r.id].state in _DOWN)
    )
    known = {r.id for r in before.replicas}
    new = [r for r in after.replicas if r.id not in known]
    came = ", ".join(_words(r) for r in new)
    live = sum(1 for r in before.replicas if r.state not in _DOWN)
    if lost and not new and target is not None and len(lost) <= live - target:
        return after  # scaled down: Serve stopped them on purpose
    if lost:
        went = ", ".join(_words(r) for r in lost)
        instead = f"Serve replaced it with {came}" if new else REPLACING
        gone = sorted({r.node for r in lost if r.node in obs_lost_nodes})
        why = f"was lost with its node {', '.join(gone)}" if gone else "stopped unexpectedly"
        return replace(
            after,
            note=f"replica {went} {why}; {instead}",
            awaiting=() if new else lost,
        )
    if new and before.awaiting:
        went = ", ".join(_words(r) for r in before.awaiting)
        return replace(
            after,
            note=f"replica {went} stopped unexpectedly; Serve replaced it with {came}",
            awaiting=(),
        )
    return after


def _lost_with_node(record: ServingRecord, lost_nodes: frozenset[str]) -> ServingRecord:
    """Ray declares a node dead some seconds after Serve sees its replicas go: a note
    written before then is told again once the node is known lost (the note is the
    same words this module wrote, never read back for state)."""
    note = record.note
    for node in sorted(lost_nodes):
        note = note.replace(
            f" on {node}) stopped unexpectedly", f" on {node}) was lost with its node {node}"
        )
    return record if note == record.note else replace(record, note=note)


def _health(record: ServingRecord, obs: Observation) -> str:
    if obs.status in (ServeStatus.UNHEALTHY, ServeStatus.DEPLOY_FAILED):
        note = f"{SERVE_REPORTS}{obs.status.value}"
        return f"{note}: {obs.message}" if obs.message else note
    if obs.status is ServeStatus.RUNNING and record.health and record.health != RUNNING_AGAIN:
        return "" if record.note else RUNNING_AGAIN
    return record.health


def _words(r: Replica) -> str:
    where = f" on {r.node}" if r.node else ""
    return f"{r.id} (pid {r.pid}{where})" if r.pid else f"{r.id} (starting{where})"
