"""What models do, as their replicas report it: figures, log lines and health.

Once a second (``signals_interval_s``) the server reads the cluster's collector
(``Backend.signals``, with a cursor of its own, so several servers each read it all):
- replicas' figures and proxies' refused counts go into the in-memory ``Window``
  (``series.py``: the last hour at 10 s steps), for GetModelMetrics and /metrics;
- lines go into the database (``storage/model_logs.py``), secret values redacted, for
  StreamModelLogs; each model keeps its newest ``model_log_bytes``;
- every ``health_interval_s``, each serving model's health is judged from the window
  (``domain/health.py``) and written when it changed (``lifecycle.health_observed``).
Only the applications of this database's models are kept: another control plane's, or
anyone else's, on the same cluster are not ours to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlmodel import col, select

from controlplane import lifecycle
from controlplane.config import Settings
from controlplane.domain import names
from controlplane.domain.figures import Figures, ModelSeries
from controlplane.domain.health import BuildErrors, HealthRules, Recent, Usage, judge, merge
from controlplane.domain.redaction import redact
from controlplane.domain.states import ModelState
from controlplane.metrics import Invocations, ModelUse
from controlplane.series import STEP_S, Step, Window
from controlplane.storage import model_logs, repo
from controlplane.storage.changes import Changes
from controlplane.storage.db import Database
from controlplane.storage.tables import ModelRow
from workers.backend import Backend, app_name_for
from workers.signals import Batch, LogLine, bucket_bound_ms

log = logging.getLogger(__name__)

Exported = tuple[tuple[Invocations, ...], tuple[ModelUse, ...]]  # what /metrics shows

EXPORT_TIMEOUT_S = 5.0  # for the event loop to make a /metrics scrape's figures
# How often the database is asked whether anything was written since the models were
# last read (one row: the revision counter), and how long they are kept however it
# answers (a write that moved no revision is still seen then).
KNOWN_MODELS_S = 2.0
KNOWN_MODELS_MAX_S = 30.0
TRIM_S = 30.0


def app_of(model: str) -> str:
    """The Serve application of a model (``projects/p/models/m`` -> ``p.m``)."""
    n = names.parse_model(model)
    return app_name_for(n.project, n.model)


@dataclass(frozen=True)
class _Known:
    app_to_model: Mapping[str, str]
    secrets: Mapping[str, frozenset[str]]  # model -> secret values of all its deployments
    serving: frozenset[str]  # models DEPLOYED now
    alive: Mapping[str, frozenset[str]]  # model -> ids of the replicas Serve lists now
    # Models with a record that cannot be read: their lines are not stored (their secrets
    # could not be redacted). One broken record stops nothing else.
    unreadable: frozenset[str] = frozenset()


def _known(db: Database) -> _Known:
    """This database's models, with what reading their signals needs: two narrow queries
    (deployments with secrets, and those serving), however long a model's history."""
    with db.read() as s:
        models = s.exec(select(ModelRow.name, ModelRow.state)).all()
        secrets, unreadable = repo.secret_values(s, db.secrets)
        alive = repo.serving_replica_ids(s)
    apps = {app_of(name): name for name, _ in models}
    return _Known(
        app_to_model=apps,
        secrets=secrets,
        serving=frozenset(n for n, st in models if st == ModelState.DEPLOYED.value),
        alive=alive,
        unreadable=unreadable,
    )


class Signals:
    def __init__(self, db: Database, backend: Backend, settings: Settings) -> None:
        self.db = db
        self.backend = backend
        self.settings = settings
        self.rules: HealthRules = settings.health_rules
        self.window = Window()
        self._epoch = ""
        self._cursor = 0
        self._known = _Known({}, {}, frozenset(), {})
        self._known_at = 0.0  # when the models were last asked after
        self._known_read_at = 0.0  # when they were last read
        self._known_revision = -1  # the database's revision they were read at
        self._others: set[str] = set()  # applications on the cluster not of our models
        self._health_at = time.monotonic()
        self._judged: frozenset[str] = frozenset()  # the models serving when last judged
        self._trim_at = time.monotonic()
        self._grown: set[str] = set()  # models with lines written since the last trim
        self._written = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.lines_lost = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exported: Exported = ((), ())  # the last scrape's, if the next one waits

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.settings.signals_interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="signals")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        said = ""  # the last failure logged: the same one again is not logged again
        while True:
            try:
                await self.poll()
                said = ""
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the cluster away, the database busy: next time
                if str(e) != said:
                    log.warning("cannot read the replicas' signals: %s", e)
                said = str(e)
            await asyncio.sleep(self.settings.signals_interval_s)

    async def poll(self) -> None:
        """One reading of the collector: figures, lines, and health when due."""
        batch = await self.backend.signals(self._epoch, self._cursor)
        apps = {f.app for f in batch.replicas} | {line.app for line in batch.lines}
        stale = time.monotonic() - self._known_at > KNOWN_MODELS_S
        new = apps - self._known.app_to_model.keys() - self._others
        if stale or new:  # a model made since the last look (or someone else's app)
            await asyncio.to_thread(self._know, bool(new))
            self._others = apps - self._known.app_to_model.keys()
        await self._take(batch)
        self._epoch, self._cursor = batch.epoch, batch.cursor
        due = time.monotonic() - self._health_at >= self.settings.health_interval_s
        if due or self._known.serving != self._judged:  # and at once when one starts or stops
            self._health_at = time.monotonic()
            self._judged = self._known.serving
            await asyncio.to_thread(self._judge_all)
        if time.monotonic() - self._trim_at >= TRIM_S:
            self._trim_at = time.monotonic()
            grown, self._grown = self._grown, set()
            await asyncio.to_thread(self._trim, grown)

    def _know(self, now: bool) -> None:
        """The models read again (``now``: whatever the revision says), unless nothing was
        written since they were last read and that was under KNOWN_MODELS_MAX_S ago: with
        hundreds of models, reading each one's replicas and secrets every 2 s was a
        growing part of an idle server's CPU."""
        asked = time.monotonic()
        revision = self.db.head_revision()
        kept = asked - self._known_read_at < KNOWN_MODELS_MAX_S
        if now or revision != self._known_revision or not kept:
            self._known = _known(self.db)
            self._known_revision, self._known_read_at = revision, asked
        self._known_at = asked

    async def _take(self, batch: Batch) -> None:
        apps = self._known.app_to_model
        self.window.add(
            (f for f in batch.replicas if f.app in apps),
            (p for p in batch.proxies if p.app in apps),
        )
        if batch.lines_lost:
            self.lines_lost += batch.lines_lost
            log.warning(
                "%d model log lines left the collector before they were read", batch.lines_lost
            )
        skip = self._known.unreadable
        rows = [
            self._row(apps[line.app], line)
            for line in batch.lines
            if line.app in apps and apps[line.app] not in skip
        ]
        if rows:
            await asyncio.to_thread(self._write, rows)
            self._grown.update(str(r["model"]) for r in rows)
            self._written.set()
            self._written = asyncio.Event()

    def _row(self, model: str, line: LogLine) -> dict[str, object]:
        return {
            "model": model,
            "replica": line.replica[:100],
            "seq": line.seq,
            "build": line.build[:250],
            "node": line.node[:100],
            "time": datetime.fromtimestamp(line.time, UTC),
            "stream": line.stream[:10],
            "request_id": line.request_id[:100],
            "text": redact(line.text, self._known.secrets.get(model, ())),
        }

    def _write(self, rows: list[dict[str, object]]) -> None:
        with self.db.write() as tx:
            model_logs.insert(tx.session, rows)

    def _trim(self, models: Iterable[str]) -> None:
        for model in models:
            with self.db.write() as tx:
                model_logs.trim(tx.session, model, self.settings.model_log_bytes)

    async def wait_for_lines(self, seconds: float) -> None:
        """Returns when this server wrote new lines, or after ``seconds``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._written.wait(), seconds)

    # ---- figures -------------------------------------------------------------------------

    def series(
        self,
        model: str,
        window_s: int,
        step_s: int,
        alive: Collection[str] | None = None,
        builds: bool = True,
        replicas: bool = True,
    ) -> ModelSeries:
        """``alive``: the replica ids Serve lists for the model now, when known;
        ``builds``/``replicas`` False: those series left empty (``Window.query``)."""
        return self.window.query(
            app_of(model), window_s, step_s, alive=alive, builds=builds, replicas=replicas
        )

    def recent(self, model: str) -> Recent:
        """The figures the health rules look at, from the window."""
        r = self.rules
        alive = self._known.alive.get(model, frozenset())
        # Judged for every model every health_interval_s: the windows' totals only, no
        # points (Window.brief), and the errors come with the usage when both look back
        # as far (the default rules: 10 minutes).
        usage_s, error_s = int(r.provisioning_minutes * 60), int(r.error_minutes * 60)
        app = app_of(model)
        usage = self.window.brief(app, usage_s, alive=alive)
        u = usage.totals
        period = int(r.dropping_minutes * 60)
        dropping = self.series(model, period, period, alive, builds=False, replicas=False)
        errors = usage if error_s == usage_s else self.window.brief(app, error_s, alive=alive)
        builds = [
            BuildErrors(
                names.build_label(build),
                b.requests,
                b.errors,
                datetime.fromtimestamp(b.first_error, UTC) if b.first_error is not None else None,
            )
            for build, b in errors.builds.items()
        ]
        d = dropping.model.totals
        return Recent(
            usage=Usage(
                usage.covered_steps * STEP_S / 60,
                u.cpu_used,
                u.cpu_requested,
                u.gpu_used,
                u.gpu_requested,
            ),
            refused=d.refused,
            queued=d.queued,
            replicas=d.replicas,
            busy_replicas=min(d.busy_replicas, d.replicas),
            builds=tuple(builds),
        )

    def exported(self, timeout_s: float = EXPORT_TIMEOUT_S) -> Exported:
        """The figures /metrics shows, made when it is scraped (made after every reading
        instead, scraped or not, they cost ~1.4% of a core at 50 models). A scrape runs in
        the metrics endpoint's thread: they are made on the event loop that feeds the
        window. A loop that does not get to it within ``timeout_s`` gets the last scrape's."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return self._exported
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            self._exported = self._export()
            return self._exported

        async def make() -> Exported:
            return self._export()

        made = asyncio.run_coroutine_threadsafe(make(), loop)
        try:
            self._exported = made.result(timeout_s)
        except TimeoutError:
            made.cancel()
        return self._exported

    def _export(self) -> Exported:
        models = self._known.app_to_model
        invocations = tuple(
            _invocations(models[app], build, counted)
            for (app, build), counted in sorted(self.window.counted.items())
            if app in models
        )
        use = []
        for app in self.window.apps():
            if app not in models:
                continue
            now = self._last_minute(app, models[app])
            use.append(
                ModelUse(
                    model=models[app],
                    refused=self.window.refused.get(app, 0),
                    in_flight=now.in_flight,
                    queued=now.queued,
                    cpu_used=now.cpu_used,
                    cpu_requested=now.cpu_requested,
                    memory_rss_bytes=now.memory_rss_bytes,
                    memory_requested_bytes=now.memory_requested_bytes,
                    gpu_used=now.gpu_used,
                    gpu_requested=now.gpu_requested,
                    replicas=now.replicas,
                )
            )
        return invocations, tuple(use)

    def in_flight(self, model: str) -> float | None:
        """Requests in flight on the model's replicas or queued for one in the last
        minute (the most seen), or None when no replica reported."""
        now = self._last_minute(app_of(model), model)
        if not now.replicas and not now.queued:
            return None
        return float(now.in_flight + now.queued)

    def _last_minute(self, app: str, model: str) -> Figures:
        """The model's figures over the last minute, its own alone (no builds' or
        replicas' series): requests in flight and queued, the most seen."""
        alive = self._known.alive.get(model, frozenset())
        query = self.window.query(app, 60, 60, alive=alive, builds=False, replicas=False)
        return query.model.totals

    def health(self, model: str) -> str:
        return judge(self.recent(model), self.rules)

    def _judge_all(self) -> None:
        """Each model's health now; written (one transaction) only where it changed."""
        serving = self._known.serving
        with self.db.read() as s:
            current = dict(s.exec(select(ModelRow.name, ModelRow.health)).all())
        read_minutes = (time.time() - self.window.started) / 60
        said = {
            m: merge(self.health(m), current[m], read_minutes, self.rules) if m in serving else ""
            for m in current
        }
        changed = [m for m, text in said.items() if text != current[m]]
        if not changed:
            return
        with self.db.write() as tx:
            c = Changes(tx, self.backend.http_base)
            for row in c.session.exec(select(ModelRow).where(col(ModelRow.name).in_(changed))):
                lifecycle.health_observed(c, row, said[row.name])


PROMETHEUS_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)


def _invocations(model: str, build: str, counted: Step) -> Invocations:
    """A build's counts in Prometheus' terms: each fine bucket (within 10%) goes into the
    first standard bucket its upper bound fits."""
    cumulative = []
    for le in (*PROMETHEUS_BUCKETS_S, float("inf")):
        n = sum(c for b, c in counted.latency.items() if bucket_bound_ms(b) <= le * 1000)
        cumulative.append((le, n))
    return Invocations(
        model=model,
        build=build.rsplit("/", 1)[-1],
        outcomes={
            "ok": counted.requests
            - counted.model_errors
            - counted.client_errors
            - counted.server_errors,
            "model_error": counted.model_errors,
            "client_error": counted.client_errors,
            "server_error": counted.server_errors,
        },
        buckets=tuple(cumulative),
        sum_seconds=round(
            sum(bucket_bound_ms(b) * c for b, c in counted.latency.items()) / 1000, 6
        ),
    )
