"""The experiment is optional: a server installed without the `experiment` extra starts and serves.

Each check runs a fresh interpreter whose import system answers "no module named ..." for the
extra's libraries (rich, matplotlib, httpx), as a server-only install would: one module-level
import of them anywhere on the server's path (cli, app, server, runtime, api, pipeline, telemetry)
fails the check. `cliplens demo` and `cliplens experiment` must then say what to install, in one
line, instead of a traceback.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cliplens.settings import Settings
from tests.harness.servers import child_environment

OPTIONAL = ("rich", "matplotlib", "httpx")
"""The experiment extra's libraries that a server install does not have."""

_NOT_INSTALLED = f"""
import sys
from importlib.abc import MetaPathFinder

OPTIONAL = {OPTIONAL!r}
assert not [m for m in sys.modules if m.partition(".")[0] in OPTIONAL], "imported before the test began"


class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in OPTIONAL:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""

_SERVER_PATH = """
import contextlib
import io
import json

import cliplens.api
import cliplens.app
import cliplens.cli
import cliplens.runtime
import cliplens.server
import cliplens.experiment.corpus  # docker-compose's `photos` step runs it in the server image
from cliplens.app import create_app
from cliplens.cli import main
from cliplens.settings import Settings

create_app(Settings(model=sys.argv[1], pretrained="none"))
usage = io.StringIO()
try:
    with contextlib.redirect_stdout(usage):
        main(["serve", "--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
assert "--port" in usage.getvalue(), usage.getvalue()
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in OPTIONAL)
assert not loaded, loaded

answers = {}
for command in (["demo"], ["demo", "--scenario", "2"], ["experiment", "--compare", "a.json", "b.json"]):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        answers[" ".join(command)] = [main(command), stderr.getvalue()]
sys.stdout.write(json.dumps(answers))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_server_path_imports_none_of_the_experiment_extra(tiny_model: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _NOT_INSTALLED + _SERVER_PATH, tiny_model],
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout)
    assert set(answers) == {"demo", "demo --scenario 2", "experiment --compare a.json b.json"}
    for command, (status, stderr) in answers.items():
        assert status == 1, command
        assert stderr.count("\n") == 1, (command, stderr)
        assert "pip install 'cliplens[experiment]'" in stderr, command
        assert any(f"'{name}'" in stderr for name in OPTIONAL), (command, stderr)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except (urllib.error.URLError, OSError):
        return 0


def test_cliplens_serve_starts_and_serves_without_the_extra(settings: Settings, tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve = "import runpy\nrunpy.run_module('cliplens.cli', run_name='__main__')\n"
    log_path = tmp_path / "serve.log"
    env = child_environment(
        CLIPLENS_MODEL=settings.model,
        CLIPLENS_PRETRAINED=settings.pretrained,
        CLIPLENS_IMAGE_ROOT=str(settings.image_root),
        CLIPLENS_CPU_WORKERS="2",
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _NOT_INSTALLED + serve, "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 120
        while _get(f"{url}/readyz") != 200:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        request = urllib.request.Request(
            f"{url}/v1/embeddings",
            data=json.dumps({"input": ["album/1/a.jpg"]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
        assert response.status == 200
        assert len(body["data"]) == 1 and len(body["data"][0]["embedding"]) == 32
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()[-3000:]
