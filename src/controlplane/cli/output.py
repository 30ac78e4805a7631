"""Printing results: aligned tables for people, JSON for scripts (one document per result)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from enum import Enum, IntEnum
from typing import Any, TextIO

from controlplane.domain.access import AuditRecord, InvocationKey, Token
from controlplane.domain.figures import Figures, ModelMetrics
from controlplane.domain.names import build_label
from controlplane.domain.plan import Plan
from controlplane.domain.scaling import Autoscaling, Scale
from controlplane.domain.traffic import Split
from controlplane.domain.types import (
    Build,
    Deployment,
    Event,
    LogLine,
    Model,
    Operation,
    Resources,
)


def plain(value: Any) -> Any:
    """Domain dataclasses -> JSON-ready dicts (enums as their names, times as ISO 8601)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, IntEnum):  # ordered names, e.g. a token's role: "deployer"
        return value.name.lower()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "items") and callable(value.items):  # other Mappings
        return {str(k): plain(v) for k, v in value.items()}
    return value


def when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def resources(r: Resources) -> str:
    mem = f"{r.memory_mib}MiB" if r.memory_mib else "-"
    a = r.autoscaling
    count = f"{r.replicas}x" if a is None else f"{a.min_replicas}-{a.max_replicas}x autoscaling"
    return f"{count} cpu={r.cpus:g} mem={mem} gpu={r.gpus:g}"


def autoscaling_text(a: Autoscaling, replicas: int) -> str:
    """A deployment's autoscaling in full; ``replicas``: the count it starts with (0: the
    default, max(1, min))."""
    return (
        f"autoscaling: {a.min_replicas} to {a.max_replicas} replicas, target "
        f"{a.target_ongoing_requests:g} requests in flight per replica, upscale delay "
        f"{seconds(a.upscale_delay_s)}, downscale delay {seconds(a.downscale_delay_s)}, "
        f"starts with {a.initial(replicas)}"
    )


def clock(value: datetime) -> str:
    """HH:MM:SS today, the date too before today."""
    local = value.astimezone()
    same_day = local.date() == datetime.now().astimezone().date()
    return local.strftime("%H:%M:%S") if same_day else when(value)


def scale_short(s: Scale | None) -> str:
    """A model's replicas in a table cell: running/wanted, e.g. 2/3 auto."""
    if s is None:
        return "-"
    return f"{s.running}/{s.desired}" + (" auto" if s.autoscaled else "")


def scale_text(s: Scale) -> str:
    """``replicas: 3 wanted, 2 running (autoscaling)`` and the last decision."""
    lines = [
        f"replicas: {s.desired} wanted, {s.running} running "
        + ("(autoscaling)" if s.autoscaled else "(fixed)")
    ]
    d = s.last
    if d is not None:
        lines.append(
            f"last scale: {d.from_replicas} -> {d.to_replicas} at {clock(d.time)}: {d.reason}"
        )
    return "\n".join(lines)


def _cause_value(text: str) -> str:
    return short(text) if text.startswith("projects/") else text


def plan_text(plan: Plan) -> str:
    """A --dry-run's plan: the change class and its causes, what happens to the replicas,
    and the room on the cluster's nodes."""
    lines = [f"change: {plan.change_class.value}"]
    lines += [
        f"  {c.field}: {_cause_value(c.before)} -> {_cause_value(c.after)}" for c in plan.causes
    ]
    lines.append(
        f"replicas: {plan.kept} kept, {plan.replaced} replaced, {plan.removed} removed, "
        f"{plan.added} added, {plan.after} after"
    )
    if plan.current:
        lines.append(f"running now: {', '.join(plan.current)}")
    fit = plan.fit
    if fit is None:
        lines.append("capacity: not judged (the cluster's nodes could not be read)")
    elif not fit.to_place and not fit.room_for:  # a stop, a scale down: nothing to place
        lines.append("capacity: fits (no new replica to place)")
    else:
        lines.append("capacity: fits" if fit.fits else f"capacity: DOES NOT FIT: {fit.reason}")
        lines.append(
            f"per replica: {fit.need.words()}; {fit.placed} of {fit.to_place} new "
            f"replica{'s' if fit.to_place != 1 else ''} placed"
        )
        if fit.nodes:
            rows = [
                [
                    n.node.node,
                    f"{n.node.cpus_free:g}/{n.node.cpus_total:g}",
                    f"{n.node.gpus_free:g}/{n.node.gpus_total:g}",
                    f"{size(n.node.memory_free_mib * _MIB)}/{size(n.node.memory_total_mib * _MIB)}",
                    str(n.new_replicas),
                ]
                for n in fit.nodes
            ]
            headers = [
                "node",
                "cpu free/total",
                "gpu free/total",
                "memory free/total",
                "new replicas",
            ]
            lines += ["", table(headers, rows), ""]
        else:
            lines.append("no live node")
        if fit.room_for:
            lines.append(f"room for {fit.room_for} replica{'s' if fit.room_for != 1 else ''}")
    if plan.summary:
        lines.append(f"summary: {plan.summary}")
    return "\n".join(lines)


def short(name: str) -> str:
    """projects/p/models/m/builds/3 -> builds/3 (enough inside a model's table)."""
    parts = name.split("/")
    return "/".join(parts[-2:]) if len(parts) > 4 else name


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _model_rows(items: Sequence[Model]) -> tuple[list[str], list[list[str]]]:
    return ["name", "state", "active deployment", "replicas", "endpoint", "updated"], [
        [
            m.name,
            m.state.value,
            short(m.active_deployment) or "-",
            scale_short(m.scale),
            m.endpoint,
            when(m.update_time),
        ]
        for m in items
    ]


def _build_rows(items: Sequence[Build]) -> tuple[list[str], list[list[str]]]:
    return ["build", "state", "file", "function", "image", "created", "error"], [
        [
            short(b.name),
            b.state.value,
            b.file_path,
            b.function_name,
            b.image[:30] + ("…" if len(b.image) > 30 else "") or "-",
            when(b.create_time),
            b.error or "",
        ]
        for b in items
    ]


def _deployment_rows(items: Sequence[Deployment]) -> tuple[list[str], list[list[str]]]:
    return ["deployment", "state", "build", "resources", "replicas", "updated", "message"], [
        [
            short(d.name),
            d.state.value,
            short(d.build),
            resources(d.resources),
            str(sum(1 for r in d.replicas if r.state.value == "RUNNING")) + f"/{len(d.replicas)}",
            when(d.update_time),
            d.message,
        ]
        for d in items
    ]


def _operation_rows(items: Sequence[Operation]) -> tuple[list[str], list[list[str]]]:
    return ["operation", "kind", "target", "done", "progress", "error"], [
        [
            o.name,
            o.kind.value,
            short(o.target),
            "yes" if o.done else "no",
            o.progress,
            f"{o.error.code}: {o.error.message}" if o.error else "",
        ]
        for o in items
    ]


def _replica_rows(d: Deployment) -> str:
    return table(
        ["replica", "state", "pid", "node", "started"],
        [[r.id, r.state.value, str(r.pid), r.node, when(r.start_time)] for r in d.replicas],
    )


def _build_details(b: Build) -> str:
    size = f"{b.size_bytes / 1024 / 1024:,.1f} MiB"
    head = f"runtime {b.runtime}, {size}" + (", cache hit" if b.cache_hit else "")
    if not b.packages:
        return head + "\nno packages installed"
    rows = [[p.name, p.version, "yes" if p.requested else "", p.sha256[:16]] for p in b.packages]
    return head + "\n\n" + table(["package", "version", "requested", "sha256"], rows)


def _token_rows(items: Sequence[Token]) -> tuple[list[str], list[list[str]]]:
    return ["name", "role", "expires", "revoked", "created", "description"], [
        [
            tok.name,
            tok.role.label,
            when(tok.expire_time) if tok.expire_time else "never",
            "yes" if tok.revoked else "",
            when(tok.create_time),
            tok.description,
        ]
        for tok in items
    ]


def _audit_rows(items: Sequence[AuditRecord]) -> tuple[list[str], list[list[str]]]:
    return ["time", "who", "what", "resource", "result", "from"], [
        [
            when(r.time),
            r.principal,
            r.method.rsplit("/", 1)[-1],
            r.resource or r.operation,
            r.code,
            r.peer,
        ]
        for r in items
    ]


def _key_rows(items: Sequence[InvocationKey]) -> tuple[list[str], list[list[str]]]:
    return ["name", "revoked", "created", "creator", "description"], [
        [k.name, "yes" if k.revoked else "", when(k.create_time), k.creator, k.description]
        for k in items
    ]


# ---- signals ---------------------------------------------------------------------------------


_MIB = 1024 * 1024


def size(n: int) -> str:
    """Bytes as people read them: 0, 900B, 12.0MiB, 1.5GiB."""
    if n <= 0:
        return "0"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"


def seconds(s: float) -> str:
    """3600 -> 1h, 90 -> 1m30s, 10 -> 10s, 0.5 -> 0.5s."""
    if s != int(s) or s < 1:
        return f"{s:g}s"
    s = int(s)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    text = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{sec}s" if sec else "")
    return text or "0s"


def ms(value: float) -> str:
    """A latency: 25.2, 1,234."""
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def _gpu(f: Figures) -> str:
    if f.gpu_used < 0 and not f.gpu_requested:
        return "-"
    used = "n/m" if f.gpu_used < 0 else f"{f.gpu_used:.2f}"
    return f"{used}/{f.gpu_requested:g}"


def _figure_row(label: str, f: Figures, model: bool) -> list[str]:
    return [
        label,
        str(f.requests),
        f"{f.model_errors}/{f.client_errors}/{f.server_errors}",
        str(f.refused) if model else "-",
        str(f.in_flight),
        str(f.queued) if model else "-",
        f"{ms(f.latency_p50_ms)}/{ms(f.latency_p95_ms)}/{ms(f.latency_p99_ms)}",
        f"{f.cpu_used:.2f}/{f.cpu_requested:g}",
        f"{size(f.memory_rss_bytes)}/{size(f.memory_requested_bytes)}",
        _gpu(f),
    ]


def metrics_text(m: ModelMetrics) -> str:
    """The model's totals, a row per build and per replica, the replicas, its health."""
    s = m.series
    start, end = (datetime.fromtimestamp(t).strftime("%H:%M:%S") for t in (s.start, s.end))
    head = (
        f"{m.name}: last {seconds(s.end - s.start)} ({start} to {end}), "
        f"steps of {seconds(s.step_s)}"
    )
    rows = [_figure_row("model", s.model.totals, True)]
    rows += [_figure_row(build_label(b), series.totals, False) for b, series in s.builds.items()]
    rows += [_figure_row(f"replica {r.replica}", r.series.totals, False) for r in s.replicas]
    headers = ["", "requests", "errors m/4xx/5xx", "refused", "in flight", "queued",
               "p50/p95/p99 ms", "cpu used/req", "mem rss/req", "gpu used/req"]  # fmt: skip
    parts = [head, "", table(headers, rows)]
    if s.replicas:
        replicas = [
            [
                r.replica,
                build_label(r.build),
                r.node,
                str(r.pid),
                "running" if r.running else "gone",
            ]
            for r in s.replicas
        ]
        parts += ["", table(["replica", "build", "node", "pid", "status"], replicas)]
    else:
        parts += ["", "no replica reported in this window"]
    parts += ["", f"health: {m.health or '- (not serving)'}"]
    return "\n".join(parts)


def log_line_text(line: LogLine) -> str:
    """``TIME REPLICA build N STREAM [request id] TEXT``."""
    stamp = line.time.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    request = f"  [{line.request_id}]" if line.request_id else ""
    return (
        f"{stamp}  {line.replica}  {build_label(line.build)}  {line.stream:<6}{request}  "
        f"{line.text}"
    )


@dataclasses.dataclass(frozen=True)
class TopRow:
    """One model in `modelctl top`: its state and figures over the last ``window_s``."""

    name: str
    state: str
    health: str
    window_s: float
    totals: Figures | None  # None: its figures could not be read

    @property
    def requests_per_s(self) -> float:
        return self.totals.requests / self.window_s if self.totals and self.window_s else 0.0

    @property
    def error_percent(self) -> float:
        if not self.totals or not self.totals.requests:
            return 0.0
        return 100.0 * self.totals.errors / self.totals.requests

    def plain(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "health": self.health,
            "window_s": self.window_s,
            "requests_per_s": round(self.requests_per_s, 3),
            "error_percent": round(self.error_percent, 2),
            "totals": plain(self.totals),
        }


def top_text(rows: Sequence[TopRow]) -> str:
    if not rows:
        return "(no models)"
    out = []
    for r in rows:
        f = r.totals
        if f is None:
            figures = ["?"] * 6
        else:
            figures = [
                f"{r.requests_per_s:.2f}",
                f"{r.error_percent:.1f}" if f.requests else "-",
                str(f.refused),
                ms(f.latency_p99_ms) if f.requests else "-",
                f"{f.cpu_used:.2f}/{f.cpu_requested:g}",
                str(f.replicas),
            ]
        out.append([r.name.rsplit("/", 1)[-1], r.state, *figures, r.health or "-"])
    headers = ["model", "state", "req/s", "err %", "refused", "p99 ms", "cpu used/req",
               "replicas", "health"]  # fmt: skip
    return table(headers, out)


_ROWS: dict[type, Any] = {
    InvocationKey: _key_rows,
    Token: _token_rows,
    AuditRecord: _audit_rows,
    Model: _model_rows,
    Build: _build_rows,
    Deployment: _deployment_rows,
    Operation: _operation_rows,
}


class Printer:
    def __init__(self, fmt: str, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.json = fmt == "json"
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def result(self, value: Any) -> None:
        """One resource or a list of them, as a table (people) or JSON (scripts)."""
        if self.json:
            print(json.dumps(plain(value), indent=2, sort_keys=True), file=self.out)
            return
        if isinstance(value, ModelMetrics):
            print(metrics_text(value), file=self.out)
            return
        items = list(value) if isinstance(value, list) else [value]
        if not items:
            print("(none)", file=self.out)
            return
        headers, rows = _ROWS[type(items[0])](items)
        print(table(headers, rows), file=self.out)
        if not isinstance(value, list) and isinstance(value, Deployment):
            a = value.resources.autoscaling
            if a is not None:
                print("\n" + autoscaling_text(a, value.resources.replicas), file=self.out)
            if value.replicas:
                print("\n" + _replica_rows(value), file=self.out)
        if not isinstance(value, list) and isinstance(value, Model) and value.scale:
            print("\n" + scale_text(value.scale), file=self.out)
        if not isinstance(value, list) and isinstance(value, Build) and value.runtime:
            print("\n" + _build_details(value), file=self.out)

    def progress(self, text: str) -> None:
        """Live progress goes to stderr, so stdout stays the result alone."""
        print(text, file=self.err, flush=True)

    def event(self, e: Event) -> None:
        if self.json:
            print(json.dumps(plain(e), sort_keys=True), file=self.out, flush=True)
            return
        r = e.resource
        what = "-" if r is None else f"{type(r).__name__.lower()} {r.name}"
        state = getattr(r, "state", None)
        detail = ""
        if isinstance(r, Operation):
            detail = ("done" if r.done else r.progress) + (
                f" error={r.error.message}" if r.error else ""
            )
        elif isinstance(r, Model):
            scale = f"replicas {scale_short(r.scale)}" if r.scale is not None else ""
            detail = "  ".join(x for x in (scale, r.message) if x)
        elif isinstance(r, Deployment):
            detail = r.message
        print(
            f"{e.revision:>6}  {when(e.time)}  {e.type.value:<8} {what}"
            + (f"  {state.value}" if state is not None else "")
            + (f"  {detail}" if detail else ""),
            file=self.out,
            flush=True,
        )

    def log_line(self, line: LogLine) -> None:
        """One of a model's log lines: a line of text, or one JSON object per line."""
        if self.json:
            print(json.dumps(plain(line), sort_keys=True), file=self.out, flush=True)
        else:
            print(log_line_text(line), file=self.out, flush=True)

    def top(self, rows: Sequence[TopRow], header: str, clear: bool) -> None:
        """One refresh of `modelctl top`: a table (the screen cleared first on a terminal),
        or one JSON object per line."""
        if self.json:
            doc = {
                "time": datetime.now().astimezone().isoformat(),
                "models": [r.plain() for r in rows],
            }
            print(json.dumps(doc, sort_keys=True), file=self.out, flush=True)
            return
        text = f"{header}\n\n{top_text(rows)}"
        # On a terminal the table replaces the last; elsewhere tables follow each other.
        text = "\x1b[H\x1b[2J" + text if clear else text + "\n"
        print(text, file=self.out, flush=True)


def traffic_text(split: Split | None) -> str:
    """`modelctl traffic MODEL`: who answers what share of the model's requests."""
    if split is None:
        return "no split: one build answers every request"
    rows = [
        [short(split.stable_build), short(split.stable), f"{100 - split.percent}%", "stable"],
        [
            short(split.candidate_build),
            short(split.candidate),
            f"{split.percent}%",
            "candidate (a copy: answers discarded)" if split.shadow else "candidate",
        ],
    ]
    text = table(["BUILD", "DEPLOYMENT", "SHARE", "ROLE"], rows)
    if split.sticky_header:
        text += f"\nsticky by {split.sticky_header}"
    if split.promoting:
        text += f"\n{short(split.candidate_build)} is taking over"
    return text
