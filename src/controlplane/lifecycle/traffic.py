"""Two builds of a model live at once: every change of a model's traffic split.

A split (``domain.traffic.Split``, recorded on the model) names the deployment that
serves (*stable*: the model's own Serve application) and a second one (*candidate*: an
application of its own, reached only through the stable one's replicas, which send it
their share of requests or, for a shadow, a copy). It starts three ways:

- ``begin_rollout``: CreateDeployment with a CANARY or SHADOW strategy. The candidate's
  replicas start (it takes no traffic until every one runs), then each step's share goes
  to it and ``rollouts`` judges its figures: next step, promotion, or roll back;
- ``set_traffic``: SetTraffic with weights, kept until they change (MANUAL);
- both end by ``promote`` (the model's own replicas roll to the candidate's deployment,
  through ``lifecycle.start_rollout``; the split goes once that rollout is deployed) or
  ``roll_back`` (the candidate's application goes; the stable one takes everything).

Restart, stop and a re-deploy keep their meaning with two builds live (``lifecycle``):
restart re-initializes both, stop stops both (the split is kept for the next restart),
a re-deploy replaces both.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from controlplane import lifecycle
from controlplane.domain import traffic
from controlplane.domain.decisions import Deployed, Failed, Limits, Observation
from controlplane.domain.errors import FailedPrecondition
from controlplane.domain.states import DeploymentState, ModelState, OperationKind
from controlplane.domain.traffic import Phase, RolloutRecord, Split, Strategy, StrategyKind
from controlplane.domain.transitions import Verb, check_verb
from controlplane.domain.types import OperationError
from controlplane.storage import repo
from controlplane.storage.changes import Changes
from controlplane.storage.jobs import JobKind
from controlplane.storage.tables import DeploymentRow, ModelRow, OperationRow

GATE_FAILED = "ROLLOUT_GATE_FAILED"


# ---- a client asks --------------------------------------------------------------------------


def _serving(c: Changes, model: ModelRow, what: str) -> DeploymentRow:
    """The deployment that serves now: a split needs one, DEPLOYED, with no split yet."""
    check_verb(Verb.DEPLOY, model.name, ModelState(model.state))
    stable = repo.maybe_deployment_row(c.session, model.active_deployment)
    if (
        model.state != ModelState.DEPLOYED.value
        or stable is None
        or stable.state != DeploymentState.DEPLOYED.value
    ):
        raise FailedPrecondition(
            message=f"model {model.name} is {model.state}: {what} needs a DEPLOYED model "
            "(its serving build is what the new one is compared with)",
            reason="MODEL_NOT_SERVING",
            metadata={"name": model.name, "state": model.state},
        )
    return stable


def _check_other_build(stable: DeploymentRow, dep: DeploymentRow) -> None:
    if dep.build == stable.build:
        raise FailedPrecondition(
            message=f"{stable.build} serves already: a split needs another build "
            "(to change replicas or resources of the same build, re-deploy it)",
            reason="SAME_BUILD",
            metadata={"build": dep.build},
        )


def begin_rollout(
    c: Changes, model: ModelRow, dep: DeploymentRow, strategy: Strategy
) -> OperationRow:
    """A CANARY or SHADOW rollout of ``dep`` beside the deployment that serves."""
    stable = _serving(c, model, f"a {strategy.kind.value.lower()} rollout")
    _check_other_build(stable, dep)
    record = RolloutRecord(strategy)
    op = lifecycle.new_operation(
        c, model, OperationKind.CREATE_DEPLOYMENT, dep.name, deployment=dep.name
    )
    c.operation_rollout(
        op,
        traffic.record_to_json(record),
        traffic.progress(record, _version(dep.build), _version(stable.build), ""),
    )
    split = Split(
        stable=stable.name,
        candidate=dep.name,
        stable_build=stable.build,
        candidate_build=dep.build,
        percent=strategy.percent_at(0),
        shadow=strategy.kind is StrategyKind.SHADOW,
    )
    _start_candidate(c, model, dep, split)
    c.enqueue(JobKind.APPLY, model.name, op.name, dep.name)
    return op


def set_traffic(
    c: Changes,
    model: ModelRow,
    weights: dict[str, int],
    sticky_header: str,
    new_deployment: DeploymentRow | None,
) -> OperationRow:
    """Weights by build name (two builds adding up to 100, or one at 100).

    - no split yet: ``new_deployment`` (the other build, the serving one's resources)
      starts beside the serving one and takes its share once its replicas run;
    - a split of the same two builds: the weights change in place (done once Serve has
      them);
    - one build at 100: the split ends; the candidate's build at 100 is promoted.
    """
    split = traffic.split_from_json(model.traffic)
    if split is not None and model.state != ModelState.DEPLOYED.value:
        raise FailedPrecondition(
            message=f"model {model.name} is {model.state}: its traffic changes while it is "
            "DEPLOYED (restart it first)",
            reason="MODEL_NOT_SERVING",
            metadata={"name": model.name, "state": model.state},
        )
    if split is None:
        assert new_deployment is not None
        stable = _serving(c, model, "a traffic split")
        _check_other_build(stable, new_deployment)
        op = lifecycle.new_operation(
            c, model, OperationKind.SET_TRAFFIC, model.name, deployment=new_deployment.name
        )
        split = Split(
            stable=stable.name,
            candidate=new_deployment.name,
            stable_build=stable.build,
            candidate_build=new_deployment.build,
            percent=weights.get(new_deployment.build, 0),
            sticky_header=sticky_header,
        )
        _start_candidate(c, model, new_deployment, split)
        c.operation_progress(
            op, f"starting the replicas of build {_version(split.candidate_build)}"
        )
        c.enqueue(JobKind.APPLY, model.name, op.name, new_deployment.name)
        return op
    op = lifecycle.new_operation(
        c, model, OperationKind.SET_TRAFFIC, model.name, deployment=split.candidate
    )
    percent = weights.get(split.candidate_build, 0)
    if percent == 100:
        promote(c, model, op)
        return op
    if percent == 0:
        roll_back(c, model, op, "traffic set back to the serving build by request", "", "")
        return op
    c.model(
        model,
        traffic=traffic.split_to_json(replace(split, percent=percent, sticky_header=sticky_header)),
    )
    # Done once Serve has the new weights (``lifecycle.apply_landed``).
    c.operation_progress(op, f"{percent}% to build {_version(split.candidate_build)}")
    c.enqueue(JobKind.APPLY, model.name, op.name, split.candidate)
    return op


def _start_candidate(c: Changes, model: ModelRow, dep: DeploymentRow, split: Split) -> None:
    c.deployment(
        dep,
        DeploymentState.DEPLOYING,
        applied=False,
        expect_roll=False,
        previous_replica_ids="[]",
        message="",
        serve_health="",
        awaiting_replacement="[]",
    )
    c.model(model, ModelState.DEPLOYING, traffic=traffic.split_to_json(split), message="")


def owns(model: ModelRow, op: OperationRow) -> bool:
    """Whether ``op`` is a split's rollout that the split's own path ends (before promotion;
    a promotion is an ordinary rollout, cancelled as one)."""
    split = traffic.split_from_json(model.traffic)
    return (
        split is not None
        and not split.promoting
        and op.deployment == split.candidate
        and model.running_operation == op.name
    )


def abort(c: Changes, model: ModelRow, op: OperationRow) -> None:
    """CancelOperation of a canary or shadow: all traffic back to the serving build."""
    roll_back(
        c, model, op, f"cancelled on request ({op.name})", "CANCELLED", lifecycle.CANCELLED_REASON
    )


def promote_now(c: Changes, model: ModelRow, op: OperationRow) -> None:
    """PromoteRollout: the candidate takes over now, whatever step the rollout is at."""
    if op.done or not owns(model, op):
        raise FailedPrecondition(
            message=f"operation {op.name} is not a canary or shadow rollout that can be "
            "promoted now (done, already promoting, or another kind)",
            reason="NOT_PROMOTABLE",
            metadata={"operation": op.name},
        )
    dep = repo.deployment_row(c.session, op.deployment)
    if dep.state != DeploymentState.DEPLOYED.value:
        raise FailedPrecondition(
            message=f"the replicas of {dep.name} are still starting: promote once they run",
            reason="CANDIDATE_STARTING",
            metadata={"operation": op.name, "deployment": dep.name},
        )
    promote(c, model, op)


# ---- how it ends ----------------------------------------------------------------------------


def promote(c: Changes, model: ModelRow, op: OperationRow | None) -> None:
    """The candidate takes over: the stable build's replicas send it everything while the
    model's own replicas roll to its deployment (``lifecycle.start_rollout``: surge first,
    judged as any rollout); the split goes once that rollout is deployed."""
    split = traffic.split_from_json(model.traffic)
    assert split is not None
    c.model(model, traffic=traffic.split_to_json(replace(split, percent=100, promoting=True)))
    record = traffic.record_from_json(op.rollout) if op is not None else None
    if op is not None and record is not None:
        record = replace(record, phase=Phase.PROMOTING)
        build = _version(split.candidate_build)
        c.operation_rollout(
            op, traffic.record_to_json(record), traffic.progress(record, build, "", "")
        )
    elif op is not None:
        c.operation_progress(op, f"promoting build {_version(split.candidate_build)}")
    candidate = repo.deployment_row(c.session, split.candidate)
    lifecycle.start_rollout(c, model, candidate)
    c.enqueue(JobKind.APPLY, model.name, op.name if op is not None else "", candidate.name)


def roll_back(
    c: Changes, model: ModelRow, op: OperationRow | None, why: str, code: str, reason: str
) -> None:
    """All traffic back to the stable build at once; the candidate's application goes
    (a request it was answering is answered by the stable build's replica that sent it)."""
    split = traffic.split_from_json(model.traffic)
    assert split is not None
    candidate = repo.deployment_row(c.session, split.candidate)
    failed = bool(code)
    if candidate.state in (DeploymentState.DEPLOYING.value, DeploymentState.DEPLOYED.value):
        if failed:
            c.deployment(candidate, DeploymentState.FAILED, message=why, serve_health="")
        else:
            c.deployment(
                candidate, DeploymentState.REPLACED, message=f"traffic back to {split.stable}"
            )
    stable = repo.deployment_row(c.session, split.stable)
    state = ModelState.DEPLOYED if stable.state == DeploymentState.DEPLOYED.value else None
    c.model(model, state, traffic="", message=why if failed else "")
    if op is not None:
        if failed:
            error = OperationError(code, why, reason)
            c.operation_done(
                op, model, "cancelled" if code == "CANCELLED" else "rolled back", error
            )
        else:
            c.operation_done(op, model, f"all traffic to build {_version(split.stable_build)}")
    c.enqueue(JobKind.APPLY, model.name, "", split.stable)


# ---- the reconciler looks -------------------------------------------------------------------


def splits(model: ModelRow) -> Split | None:
    """The split the reconciler follows for ``model``: while its serving deployment is
    the split's stable one (a promotion or a re-deploy is an ordinary rollout)."""
    split = traffic.split_from_json(model.traffic)
    if split is None or model.active_deployment != split.stable:
        return None
    return split


def observed(
    c: Changes,
    model: ModelRow,
    split: Split,
    main: Observation | None,
    second: Observation | None,
    at: datetime,
    limits: Limits,
) -> None:
    """Both applications as Serve lists them: the candidate's replicas starting (it takes
    its share once all run), or serving; the stable one's serving, or restarting."""
    stable = repo.deployment_row(c.session, split.stable)
    candidate = repo.deployment_row(c.session, split.candidate)
    op = lifecycle.running_operation(c, model)
    if model.state == ModelState.STOPPING.value:
        if main is None and second is not None:
            return  # stopped once both applications are gone
        lifecycle.stopping_observed(c, model, stable, main)
        if (
            model.state == ModelState.STOPPED.value
            and candidate.state == DeploymentState.STOPPING.value
        ):
            c.deployment(candidate, DeploymentState.STOPPED, observed_replicas="[]")
        return
    if candidate.state == DeploymentState.DEPLOYING.value and candidate.applied:
        verdict = lifecycle.judge(c, candidate, second, at, limits)
        if isinstance(verdict, Failed):
            roll_back(
                c,
                model,
                op,
                f"{candidate.name} failed: {verdict.message}",
                verdict.code,
                verdict.reason,
            )
            return
        if isinstance(verdict, Deployed):
            _candidate_runs(c, model, split, candidate, op, at)
    elif candidate.state == DeploymentState.DEPLOYED.value and second is not None:
        lifecycle.serving_observed(c, model, candidate, second)
    if stable.state == DeploymentState.DEPLOYING.value and stable.applied:  # a restart
        verdict = lifecycle.judge(c, stable, main, at, limits)
        if isinstance(verdict, Failed):
            lifecycle.fail_rollout(
                c, model, stable, op, verdict.message, verdict.code, verdict.reason
            )
            return
        if isinstance(verdict, Deployed):
            c.deployment(stable, DeploymentState.DEPLOYED, message="")
    elif stable.state == DeploymentState.DEPLOYED.value and main is not None:
        lifecycle.serving_observed(c, model, stable, main)
    _both_run(c, model, stable, candidate, op)


def _candidate_runs(
    c: Changes,
    model: ModelRow,
    split: Split,
    candidate: DeploymentRow,
    op: OperationRow | None,
    at: datetime,
) -> None:
    """Every replica of the candidate runs: its share goes to it from now on (the apply
    that says so), and a judged rollout's first step begins."""
    c.deployment(candidate, DeploymentState.DEPLOYED, message="")
    # The apply that sends it its share; a SetTraffic that started it is done once it lands.
    setting = op is not None and op.kind == OperationKind.SET_TRAFFIC.value
    c.enqueue(JobKind.APPLY, model.name, op.name if op and setting else "", candidate.name)
    if op is not None and setting:
        c.operation_progress(op, f"{split.percent}% to build {_version(split.candidate_build)}")
    record = traffic.record_from_json(op.rollout) if op is not None else None
    if op is None or record is None or record.phase is not Phase.STARTING:
        return
    record = replace(record, phase=Phase.BAKING, step=0, step_start=at)
    c.operation_rollout(
        op,
        traffic.record_to_json(record),
        traffic.progress(
            record, _version(split.candidate_build), _version(split.stable_build), "baking"
        ),
    )


def _both_run(
    c: Changes,
    model: ModelRow,
    stable: DeploymentRow,
    candidate: DeploymentRow,
    op: OperationRow | None,
) -> None:
    """A restart is done once both builds' replicas run again."""
    deployed = DeploymentState.DEPLOYED.value
    if stable.state != deployed or candidate.state != deployed:
        return
    if op is not None and op.kind != OperationKind.RESTART_MODEL.value:
        return  # a judged rollout ends by ``rollouts``, a SetTraffic once its apply lands
    if model.state == ModelState.DEPLOYING.value:
        c.model(model, ModelState.DEPLOYED)
    if op is not None:
        c.operation_done(op, model, "restarted")


# ---- a judged rollout's step ----------------------------------------------------------------


def step_judged(
    c: Changes,
    model: ModelRow,
    op: OperationRow,
    candidate: traffic.StepFigures,
    current: traffic.StepFigures,
    at: datetime,
) -> None:
    """``rollouts`` judged the current step with these figures: the record says so, and
    the rollout waits, steps on, promotes or rolls back."""
    split = splits(model)
    record = traffic.record_from_json(op.rollout)
    if op.done or split is None or record is None or record.phase is not Phase.BAKING:
        return
    assert record.step_start is not None
    elapsed = (at - record.step_start).total_seconds()
    verdict = traffic.judge(record, elapsed, candidate, current)
    record = traffic.with_figures(record, candidate, current)
    builds = (_version(split.candidate_build), _version(split.stable_build))
    if isinstance(verdict, traffic.Wait):
        c.operation_rollout(
            op, traffic.record_to_json(record), traffic.progress(record, *builds, verdict.why)
        )
    elif isinstance(verdict, traffic.Advance):
        record = replace(record, step=verdict.step, step_start=at)
        percent = record.strategy.percent_at(verdict.step)
        c.model(model, traffic=traffic.split_to_json(replace(split, percent=percent)))
        c.operation_rollout(
            op, traffic.record_to_json(record), traffic.progress(record, *builds, "baking")
        )
        c.enqueue(JobKind.APPLY, model.name, "", split.candidate)
    elif isinstance(verdict, traffic.Promote):
        c.operation_rollout(op, traffic.record_to_json(record), op.progress)
        promote(c, model, op)
    else:
        share = f"{record.percent}%" + (" (shadow)" if split.shadow else "")
        why = (
            f"build {builds[0]} rolled back at step {record.step + 1}/"
            f"{len(record.strategy.steps)} ({share}): {verdict.message}"
        )
        c.operation_rollout(op, traffic.record_to_json(record), op.progress)
        roll_back(c, model, op, why, "FAILED_PRECONDITION", GATE_FAILED)


def _version(build: str) -> str:
    return build.rsplit("/", 1)[-1]
