"""What should run: the Serve applications the database asks for, computed fresh each time."""

from __future__ import annotations

from sqlmodel import Session, col, select

from controlplane.domain import names
from controlplane.domain import states as st
from controlplane.storage import repo
from controlplane.storage.tables import BuildRow, DeploymentRow, ModelRow
from workers.backend import AppSpec, app_name_for

# A model whose active deployment is in one of these states should be running.
SERVING = (st.DeploymentState.DEPLOYING.value, st.DeploymentState.DEPLOYED.value)


def app_spec(model: ModelRow, dep: DeploymentRow, build: BuildRow) -> AppSpec:
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
        cpus=dep.cpus,
        memory_mib=dep.memory_mib,
        gpus=dep.gpus,
        environment=repo.environment_of(dep),
        restart_generation=dep.restart_generation,
    )


def desired_apps(s: Session) -> list[AppSpec]:
    rows = s.exec(
        select(ModelRow, DeploymentRow, BuildRow)
        .join(DeploymentRow, col(DeploymentRow.name) == col(ModelRow.active_deployment))
        .join(BuildRow, col(BuildRow.name) == col(DeploymentRow.build))
        .where(col(DeploymentRow.state).in_(SERVING))
        .where(BuildRow.state == st.BuildState.BUILT.value)
        .order_by(col(ModelRow.id))
    ).all()
    return [app_spec(m, d, b) for m, d, b in rows]
