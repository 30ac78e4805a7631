"""How secret values reach replicas: held in memory by one actor, claimed once per replica.

Ray writes a ``runtime_env``'s environment variables into its logs, and Serve shows an
application's whole config (``serve config``, the dashboard, ``get_serve_details``) to
anyone on the cluster. So an application's config carries only a version of its secrets
(its ``secrets_version`` argument), and the values wait in the broker, an actor of the control
plane's that the control plane fills on every apply (``put``). A starting replica claims
them (``claim``) with its own actor id before it loads the model: the broker answers only
for a live actor that Serve named as a replica of that application, and only once per
actor. Another process on the cluster cannot read them from a config or a log; one that
races a starting replica for its claim makes that replica fail, saying so (Ray gives a
callee no proof of its caller: a cluster is one trust domain, as Ray's docs say).

Pure Python: ``ray_backend`` runs it as a detached actor and gives it ``actor_info``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

REPLICA_PREFIX = "SERVE_REPLICA::"
VERSIONS_KEPT = 4  # per application: replicas of the last few configs may still start
URLS_KEPT = 8  # per build: the control-plane servers that applied it last
CLAIMS_KEPT_S = 24 * 3600.0


@dataclass(frozen=True)
class ActorInfo:
    name: str  # Serve names a replica SERVE_REPLICA::{app}#{deployment}#{id}
    alive: bool


class ClaimRefused(RuntimeError):
    """Why a claim gets no values (the replica fails to start, saying this)."""


class SecretBroker:
    def __init__(self, actor_info: Callable[[str], ActorInfo | None]) -> None:
        self._actor_info = actor_info
        self._values: dict[str, dict[str, Mapping[str, str]]] = {}  # app -> version -> env
        self._claimed: dict[str, float] = {}  # actor id -> when
        # app -> artifact digest -> URL -> token: where its replicas fetch their build
        # (one URL per server that applied it, the newest last)
        self._sources: dict[str, dict[str, dict[str, str]]] = {}

    def put(
        self,
        apps: Mapping[str, tuple[str, Mapping[str, str]]],
        keep: Iterable[str] = (),
        sources: Mapping[str, tuple[str, str, str]] | None = None,
    ) -> int:
        """Every application's secrets as the control plane wants them now: ``app ->
        (version, values)``; the applications in ``keep`` keep what they have (the control
        plane could not open theirs), every other one loses its values. Returns how many
        applications have some. ``sources``: ``app -> (digest, url, token)``, where its
        replicas fetch their build on a node that does not see the control plane's disk
        (None: as they were)."""
        if sources is not None:
            self._put_sources(sources)
        kept = set(keep)
        for app in list(self._values):
            if app not in apps and app not in kept:
                del self._values[app]
        for app, (version, values) in apps.items():
            versions = self._values.setdefault(app, {})
            versions.pop(version, None)
            versions[version] = dict(values)  # the newest last
            while len(versions) > VERSIONS_KEPT:
                del versions[next(iter(versions))]
        return len(self._values)

    def _put_sources(self, sources: Mapping[str, tuple[str, str, str]]) -> None:
        for app in [a for a in self._sources if a not in sources]:
            del self._sources[app]
        for app, (digest, url, token) in sources.items():
            builds = self._sources.setdefault(app, {})
            urls = builds.pop(digest, {})
            urls.pop(url, None)
            urls[url] = token  # the newest last
            while len(urls) > URLS_KEPT:
                del urls[next(iter(urls))]
            builds[digest] = urls  # the newest last
            while len(builds) > VERSIONS_KEPT:
                del builds[next(iter(builds))]

    def source(self, app: str, digest: str, actor_id: str) -> list[tuple[str, str]]:
        """Where the replica actor ``actor_id`` of ``app`` fetches the build ``digest``:
        (URL, token) of each server that applied it, the latest first (a server that is
        gone is skipped by the replica); asked again after a failed fetch."""
        found = self._sources.get(app, {}).get(digest)
        if not found:
            raise ClaimRefused(
                f"no artifact source for {app} build {digest[:12]} here: the control plane "
                "serves artifacts to nodes only with --artifact-port"
            )
        self._check_replica(app, actor_id)
        return [(url, token) for url, token in reversed(found.items())]

    def _check_replica(self, app: str, actor_id: str) -> None:
        info = self._actor_info(actor_id)
        if info is None or not info.alive:
            raise ClaimRefused(f"actor {actor_id} is not a live actor of this cluster")
        if not info.name.startswith(f"{REPLICA_PREFIX}{app}#"):
            raise ClaimRefused(f"actor {actor_id} is not a replica of {app}")

    def has(self, app: str, version: str) -> bool:
        return version in self._values.get(app, {})

    def claim(self, app: str, version: str, actor_id: str) -> dict[str, str]:
        """The values of ``app``'s ``version``, for the replica actor ``actor_id``, once."""
        values = self._values.get(app, {}).get(version)
        if values is None:
            raise ClaimRefused(
                f"no secrets of {app} version {version} here yet: the control plane "
                "hands them over on its next apply"
            )
        if actor_id in self._claimed:
            raise ClaimRefused(
                f"the secrets of replica actor {actor_id} were claimed already: another "
                "process on the cluster asked for them first"
            )
        self._check_replica(app, actor_id)
        self._forget_old()
        self._claimed[actor_id] = time.monotonic()
        return dict(values)

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - CLAIMS_KEPT_S
        for actor_id in [a for a, at in self._claimed.items() if at < cutoff]:
            del self._claimed[actor_id]
