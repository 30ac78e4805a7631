"""The Serve config a model's application gets (``ray_backend._app_config``): the replica
count always as an ``autoscaling_config``, so that counts, bounds, and switching between
a fixed count and autoscaling stay lightweight changes for Serve."""

from __future__ import annotations

from typing import Any

from workers.backend import AppSpec, AutoscalingSpec
from workers.ray_backend import _app_config

SPEC = AppSpec(
    app_name="p.m",
    route_prefix="/p/m",
    model_name="projects/p/models/m",
    deployment_name="projects/p/models/m/deployments/1",
    build_name="projects/p/models/m/builds/1",
    artifact_path="/data/artifacts/abc",
    file_path="model.py",
    function_name="predict",
    replicas=2,
    cpus=0.5,
    memory_mib=0,
    gpus=0.0,
)
AUTO = AutoscalingSpec(
    min_replicas=0, max_replicas=4, target_ongoing_requests=2, upscale_delay_s=0,
    downscale_delay_s=60,
)  # fmt: skip


def deployment(spec: AppSpec, new: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = _app_config(spec, new=new)["deployments"][0]
    return d


def test_a_fixed_count_is_an_autoscaling_config_with_equal_bounds() -> None:
    d = deployment(SPEC)
    assert "num_replicas" not in d
    assert d["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2}
    assert deployment(SPEC, new=False)["autoscaling_config"]["initial_replicas"] == 2


def test_an_autoscaled_application_starts_with_its_count_and_then_keeps_what_it_has() -> None:
    spec = AppSpec(**{**SPEC.__dict__, "replicas": 1, "autoscaling": AUTO})
    config = deployment(spec)["autoscaling_config"]
    assert config == {
        "min_replicas": 0,
        "max_replicas": 4,
        "initial_replicas": 1,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 0,
        "downscale_delay_s": 60,
    }
    # Serve sets the count to initial_replicas on every config change: a running
    # application gets none, and keeps the count its autoscaler reached.
    assert "initial_replicas" not in deployment(spec, new=False)["autoscaling_config"]


def test_no_runtime_env_unless_the_user_sets_variables() -> None:
    """A runtime_env of any kind makes Ray start a new worker process for each replica;
    without one a replica starts in a worker Ray has ready."""
    assert "runtime_env" not in _app_config(SPEC)
    spec = AppSpec(**{**SPEC.__dict__, "environment": {"MODEL_MODE": "fast"}})
    assert _app_config(spec)["runtime_env"] == {"env_vars": {"MODEL_MODE": "fast"}}


def test_a_restart_or_new_secrets_change_the_args_serve_hashes_into_the_code_version() -> None:
    """Serve replaces every replica when an application's args change (its code version
    hashes import path, runtime_env and args): a restart is a new generation there."""
    args = _app_config(SPEC)["args"]
    assert args["restart_generation"] == 0 and "secrets_version" not in args
    restarted = AppSpec(**{**SPEC.__dict__, "restart_generation": 1})
    assert _app_config(restarted)["args"] == {**args, "restart_generation": 1}
    secret = AppSpec(**{**SPEC.__dict__, "secrets_version": "v2"})
    assert _app_config(secret)["args"] == {**args, "secrets_version": "v2"}
    # The values never: only the version the replica claims them with.
    assert "secrets" not in _app_config(secret)["args"]
