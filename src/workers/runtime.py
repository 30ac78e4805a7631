"""The runtime a build is made for: Python implementation, version and platform.

A build's dependencies are compiled for one Python (major.minor) on one platform, so a
build records the runtime of the worker that made it, and a deploy checks it against
the cluster's before any replica starts (a mismatch would fail at import, or worse).
"""

from __future__ import annotations

import platform
import sys
import sysconfig
from dataclasses import dataclass


@dataclass(frozen=True)
class Runtime:
    implementation: str  # "cpython"
    python_version: str  # "3.11.7"
    platform: str  # "linux-x86_64"

    @property
    def python(self) -> str:
        """major.minor: what compiled dependencies are tied to."""
        return ".".join(self.python_version.split(".")[:2])

    @property
    def abi(self) -> str:
        """What a build's artifact is compatible with (patch versions are interchangeable)."""
        return f"{self.implementation}-{self.python}-{self.platform}"

    def text(self) -> str:
        return f"{self.implementation} {self.python_version} {self.platform}"

    def describe(self) -> str:
        return f"{self.implementation} {self.python} on {self.platform}"


def current() -> Runtime:
    return Runtime(sys.implementation.name, platform.python_version(), sysconfig.get_platform())


def parse(text: str) -> Runtime | None:
    """The inverse of ``Runtime.text``; None for an empty or unknown value."""
    parts = text.split()
    return Runtime(*parts) if len(parts) == 3 else None


def mismatch(built: Runtime, cluster: Runtime) -> str:
    """Why an artifact made on ``built`` cannot run on ``cluster``; "" when it can."""
    if built.abi == cluster.abi:
        return ""
    return (
        f"it was built for {built.describe()} and the cluster runs {cluster.describe()}; "
        "build it again on this cluster"
    )
