"""AIP-style resource names: parse (with clear errors) and format."""

from __future__ import annotations

import re
from dataclasses import dataclass

from controlplane.domain.errors import invalid_field

_ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_id(value: str, field_name: str) -> str:
    """AIP-122: 1-63 of [a-z0-9-], starting with a letter and not ending with a hyphen."""
    if not _ID.match(value):
        raise invalid_field(
            field_name,
            f"{value!r} is not a valid id: use 1 to 63 lowercase letters, digits and hyphens, "
            "starting with a letter and not ending with a hyphen",
            reason="INVALID_ID",
        )
    return value


@dataclass(frozen=True, order=True)
class ProjectName:
    project: str

    def __str__(self) -> str:
        return f"projects/{self.project}"


@dataclass(frozen=True, order=True)
class ModelName:
    project: str
    model: str

    def __str__(self) -> str:
        return f"projects/{self.project}/models/{self.model}"

    @property
    def parent(self) -> ProjectName:
        return ProjectName(self.project)

    def build(self, version: int) -> BuildName:
        return BuildName(self.project, self.model, version)

    def deployment(self, number: int) -> DeploymentName:
        return DeploymentName(self.project, self.model, number)


@dataclass(frozen=True, order=True)
class BuildName:
    project: str
    model: str
    version: int

    def __str__(self) -> str:
        return f"projects/{self.project}/models/{self.model}/builds/{self.version}"

    @property
    def parent(self) -> ModelName:
        return ModelName(self.project, self.model)


@dataclass(frozen=True, order=True)
class DeploymentName:
    project: str
    model: str
    number: int

    def __str__(self) -> str:
        return f"projects/{self.project}/models/{self.model}/deployments/{self.number}"

    @property
    def parent(self) -> ModelName:
        return ModelName(self.project, self.model)


def _split(value: str, field_name: str, shape: tuple[str, ...]) -> list[str]:
    parts = value.split("/")
    pattern = "/".join(f"{{{p}}}" if i % 2 else p for i, p in enumerate(shape))
    if len(parts) != len(shape) or any(parts[i] != shape[i] for i in range(0, len(shape), 2)):
        raise invalid_field(
            field_name,
            f"{value!r} is not a valid name: expected {pattern}"
            if value
            else f"required: {pattern}",
            reason="INVALID_NAME",
        )
    return parts


def _number(value: str, field_name: str, what: str) -> int:
    if not value.isdigit() or value.startswith("0") or len(value) > 18:
        raise invalid_field(
            field_name, f"{what} must be a positive integer, got {value!r}", reason="INVALID_NAME"
        )
    return int(value)


def parse_project(value: str, field_name: str = "parent") -> ProjectName:
    parts = _split(value, field_name, ("projects", "project"))
    return ProjectName(check_id(parts[1], field_name))


def parse_model(value: str, field_name: str = "name") -> ModelName:
    parts = _split(value, field_name, ("projects", "project", "models", "model"))
    return ModelName(check_id(parts[1], field_name), check_id(parts[3], field_name))


def parse_build(value: str, field_name: str = "name") -> BuildName:
    parts = _split(
        value, field_name, ("projects", "project", "models", "model", "builds", "version")
    )
    return BuildName(
        check_id(parts[1], field_name),
        check_id(parts[3], field_name),
        _number(parts[5], field_name, "build version"),
    )


def parse_deployment(value: str, field_name: str = "name") -> DeploymentName:
    parts = _split(
        value, field_name, ("projects", "project", "models", "model", "deployments", "number")
    )
    return DeploymentName(
        check_id(parts[1], field_name),
        check_id(parts[3], field_name),
        _number(parts[5], field_name, "deployment number"),
    )


_OPERATION = re.compile(r"^operations/[a-z0-9-]{1,64}$")


def parse_operation(value: str, field_name: str = "name") -> str:
    if not _OPERATION.match(value):
        raise invalid_field(
            field_name,
            f"{value!r} is not a valid name: expected operations/{{id}}",
            reason="INVALID_NAME",
        )
    return value


def build_label(build: str) -> str:
    """A build as people say it: ``projects/p/models/m/builds/4`` -> ``build 4``."""
    return f"build {build.rsplit('/', 1)[-1]}" if "/builds/" in build else build or "build ?"
