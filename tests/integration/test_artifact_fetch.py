"""A node that does not see the control plane's disk gets a build by its digest: the
archive is made once, served only with the artifact's token, checked against its SHA-256
and unpacked once per node, however many replicas start there at once."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controlplane.artifact_endpoint import ArtifactEndpoint, artifact_key
from controlplane.files import Files
from workers import artifact_archive
from workers.artifact_archive import FetchFailed, Remote

DIGEST = "ab" * 32


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = tmp_path / "artifacts" / DIGEST
    (folder / "pkg").mkdir(parents=True)
    (folder / "model.py").write_text("def predict(body):\n    return body\n")
    (folder / "pkg" / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    (folder / "pkg" / "link").symlink_to("weights.bin")
    return tmp_path / "artifacts"


@pytest.fixture
def endpoint(artifacts: Path, tmp_path: Path) -> Iterator[ArtifactEndpoint]:
    files = Files(artifacts, tmp_path / "logs", None)
    served = ArtifactEndpoint(files.archive, artifact_key(tmp_path / "data"), "127.0.0.1", 0)
    served.start()
    yield served
    served.stop()


def remote(endpoint: ArtifactEndpoint, tmp_path: Path, sha: str, token: str = "") -> Remote:
    key = artifact_key(tmp_path / "data")
    return Remote(
        DIGEST,
        sha,
        f"{endpoint.url}/artifacts/{DIGEST}.tar",
        token or artifact_archive.token(key, DIGEST),
    )


def test_the_archive_is_made_once_and_the_key_file_is_private(
    artifacts: Path, tmp_path: Path
) -> None:
    first = artifact_archive.pack(artifacts, DIGEST)
    tar, _ = artifact_archive.archive_paths(artifacts, DIGEST)
    made = tar.stat().st_mtime_ns
    assert artifact_archive.pack(artifacts, DIGEST) == first and tar.stat().st_mtime_ns == made
    artifact_key(tmp_path / "data")
    assert (tmp_path / "data" / "artifacts.key").stat().st_mode & 0o777 == 0o600


async def test_the_endpoint_answers_only_the_artifact_s_token(
    endpoint: ArtifactEndpoint, artifacts: Path, tmp_path: Path
) -> None:
    good = remote(endpoint, tmp_path, "")
    async with httpx.AsyncClient(timeout=10) as http:
        url = good.url
        assert (await http.get(url)).status_code == 401
        wrong = {"authorization": f"Bearer {artifact_archive.token(b'other', DIGEST)}"}
        assert (await http.get(url, headers=wrong)).status_code == 401
        # A token comes before anything is looked up (or fetched from the database).
        other = url.replace(DIGEST, "cd" * 32)
        assert (await http.get(other, headers=wrong)).status_code == 401
        key = artifact_key(tmp_path / "data")
        for_other = {"authorization": f"Bearer {artifact_archive.token(key, 'cd' * 32)}"}
        assert (await http.get(other, headers=for_other)).status_code == 404
        assert (await http.get(f"{endpoint.url}/etc/passwd")).status_code == 404
        ok = await http.get(url, headers={"authorization": f"Bearer {good.token}"})
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/x-tar"
    tar, _ = artifact_archive.archive_paths(artifacts, DIGEST)
    assert ok.content == tar.read_bytes()


def test_a_node_fetches_once_checks_and_unpacks_once(
    endpoint: ArtifactEndpoint, artifacts: Path, tmp_path: Path
) -> None:
    sha = artifact_archive.pack(artifacts, DIGEST)
    cache = tmp_path / "node-cache"
    asked: list[int] = []

    def source() -> list[Remote]:
        asked.append(1)
        return [remote(endpoint, tmp_path, sha)]

    missing = str(tmp_path / "not-on-this-node" / DIGEST)
    found: list[str] = []
    replicas = [
        threading.Thread(
            target=lambda: found.append(artifact_archive.local_copy(missing, DIGEST, source, cache))
        )
        for _ in range(4)
    ]
    for r in replicas:
        r.start()
    for r in replicas:
        r.join(30)
    here = cache / DIGEST
    assert found == [str(here)] * 4 and endpoint.served == 1, "fetched once for four replicas"
    assert (here / "pkg" / "weights.bin").read_bytes() == bytes(range(256)) * 4096
    assert (here / "pkg" / "link").readlink() == Path("weights.bin")
    assert (here / "model.py").read_text().startswith("def predict")
    assert artifact_archive.local_copy(missing, DIGEST, source, cache) == str(here)
    assert endpoint.served == 1 and len(asked) == 1, "the cache answers, the broker is not asked"
    assert artifact_archive.collect(cache, keep=0) == [], "a replica here uses it"
    # A node that sees the folder uses it as it is, and asks nobody.
    seen = str(artifacts / DIGEST)
    assert artifact_archive.local_copy(seen, DIGEST, source, cache) == seen and len(asked) == 1


def test_a_node_cache_keeps_what_replicas_use_and_the_latest_builds(tmp_path: Path) -> None:
    cache = tmp_path / "node-cache"
    for i in range(5):  # d0 used longest ago, d4 last
        (cache / f"d{i}").mkdir(parents=True)
        (cache / f".d{i}.use").touch()
        os.utime(cache / f".d{i}.use", (1000 + i, 1000 + i))
    with (cache / ".d0.use").open("ab") as replica:  # a replica of d0 still runs
        fcntl.flock(replica, fcntl.LOCK_SH)
        assert sorted(artifact_archive.collect(cache, keep=2)) == ["d1", "d2"]
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        "d0",
        "d3",
        "d4",
    ]
    assert [p.name for p in cache.iterdir() if "gone" in p.name] == [], "nothing half-removed"
    assert sorted(artifact_archive.collect(cache, keep=0)) == ["d0", "d3", "d4"]


def test_a_wrong_archive_or_token_is_refused_and_leaves_nothing(
    endpoint: ArtifactEndpoint, artifacts: Path, tmp_path: Path
) -> None:
    sha = artifact_archive.pack(artifacts, DIGEST)
    cache = tmp_path / "node-cache"
    missing = str(tmp_path / "elsewhere" / DIGEST)
    with pytest.raises(FetchFailed, match="SHA-256"):
        artifact_archive.local_copy(
            missing, DIGEST, lambda: [remote(endpoint, tmp_path, "0" * 64)], cache
        )
    with pytest.raises(FetchFailed, match="401"):
        artifact_archive.local_copy(
            missing, DIGEST, lambda: [remote(endpoint, tmp_path, sha, "nope")], cache
        )
    with pytest.raises(FetchFailed, match="serves no artifacts"):
        artifact_archive.local_copy(missing, DIGEST, list, cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
