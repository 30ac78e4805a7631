"""Two builds live on a real Ray Serve, with real HTTP requests under steady load, on
PostgreSQL records (tests/integration/test_traffic.py walks the same on both databases
with the fake backend; one walk on real Serve is ~2.5 min of the suite): a canary steps
through its shares and promotes with zero failed requests, a bad build (raising on a
third of inputs) is rolled back at its first step with at most its share of requests
failed, a shadow is judged on copies then takes over, and a split set by hand is sticky
by a header and changes its weights in place."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from controlplane.api.client import Client
from controlplane.domain.traffic import Gates, Phase, Strategy, StrategyKind
from controlplane.domain.types import DeployOptions, Operation, Resources
from controlplane.server import Server
from tests.helpers import EXAMPLES, eventually
from tests.helpers.ray_cluster import IRIS, ray_server
from workers.archive import zip_directory
from workers.backend import Backend, candidate_app_for

pytestmark = pytest.mark.ray

BAD = """
import itertools

_calls = itertools.count()


def predict_badly(body):
    if next(_calls) % 3 == 2:
        raise ValueError("build 3 fails on a third of its inputs")
    return predict(body)
"""


@dataclass
class Load:
    """A steady load on the endpoint (127.0.0.1 only): every answer's status and build."""

    endpoint: str
    answers: list[tuple[int, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, http: httpx.AsyncClient) -> None:
        for _ in range(20_000):  # bounded
            if self.stopping.is_set():
                return
            try:
                r = await http.post(self.endpoint, json=IRIS, headers=self.headers)
                build = r.json().get("build", "") if r.status_code in (200, 500) else ""
                self.answers.append((r.status_code, build.rsplit("/", 1)[-1]))
            except httpx.HTTPError as e:
                self.answers.append((0, repr(e)))
            await asyncio.sleep(0.02)  # the load's pace, not a wait

    def since(self, mark: int) -> list[tuple[int, str]]:
        return self.answers[mark:]


@contextlib.asynccontextmanager
async def load_on(endpoint: str, workers: int = 2) -> AsyncIterator[Load]:
    load = Load(endpoint)
    async with httpx.AsyncClient(timeout=30) as http:
        tasks = [asyncio.create_task(load.worker(http)) for _ in range(workers)]
        try:
            await eventually("the load under way", lambda: len(load.answers) >= 8, 60)
            yield load
        finally:
            load.stopping.set()
            await asyncio.gather(*tasks)


class Iris:
    """A model serving iris build 1; ``build`` adds builds beside it."""

    def __init__(self, c: Client, model: str, tmp: Path) -> None:
        self.c = c
        self.model = model
        self.tmp = tmp

    async def build(self, folder: Path, function: str, deploy: bool = False) -> str:
        archive = self.tmp / f"{folder.name}.zip"
        zip_directory(folder, archive)
        source = await self.c.upload_source(self.model, archive.read_bytes())
        options = DeployOptions(Resources(replicas=1, cpus=0.1)) if deploy else None
        op = await self.c.create_build(
            self.model, source.sha256, "model.py", function, deploy=options
        )
        op = await self.c.wait(op.name, timeout_s=240)
        assert op.error is None, op.error
        return op.target

    async def rollout(self, build: str, strategy: Strategy) -> Operation:
        op = await self.c.create_deployment(self.model, build, rollout=strategy)
        return await self.c.wait(op.name, timeout_s=240)

    async def replica_ids(self) -> set[str]:
        m = await self.c.get_model(self.model)
        return {r.id for r in (await self.c.get_deployment(m.active_deployment)).replicas}


@contextlib.asynccontextmanager
async def iris(
    ray_backend: Backend, tmp_path: Path, database_url: str, model_id: str
) -> AsyncIterator[tuple[Server, Iris]]:
    async with (
        ray_server(
            ray_backend,
            tmp_path / "data",
            database_url=database_url,
            signals_interval_s=0.25,
            rollout_interval_s=0.25,
        ) as server,
        Client(server.grpc_address) as c,
    ):
        model = (await c.create_model("projects/traffic", model_id)).name
        i = Iris(c, model, tmp_path)
        await i.build(EXAMPLES / "iris-v1", "predict", deploy=True)
        yield server, i
        with contextlib.suppress(Exception):
            await c.wait((await c.stop_model(model)).name, timeout_s=120)


async def test_canary_rollback_shadow_and_split_under_load(
    ray_backend: Backend, tmp_path: Path, fresh_postgres: str
) -> None:
    async with iris(ray_backend, tmp_path, fresh_postgres, "iris") as (_, i):
        v2 = await i.build(EXAMPLES / "iris-v2", "classify")
        bad_dir = tmp_path / "iris-bad"
        shutil.copytree(EXAMPLES / "iris-v1", bad_dir)
        (bad_dir / "model.py").write_text((bad_dir / "model.py").read_text() + BAD)
        bad = await i.build(bad_dir, "predict_badly")
        endpoint = (await i.c.get_model(i.model)).endpoint
        stable_replicas = await i.replica_ids()
        gates = Gates(max_error_rate=0.01, max_p99_ms=5000, min_requests=10)

        async with load_on(endpoint) as load:
            start = len(load.answers)
            op = await i.c.create_deployment(
                i.model, v2, rollout=Strategy(StrategyKind.CANARY, (50, 100), 1.0, gates)
            )

            async def at_the_last_step() -> bool:
                got = await i.c.get_operation(op.name)
                assert got.rollout is not None and not got.done, got
                return got.rollout.phase is Phase.BAKING and got.rollout.step == 1

            await eventually("the canary at its last step (100%)", at_the_last_step, 120)
            # Shares changed in place: the model's own replicas are those from before.
            assert await i.replica_ids() == stable_replicas
            done = await i.c.wait(op.name, timeout_s=240)
            assert done.error is None, done.error
            mark = len(load.answers)
            await eventually("answers after the promotion", lambda: len(load.answers) > mark + 20)
            during = load.since(start)
        failed = [a for a in during if a[0] != 200]
        assert failed == [], f"{len(failed)} of {len(during)} failed: {failed[:5]}"
        builds = collections.Counter(b for _, b in during)
        assert builds["1"] and builds["2"], builds  # both answered while it stepped
        assert {b for _, b in load.since(mark)} == {"2"}
        m = await i.c.get_model(i.model)
        assert m.traffic is None
        assert (await i.c.get_deployment(m.active_deployment)).build == v2

        # A build that fails on a third of its inputs: rolled back at its first step.
        async with load_on(endpoint) as load:
            start = len(load.answers)
            done = await i.rollout(
                bad, Strategy(StrategyKind.CANARY, (10, 100), 120.0, replace_min(gates, 20))
            )

            async def all_back_on_build_2() -> bool:
                # The roll back's apply lands within seconds; until Serve has deleted the
                # candidate's application, the stable replica may still send it a share.
                candidate = candidate_app_for("traffic", "iris")
                last = load.answers[-20:]
                return (
                    candidate not in await ray_backend.observe()
                    and len(load.answers) > start + 20
                    and last == [(200, "2")] * 20
                )

            await eventually("every answer from build 2 again", all_back_on_build_2, 30)
            during = load.since(start)
        assert done.error is not None and done.error.reason == "ROLLOUT_GATE_FAILED"
        assert "step 1/2 (10%)" in done.error.message
        assert "gate max_error_rate failed" in done.error.message
        assert "threshold 1%" in done.error.message
        failed = [a for a in during if a[0] != 200]
        # Only the canary's requests could fail: at most its 10% share of those sent.
        assert failed and all(status == 500 and b == "3" for status, b in failed), failed[:5]
        assert len(failed) <= 0.10 * len(during), (len(failed), len(during))
        m = await i.c.get_model(i.model)
        assert m.traffic is None and "rolled back" in m.message
        assert (await i.c.get_deployment(m.active_deployment)).build == v2

        # A shadow of build 1 (build 2 serves): judged on copies, then it takes over.
        v1 = f"{i.model}/builds/1"
        gates = Gates(max_error_rate=0.01, max_p99_ratio=20, min_requests=10)
        async with load_on(endpoint) as load:
            start = len(load.answers)
            op = await i.c.create_deployment(
                i.model, v1, rollout=Strategy(StrategyKind.SHADOW, (100,), 6.0, gates)
            )

            async def judged_on_copies() -> tuple[Operation, list[tuple[int, str]]]:
                answers = load.since(start)  # all given while the copy ran (read first)
                got = await i.c.get_operation(op.name)
                assert got.rollout is not None and got.rollout.phase is Phase.BAKING, got
                assert got.rollout.candidate.requests >= 10, got
                return got, answers

            _, answers = await eventually("build 1 answering copies", judged_on_copies, 120)
            # Copies only: every answer still comes from build 2.
            assert {b for _, b in answers} == {"2"}
            done = await i.c.wait(op.name, timeout_s=240)
            assert done.error is None, done.error
            during = load.since(start)
        assert [a for a in during if a[0] != 200] == []
        m = await i.c.get_model(i.model)
        assert (await i.c.get_deployment(m.active_deployment)).build == v1

        # A split by hand, build 2 for half the callers, sticky by X-User.
        op = await i.c.set_traffic(i.model, {v2: 50, v1: 50}, sticky_header="X-User")
        op = await i.c.wait(op.name, timeout_s=240)
        assert op.error is None, op.error
        m = await i.c.get_model(i.model)
        assert m.traffic is not None and m.traffic.percent == 50
        main, second = await both_replicas(i)
        async with httpx.AsyncClient(timeout=30) as http:

            async def sticky() -> dict[str, set[str]]:
                by_user: dict[str, set[str]] = {}
                for user in ("ana", "bo", "cy", "dee", "eli", "fay", "gus", "hal"):
                    for _ in range(4):
                        r = await http.post(endpoint, json=IRIS, headers={"X-User": user})
                        assert r.status_code == 200, r.text
                        build = r.json()["build"].rsplit("/", 1)[-1]
                        by_user.setdefault(user, set()).add(build)
                assert all(len(builds) == 1 for builds in by_user.values()), by_user
                assert set().union(*by_user.values()) == {"1", "2"}, by_user
                return by_user

            # The operation ends once both builds' replicas run; Serve hands each stable
            # replica its share (reconfigure) a moment later, replica by replica: the
            # split is sticky once they all have it (within a second, as below).
            await eventually("a split sticky by X-User", sticky, 15)

            # New weights in place: no replica of either build restarts, and they take
            # effect within a second of the call.
            await set_and_see(i, http, endpoint, {v1: 99, v2: 1}, "1")
            took = await set_and_see(i, http, endpoint, {v1: 1, v2: 99}, "2")
            assert took < 1.0, f"the new weights took {took:.2f} s"
        assert await both_replicas(i) == (main, second)


def replace_min(g: Gates, n: int) -> Gates:
    return Gates(g.max_error_rate, g.max_p99_ms, g.max_p99_ratio, n)


async def set_and_see(
    i: Iris, http: httpx.AsyncClient, endpoint: str, weights: dict[str, int], mostly: str
) -> float:
    """Sets ``weights`` while answers are read one after another; returns how long after
    the call the answers were mostly (8 of the next 10) from build ``mostly``."""
    answers: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async def probe() -> None:
        for _ in range(5000):  # bounded
            if stop.is_set():
                return
            r = await http.post(endpoint, json=IRIS)
            answers.append((time.monotonic(), r.json()["build"].rsplit("/", 1)[-1]))

    prober = asyncio.create_task(probe())
    start = time.monotonic()
    op = await i.c.set_traffic(i.model, weights)
    assert (await i.c.wait(op.name, timeout_s=60)).error is None

    def switched() -> tuple[float] | None:  # (seconds,): 0.0 is an answer too
        after = [a for a in answers if a[0] >= start]
        for k in range(len(after) - 9):
            if sum(b == mostly for _, b in after[k : k + 10]) >= 8:
                return (after[k][0] - start,)
        return None

    try:
        found = await eventually(f"mostly build {mostly}", switched, 10, 0.1)
    finally:
        stop.set()
        await prober
    assert found is not None
    return found[0]


async def both_replicas(i: Iris) -> tuple[set[str], set[str]]:
    m = await i.c.get_model(i.model)
    assert m.traffic is not None
    stable = await i.c.get_deployment(m.traffic.stable)
    candidate = await i.c.get_deployment(m.traffic.candidate)
    return {r.id for r in stable.replicas}, {r.id for r in candidate.replicas}
