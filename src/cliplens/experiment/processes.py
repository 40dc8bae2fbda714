"""Child processes that serve HTTP (fake-gcs-server here; the service, Prometheus and HAProxy in
the tests and the benchmark): wait until one answers, and stop it the way a pod is stopped."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

import httpx


def wait_until_answering(
    url: str,
    process: subprocess.Popen[bytes],
    timeout_s: float,
    *,
    poll_s: float = 0.1,
    request_timeout_s: float = 2.0,
) -> str | None:
    """Poll `GET url` until it answers 200, while `process` runs.

    None once it answers; otherwise why it did not, for the caller's error: "exited with status N"
    or "not answering after T s".
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with status {process.returncode}"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=request_timeout_s).status_code == 200:
                return None
        time.sleep(poll_s)
    return f"not answering after {timeout_s:g} s"


def stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM (what a pod or a compose service gets), killed if it has not exited within
    `timeout_s`; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
