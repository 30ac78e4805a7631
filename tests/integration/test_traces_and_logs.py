"""`modelctl serve --otlp-endpoint URL --log-format json`, as an operator runs it: the
spans arrive at an OTLP/HTTP receiver of the test's own as one trace per request
(RPC -> job -> backend call, the deploy job included), a call that sends a W3C
traceparent has its spans in the caller's trace, and every log line is a JSON object
that names the model and the operation it is about."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers.api import (
    MODEL_V1,
    MODEL_V2,
    Stub,
    build,
    create_model,
    resources,
    upload,
    wait,
    zip_bytes,
)
from tests.helpers.servers import serve

pytestmark = pytest.mark.slow  # a server process, traces and logs to collect

SERVICE = "modellifecycle.v1.ModelLifecycle"
# The calling platform service's trace and span, as it sends them in the call's metadata.
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


class Receiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 that keeps what it is sent."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.services: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    for attr in rs.resource.attributes:
                        if attr.key == "service.name":
                            receiver.services.add(attr.value.string_value)
                    for ss in rs.scope_spans:
                        receiver.spans.extend(ss.spans)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def named(self, name: str) -> list[trace_pb2.Span]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str, trace_id: bytes) -> trace_pb2.Span:
        found = [s for s in self.named(name) if s.trace_id == trace_id]
        assert len(found) == 1, f"{name}: {len(found)} spans in the trace; all: {self.spans}"
        return found[0]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def attribute(span: trace_pb2.Span, key: str) -> str:
    for attr in span.attributes:
        if attr.key == key:
            return str(attr.value.string_value or attr.value.int_value)
    return ""


@pytest.mark.timeout(120)
async def test_one_trace_per_request_and_json_logs_about_the_model(
    receiver: Receiver, tmp_path: Path, project: str
) -> None:
    log_file = tmp_path / "server.log"
    # Its SIGTERM at the end of the block flushes the spans still buffered.
    async with (
        serve(
            "--insecure-no-auth",
            "--grpc-port=0",
            "--http-port=0",
            f"--data-dir={tmp_path / 'data'}",
            "--backend=fake",
            "--log-format=json",
            f"--otlp-endpoint={receiver.url}",
            log=log_file,
        ) as (_, address),
        grpc.aio.insecure_channel(address) as channel,
    ):
        stub = Stub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetModel(
                rpc.GetModelRequest(name=f"{project}/models/missing"),
                metadata=(("traceparent", "00-not-a-valid-traceparent-01"),),
            )
        model = (await create_model(stub, project, "traced")).name
        deploy = rpc.DeployOptions(resources=resources(replicas=1))
        op = await build(stub, model, MODEL_V1, deploy=deploy)
        assert op.done and not op.HasField("error")
        joined = (await create_model(stub, project, "joined")).name
        caller = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
        # Another model's source: the build is not a cache hit, so it calls the backend.
        source = await upload(stub, joined, zip_bytes({"model.py": MODEL_V2}))
        joined_op = await stub.CreateBuild(
            rpc.CreateBuildRequest(
                parent=joined,
                source_sha256=source.sha256,
                file_path="model.py",
                function_name="classify",
            ),
            metadata=caller,
        )
        assert not (await wait(stub, joined_op)).HasField("error")

    assert receiver.services == {"modelctl"}
    caller_trace = bytes.fromhex(CALLER_TRACE)
    joined_rpc = receiver.one(f"{SERVICE}/CreateBuild", caller_trace)
    assert joined_rpc.parent_span_id == bytes.fromhex(CALLER_SPAN), "the caller's span"
    joined_job = receiver.one("job build", caller_trace)
    assert joined_job.parent_span_id == joined_rpc.span_id
    assert attribute(joined_job, "model") == joined
    assert receiver.one("backend build", caller_trace).parent_span_id == joined_job.span_id

    (rpc_span,) = [
        s for s in receiver.named(f"{SERVICE}/CreateBuild") if s.trace_id != caller_trace
    ]
    assert rpc_span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert rpc_span.parent_span_id == b"", "a call without a traceparent starts a trace"
    assert attribute(rpc_span, "rpc.grpc.status_code") == "OK"
    trace = rpc_span.trace_id
    job = receiver.one("job build", trace)
    assert job.parent_span_id == rpc_span.span_id, "the job continues the RPC's trace"
    assert attribute(job, "model") == model
    backend = receiver.one("backend build", trace)
    assert backend.parent_span_id == job.span_id
    deploy_job = receiver.one("job apply", trace)
    assert deploy_job.parent_span_id == job.span_id, "the build's deploy job is in its trace"
    apply = receiver.one("backend apply", trace)
    assert apply.parent_span_id == deploy_job.span_id
    (missing,) = receiver.named(f"{SERVICE}/GetModel")
    assert missing.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert attribute(missing, "rpc.grpc.status_code") == "NOT_FOUND"
    assert missing.trace_id != trace
    assert missing.parent_span_id == b"", "an invalid traceparent is ignored"

    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert lines, "the server logged nothing"
    for line in lines:
        assert {"time", "level", "logger", "message", "model", "operation"} <= line.keys()
    joined_lines = [ln for ln in lines if ln["operation"] == joined_op.name]
    assert joined_lines and all(ln["trace_id"] == CALLER_TRACE for ln in joined_lines)
    about_build = [ln for ln in lines if ln["operation"] == op.name]
    messages = [ln["message"] for ln in about_build]
    assert any(m.startswith("job ") and m.endswith(" (build) started") for m in messages)
    assert any(m.startswith("CREATE_BUILD succeeded in ") for m in messages), messages
    assert all(ln["model"] == model for ln in about_build)
    traced = [ln for ln in about_build if ln["message"].endswith("(build) started")]
    assert traced[0]["trace_id"] == trace.hex(), "log lines carry the trace id"
