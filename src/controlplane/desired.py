"""What should run: the Serve applications the database asks for, computed fresh each time."""

from __future__ import annotations

import logging
from dataclasses import replace

from sqlmodel import Session, col, select

from controlplane.domain import names, scaling, traffic
from controlplane.domain.states import BuildState, DeploymentState
from controlplane.storage import repo
from controlplane.storage.secretbox import SecretBox, SecretKeyError
from controlplane.storage.tables import BuildRow, DeploymentRow, InvocationKeyRow, ModelRow
from workers.backend import (
    AppSpec,
    AutoscalingSpec,
    EndpointAccess,
    TrafficShare,
    app_name_for,
    candidate_app_for,
)

log = logging.getLogger(__name__)


def autoscaling_spec(dep: DeploymentRow) -> AutoscalingSpec | None:
    a = scaling.autoscaling_from_json(dep.autoscaling)
    if a is None:
        return None
    return AutoscalingSpec(
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        target_ongoing_requests=a.target_ongoing_requests,
        upscale_delay_s=a.upscale_delay_s,
        downscale_delay_s=a.downscale_delay_s,
    )


def _opened(dep: DeploymentRow, box: SecretBox) -> dict[str, str]:
    """The deployment's secret values; none when they cannot be opened (another key):
    its running replicas go on, and a new one fails to start, saying it has no secrets,
    while every other model is applied as usual."""
    try:
        return box.open_all(repo.secrets_of(dep))
    except SecretKeyError as e:
        log.error("%s: %s", dep.name, e)
        return {}


def app_spec(
    model: ModelRow, dep: DeploymentRow, build: BuildRow, box: SecretBox | None = None
) -> AppSpec:
    """The model's application; its secret values opened only with ``box`` (to apply)."""
    n = names.parse_model(model.name)
    return AppSpec(
        app_name=app_name_for(n.project, n.model),
        route_prefix=f"/{n.project}/{n.model}",
        model_name=model.name,
        deployment_name=dep.name,
        build_name=build.name,
        artifact_path=build.artifact_path,
        file_path=build.file_path,
        function_name=build.function_name,
        replicas=dep.replicas,
        autoscaling=autoscaling_spec(dep),
        cpus=dep.cpus,
        memory_mib=dep.memory_mib,
        gpus=dep.gpus,
        environment=repo.environment_of(dep),
        secrets=_opened(dep, box) if box is not None else {},
        secrets_version=repo.secrets_version(dep),
        restart_generation=dep.restart_generation,
    )


def endpoint_keys(s: Session) -> dict[str, tuple[str, ...]]:
    """Each model's live invocation keys (their hashes)."""
    keys: dict[str, list[str]] = {}
    query = select(InvocationKeyRow.model, InvocationKeyRow.secret_hash).where(
        col(InvocationKeyRow.revoked).is_(False)
    )
    for model, hashed in s.exec(query.order_by(col(InvocationKeyRow.id))).all():
        keys.setdefault(model, []).append(hashed)
    return {model: tuple(hashes) for model, hashes in keys.items()}


def candidate_spec(
    s: Session, model: ModelRow, split: traffic.Split, box: SecretBox | None = None
) -> tuple[AppSpec, bool] | None:
    """The application of a model's second live deployment, when it should run (reached
    only from the model's own application, its figures reported under the model's), and
    whether it takes its share: once its replicas run (DEPLOYED), or while it takes over."""
    dep = repo.maybe_deployment_row(s, split.candidate)
    if dep is None or dep.state not in repo.SERVING_DEPLOYMENTS:
        return None
    ready = dep.state == DeploymentState.DEPLOYED.value or split.promoting
    build = repo.build_row(s, dep.build)
    if build.state != BuildState.BUILT.value:
        return None
    n = names.parse_model(model.name)
    main = app_spec(model, dep, build, box)
    spec = replace(
        main,
        app_name=candidate_app_for(n.project, n.model),
        route_prefix=None,
        signals_app=main.app_name,
    )
    return spec, ready


def with_split(
    s: Session, model: ModelRow, main: AppSpec, box: SecretBox | None = None
) -> list[AppSpec]:
    """The model's application, and while two deployments are live (``ModelRow.traffic``)
    the candidate's, with the share the stable build's replicas send it."""
    split = traffic.split_from_json(model.traffic)
    found = candidate_spec(s, model, split, box) if split is not None else None
    if split is None or found is None:
        return [main]
    candidate, ready = found
    share = TrafficShare(
        from_build=split.stable_build,
        to_app=candidate.app_name,
        percent=split.percent if ready else 0,
        shadow=split.shadow,
        sticky_header=split.sticky_header,
    )
    return [replace(main, share=share), replace(candidate, access=main.access)]


def desired_apps(s: Session, box: SecretBox, open_endpoints: bool = False) -> list[AppSpec]:
    """Every application that should run, with its secret values opened with ``box``;
    ``open_endpoints`` (--insecure-no-auth): their endpoints take requests without an
    invocation key."""
    keys = {} if open_endpoints else endpoint_keys(s)
    rows = s.exec(
        select(ModelRow, DeploymentRow, BuildRow)
        .join(DeploymentRow, col(DeploymentRow.name) == col(ModelRow.active_deployment))
        .join(BuildRow, col(BuildRow.name) == col(DeploymentRow.build))
        .where(col(DeploymentRow.state).in_(repo.SERVING_DEPLOYMENTS))
        .where(BuildRow.state == BuildState.BUILT.value)
        .order_by(col(ModelRow.id))
    ).all()
    apps: list[AppSpec] = []
    for m, d, b in rows:
        main = replace(
            app_spec(m, d, b, box),
            access=EndpointAccess(open=open_endpoints, key_hashes=keys.get(m.name, ())),
        )
        apps.extend(with_split(s, m, main, box) if m.traffic else [main])
    return apps
