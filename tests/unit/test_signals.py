"""What a replica records of itself, and the collector that holds it (no Ray)."""

from __future__ import annotations

import logging
import sys
import threading

import pytest

from workers.signals import (
    LATENCY_BUCKETS,
    PENDING_LINES,
    Collector,
    Identity,
    Pusher,
    ReplicaSignals,
    Report,
    answered,
    answering,
    bucket_bound_ms,
    capture_output,
    latency_bucket,
    proxy_figures,
)


def signals(**kw: object) -> ReplicaSignals:
    who = Identity(app="p.m", replica="r1", build="projects/p/models/m/builds/1", node="n1")
    for k, v in kw.items():
        setattr(who, k, v)
    return ReplicaSignals(who)


@pytest.mark.parametrize("ms", [0.05, 0.1, 0.11, 1.0, 7.3, 250.0, 59_999.0])
def test_a_latency_falls_in_a_bucket_within_ten_percent(ms: float) -> None:
    b = latency_bucket(ms)
    assert ms <= bucket_bound_ms(b) + 1e-9
    assert b == 0 or bucket_bound_ms(b) <= max(ms, 0.1) * 1.1 + 1e-9


def test_latencies_beyond_the_last_bucket_stay_in_it() -> None:
    assert latency_bucket(10**9) == LATENCY_BUCKETS - 1


def test_requests_are_counted_by_outcome_with_their_latency_and_in_flight() -> None:
    s = signals(busy_limit=16, requested_cpus=0.5)
    s.started()
    s.started()
    assert s.figures().in_flight == 2
    s.finished(200, 0.002, "a")
    s.finished(500, 0.004, "b")
    s.started()
    s.finished(401, 0.001, "c")
    s.started()
    s.finished(503, 0.001, "d")
    f = s.figures()
    assert (f.requests, f.model_errors, f.client_errors, f.server_errors) == (4, 1, 1, 1)
    assert f.in_flight == 0 and f.busy_limit == 16 and f.requested_cpus == 0.5
    assert sum(n for _, n in f.latency) == 4
    assert f.rss_bytes > 10 * 1024 * 1024 and f.cpu_seconds > 0
    assert f.gpu_used == -1.0  # no probe: not measured


def test_each_request_leaves_an_access_line_with_its_id_and_status() -> None:
    s = signals()
    s.started()
    s.finished(500, 0.0123, "req-7")
    (line,) = s.take().lines
    assert line.stream == "access" and line.request_id == "req-7"
    assert line.text == "500 12.3 ms" and line.replica == "r1" and line.seq == 0


def test_lines_written_while_answering_carry_the_request_id() -> None:
    s = signals()
    token = answering("req-9")
    try:
        s.line("stdout", "inside")
    finally:
        answered(token)
    s.line("stdout", "outside")
    inside, outside = s.take().lines
    assert inside.request_id == "req-9" and outside.request_id == ""
    assert (inside.seq, outside.seq) == (0, 1)


def test_a_failed_push_keeps_its_lines_for_the_next_one_in_order() -> None:
    s = signals()
    s.line("stdout", "one")
    sent: list[Report] = []

    def broken(report: Report) -> None:
        raise ConnectionError("collector away")

    assert not Pusher(s, broken).push_now()
    s.line("stdout", "two")
    assert Pusher(s, sent.append).push_now()
    assert [line.text for line in sent[0].lines] == ["one", "two"]


def test_lines_nobody_collects_are_bounded_keeping_the_newest() -> None:
    s = signals()
    for i in range(PENDING_LINES + 5):
        s.line("stdout", str(i))
    lines = s.take().lines
    assert len(lines) == PENDING_LINES and lines[-1].text == str(PENDING_LINES + 4)
    assert s.dropped_lines == 5


def test_the_pusher_sends_lines_soon_and_figures_each_interval() -> None:
    s = signals()
    got = threading.Event()
    reports: list[Report] = []

    def send(report: Report) -> None:
        reports.append(report)
        if any(line.text == "hello" for line in report.lines):
            got.set()

    pusher = Pusher(s, send, interval_s=60, lines_interval_s=0.01)
    pusher.start()
    try:
        s.line("stdout", "hello")
        assert got.wait(5), "a waiting line was not pushed within 5 s"
    finally:
        pusher.stop()


def test_output_and_the_models_logging_become_lines_but_not_rays(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = signals()
    before_out, before_err, handlers = sys.stdout, sys.stderr, list(logging.getLogger().handlers)
    try:
        capture_output(s)
        print("printed", 1)
        sys.stdout.write("part")
        sys.stdout.write("ial\n")
        print("to stderr", file=sys.stderr)
        logging.getLogger("mymodel").warning("careful %s", "now")
        logging.getLogger("ray.serve").warning("not the model's")
    finally:
        sys.stdout, sys.stderr = before_out, before_err
        logging.getLogger().handlers[:] = handlers
    got = [(line.stream, line.text) for line in s.take().lines]
    assert got == [
        ("stdout", "printed 1"),
        ("stdout", "partial"),
        ("stderr", "to stderr"),
        ("log", "WARNING mymodel: careful now"),
    ]
    assert "printed 1" in capsys.readouterr().out  # still written where it went before


def report(replica: str, *texts: str, t: float = 100.0) -> Report:
    s = signals()
    s.who.replica = replica
    for text in texts:
        s.line("stdout", text)
    return s.take()


def test_the_collector_gives_each_reader_what_came_after_its_cursor() -> None:
    c = Collector()
    c.push([report("a", "1", "2")])
    first = c.read("", 0)
    assert [line.text for line in first.lines] == ["1", "2"]
    c.push([report("b", "3")])
    second = c.read(first.epoch, first.cursor)
    assert [line.text for line in second.lines] == ["3"]
    assert {f.replica for f in second.replicas} == {"a", "b"}  # figures: always all
    assert c.read(second.epoch, second.cursor).lines == ()
    # Another reader (a second server) starts from the beginning.
    assert [line.text for line in c.read("", 0).lines] == ["1", "2", "3"]


def test_a_reader_of_another_collector_reads_from_the_start() -> None:
    c = Collector()
    c.push([report("a", "1")])
    batch = c.read("an-old-epoch", 57)
    assert [line.text for line in batch.lines] == ["1"] and batch.epoch == c.epoch


def test_lines_that_left_the_ring_unread_are_counted_as_lost() -> None:
    c = Collector(max_lines=3)
    c.push([report("a", "1")])
    b = c.read("", 0)
    c.push([report("a", "2", "3", "4", "5", "6")])
    later = c.read(b.epoch, b.cursor)
    assert [line.text for line in later.lines] == ["4", "5", "6"]
    assert later.lines_lost == 2


def test_the_proxies_refused_and_queued_requests_per_application() -> None:
    samples = {
        "ray_serve_num_http_requests_total": [
            ({"application": "p.m", "status_code": "200"}, 50.0),
            ({"application": "p.m", "status_code": "503"}, 7.0),
            ({"application": "p.m", "status_code": "408"}, 1.0),
            ({"application": "p.m", "status_code": "503"}, 2.0),  # another node's proxy
            ({"application": "p.n", "status_code": "500"}, 3.0),
        ],
        "ray_serve_deployment_queued_queries": [({"application": "p.m"}, 4.0)],
    }
    by_app = {p.app: p for p in proxy_figures(samples)}
    assert (by_app["p.m"].refused, by_app["p.m"].queued) == (10, 4)
    assert "p.n" not in by_app  # a 500 is the model's error, counted by its replica
