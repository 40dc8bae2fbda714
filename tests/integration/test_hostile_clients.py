"""`cliplens serve` against clients that hold connections, and through its shutdown.

Slow clients: a request head that stops half-way (or drips in a byte at a time) is closed at the
header timeout, a body that stops is answered 408 at the body timeout, and connections past the
bound are answered 503 at once. Shutdown: after SIGTERM the listener stays open while requests are
in flight, so new clients get 503 `shutting_down` (not "connection refused") and `/readyz` 503;
the requests in flight are answered in JSON, never with uvicorn's 500 text/plain. Every wait is
bounded: each test takes seconds.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cliplens.experiment.corpus import encode_jpeg, render_photo
from tests.harness.faulty_gcs import FaultyGcs, service_env, trickled
from tests.harness.service import Service, log_problems, serving, wait_for

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
SLACK_S = 2.0
"""What a timeout may run over on a loaded 2-core machine (the process, the loop, the test)."""
BUCKET = "photos"
PHOTO = encode_jpeg(render_photo(43, 640, 480))
HEAD = b"POST /v1/embeddings HTTP/1.1\r\nHost: cliplens\r\nContent-Type: application/json\r\n"


def address(service: Service) -> tuple[str, int]:
    url = httpx.URL(service.url)
    assert url.port is not None
    return url.host, url.port


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received, time.monotonic() - started


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body


def error_code(raw: bytes, status: int) -> str:
    """The `error.code` of a raw JSON error response, after checking its status and shape."""
    got, headers, body = parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["message"] and error["type"]
    return str(error["code"])


# slow clients


@pytest.fixture(scope="module")
def guarded(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {
        "CLIPLENS_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "CLIPLENS_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }
    with serving(tiny_model, tmp_path_factory.mktemp("guarded"), **env) as service:
        yield service
    assert not log_problems(service), log_problems(service)


def test_a_half_sent_header_is_answered_408_and_closed_at_the_header_timeout(guarded: Service) -> None:
    with (
        socket.create_connection(address(guarded)) as half,
        socket.create_connection(address(guarded)) as mute,
    ):
        half.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
        answer, took = read_until_closed(half, HEADER_TIMEOUT_S + 10)
        assert HEADER_TIMEOUT_S - 0.2 < took < HEADER_TIMEOUT_S + SLACK_S, took
        assert error_code(answer, 408) == "request_timeout"
        # a connection that never sent a byte is closed as well, without a word
        assert read_until_closed(mute, 10)[0] == b""
    assert httpx.get(f"{guarded.url}/healthz", timeout=10).status_code == 200


def test_headers_dripping_in_a_byte_at_a_time_are_cut_off_too(guarded: Service) -> None:
    head = HEAD + b"X-Padding: " + b"a" * 200  # one byte every 0.1 s: 26 s for the whole header
    started = time.monotonic()
    sent = 0
    with socket.create_connection(address(guarded)) as drip:
        try:
            for byte in head:
                drip.sendall(bytes([byte]))
                sent += 1
                # the server answered (408) or closed: either way it has stopped reading (looking for
                # the end of the stream alone missed it when the answer came a moment before it)
                if select.select([drip], [], [], 0.1)[0]:
                    break
        except OSError:  # it had closed the connection already: the send failed (EPIPE / reset)
            pass
        took = time.monotonic() - started
        answer, _ = read_until_closed(drip, 10)
    assert sent < len(head), "the server read the whole dripped header"
    assert took < HEADER_TIMEOUT_S + SLACK_S, f"still open after {took:.1f} s"
    assert answer == b"" or error_code(answer, 408) == "request_timeout"


def test_a_body_that_stops_midway_is_answered_408_and_closed(guarded: Service) -> None:
    with socket.create_connection(address(guarded)) as stalled:
        stalled.sendall(HEAD + b"Content-Length: 100\r\n\r\n" + b'{"input": ["album/')
        answer, took = read_until_closed(stalled, BODY_TIMEOUT_S + 10)
    assert BODY_TIMEOUT_S - 0.2 < took < BODY_TIMEOUT_S + SLACK_S, took
    assert error_code(answer, 408) == "request_timeout"
    # a body that keeps coming is never cut, however slowly the whole of it arrives
    body = json.dumps({"input": ["a photo", "of a cat"], "modality": "text"}).encode()
    with socket.create_connection(address(guarded)) as slow:
        slow.sendall(HEAD + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        for start in range(0, len(body), len(body) // 4 + 1):
            time.sleep(BODY_TIMEOUT_S * 0.6)
            slow.sendall(body[start : start + len(body) // 4 + 1])
        status, _, _ = parse(read_until_closed(slow, 30)[0])
    assert status == 200


def test_connections_past_the_bound_are_answered_429_at_once(tiny_model: str, tmp_path: Path) -> None:
    bound = 4
    with serving(tiny_model, tmp_path, CLIPLENS_MAX_CONNECTIONS=str(bound)) as service:
        held = [socket.create_connection(address(service)) for _ in range(bound - 1)]
        try:
            # under the bound, requests are served
            assert httpx.get(f"{service.url}/healthz", timeout=10).status_code == 200
            held.append(socket.create_connection(address(service)))
            time.sleep(0.2)  # accepted by the server
            with socket.create_connection(address(service)) as extra:
                answer, took = read_until_closed(extra, 10)
            assert took < 1.0, took
            assert error_code(answer, 429) == "overloaded"
            assert parse(answer)[1]["retry-after"]
        finally:
            for sock in held:
                sock.close()
        # the bound counts open connections, not past ones
        wait_for(lambda: httpx.get(f"{service.url}/healthz", timeout=10).status_code == 200, 10)
    assert not log_problems(service), log_problems(service)


# shutdown


def assert_new_clients_get_503_shutting_down(service: Service) -> None:
    """On new connections, after the signal: JSON 503s, never "connection refused"."""
    time.sleep(0.3)  # past uvicorn's 0.1 s tick, after which it would have closed its listener
    refused = httpx.post(f"{service.url}/v1/embeddings", json={"input": ["slow.jpg"]}, timeout=10)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["retry-after"] and refused.headers["connection"] == "close"
    ready = httpx.get(f"{service.url}/readyz", timeout=10)
    assert ready.status_code == 503


def test_after_sigterm_new_clients_get_503_until_the_request_in_flight_is_answered(
    tiny_model: str, tmp_path: Path
) -> None:
    grace, deadline = 10.0, 3.0
    with FaultyGcs() as gcs:
        gcs.put(BUCKET, "slow.jpg", trickled(PHOTO, 30.0))
        env = service_env(
            gcs, BUCKET, CLIPLENS_SHUTDOWN_GRACE_S=str(grace), CLIPLENS_REQUEST_TIMEOUT_S=str(deadline)
        )
        with serving(tiny_model, tmp_path, **env) as service, ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            in_flight = pool.submit(
                httpx.post, f"{service.url}/v1/embeddings", json={"input": ["slow.jpg"]}, timeout=30
            )
            wait_for(lambda: gcs.count(BUCKET, "slow.jpg") == 1)
            service.process.send_signal(signal.SIGTERM)
            assert_new_clients_get_503_shutting_down(service)
            response = in_flight.result()
            assert service.process.wait(timeout=grace) == 0
            took = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert [e["code"] for e in response.json()["errors"]] == ["timeout"]
        # it exits once the request in flight is answered, not at the end of the grace period
        assert took < deadline + SLACK_S + 1, took
        assert not log_problems(service), log_problems(service)


def test_a_request_longer_than_the_grace_period_is_answered_200_with_timeout_items(
    tiny_model: str, tmp_path: Path
) -> None:
    grace = 3.0  # the request deadline stays at its default, 120 s
    with FaultyGcs() as gcs:
        gcs.put(BUCKET, "slow.jpg", trickled(PHOTO, 60.0))
        env = service_env(gcs, BUCKET, CLIPLENS_SHUTDOWN_GRACE_S=str(grace))
        with serving(tiny_model, tmp_path, **env) as service, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(
                httpx.post, f"{service.url}/v1/embeddings", json={"input": ["slow.jpg"]}, timeout=60
            )
            wait_for(lambda: gcs.count(BUCKET, "slow.jpg") == 1)
            service.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert_new_clients_get_503_shutting_down(service)
            response = in_flight.result()
            answered = time.monotonic() - signalled
            assert service.process.wait(timeout=grace + 10) == 0
            took = time.monotonic() - signalled
        assert response.headers["content-type"].startswith("application/json"), response.text
        assert response.status_code == 200, response.text
        assert [e["code"] for e in response.json()["errors"]] == ["timeout"]
        assert "shut down" in response.json()["errors"][0]["message"]
        assert answered <= grace + 0.5, answered
        assert took < grace + SLACK_S + 1, took
        assert "timeout graceful shutdown exceeded" not in service.log.read_text()
        assert not log_problems(service), log_problems(service)


def test_an_upload_still_arriving_when_the_grace_period_ends_is_answered_503_in_json(
    tiny_model: str, tmp_path: Path
) -> None:
    grace = 2.0  # the body timeout stays at its default, 30 s: only the grace period ends it
    with serving(tiny_model, tmp_path, CLIPLENS_SHUTDOWN_GRACE_S=str(grace)) as service:
        with socket.create_connection(address(service)) as upload:
            upload.sendall(HEAD + b"Content-Length: 100000\r\n\r\n" + b'{"input": ["')
            time.sleep(0.3)
            service.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            answer = b""
            while time.monotonic() - signalled < grace + 10:  # a byte every 0.25 s until answered
                if select.select([upload], [], [], 0.25)[0]:
                    answer = read_until_closed(upload, 10)[0]
                    break
                upload.sendall(b"a")
            answered = time.monotonic() - signalled
        assert error_code(answer, 503) == "shutting_down"
        assert grace - 0.5 < answered < grace + SLACK_S, answered
        assert service.process.wait(timeout=10) == 0
    assert not [line for line in log_problems(service) if "Traceback" in line]
