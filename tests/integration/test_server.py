"""The real server: uvicorn in-process for the openai client, and `cliplens serve` as a process."""

from __future__ import annotations

import base64
import json
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from cliplens.experiment.corpus import distinct_copy, encode_jpeg, render_photo
from cliplens.experiment.inprocess import InProcessService, free_port
from cliplens.experiment.processes import wait_until_answering
from cliplens.settings import Settings
from tests.harness.servers import child_environment
from tests.harness.service import serving


def test_the_official_openai_client_reads_float_and_base64(settings: Settings) -> None:
    with InProcessService(settings) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        model = client.models.list().data[0].id
        floats = client.embeddings.create(
            model=model,
            input=["album/1/a.jpg", "album/1/b.jpg"],
            encoding_format="float",
            extra_body={"modality": "image"},
        )
        packed = client.embeddings.create(
            model=model,
            input=["album/1/a.jpg", "album/1/b.jpg"],
            encoding_format="base64",
            extra_body={"modality": "image"},
        )
        default = client.embeddings.create(
            model=model, input="album/1/a.jpg", extra_body={"modality": "image"}
        )
        assert client.models.retrieve(model).id == model
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("ViT-H-14/other")
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="ViT-H-14/other", input="album/1/a.jpg")
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model=model, input="album/1/a.jpg", dimensions=8)
        assert refused.value.code == "unsupported_dimensions"
    assert [e.index for e in floats.data] == [0, 1]
    for a, b in zip(floats.data, packed.data, strict=True):
        decoded = (
            np.frombuffer(__import__("base64").b64decode(b.embedding), dtype="<f4")
            if isinstance(b.embedding, str)
            else np.asarray(b.embedding)
        )
        np.testing.assert_allclose(np.asarray(a.embedding, dtype=np.float32), decoded, atol=1e-5)
    np.testing.assert_allclose(default.data[0].embedding, floats.data[0].embedding, atol=1e-5)


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = child_environment(
        CLIPLENS_MODEL=settings.model,
        CLIPLENS_PRETRAINED=settings.pretrained,
        CLIPLENS_IMAGE_ROOT=str(settings.image_root),
        CLIPLENS_CPU_WORKERS="2",
    )
    env.update(extra)
    return env


def test_cliplens_serve_logs_json_lines_and_stops_cleanly_on_sigterm(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cliplens.cli", "serve", "--port", str(port)],
            env=_env(settings),
            stdout=log,
            stderr=log,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        problem = wait_until_answering(f"{url}/readyz", process, 120)
        assert problem is None, f"{problem}: {log_path.read_text()[-3000:]}"
        response = httpx.post(f"{url}/v1/embeddings", json={"input": ["album/1/a.jpg"]}, timeout=60)
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    served = [line for line in lines if line["message"] == "embeddings served"]
    assert served and served[0]["trace_id"] == response.headers["x-trace-id"]
    assert len(served[0]["span_id"]) == 16
    assert any(line["message"] == "model loaded" for line in lines)


@pytest.mark.parametrize("pretrained", ["/nonexistent/weights.bin", "not-a-tag"])
def test_serve_exits_nonzero_with_offline_advice_when_weights_cannot_load(
    settings: Settings, tmp_path: Path, pretrained: str
) -> None:
    env = _env(settings, CLIPLENS_MODEL="ViT-B-32", CLIPLENS_PRETRAINED=pretrained)
    result = subprocess.run(
        [sys.executable, "-m", "cliplens.cli", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "CLIPLENS_PRETRAINED" in result.stderr
    assert "none" in result.stderr


def test_demo_runs_end_to_end_and_prints_the_stage_table(settings: Settings, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cliplens.cli", "demo", "--photos", "3", "--dir", str(tmp_path)],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "time per stage (ms): min / max / mean" in result.stdout
    for scenario in ("1 image ", "3 images ", "1 image x 8 concurrent"):
        assert scenario in result.stdout
    assert len(list((tmp_path / "photos").glob("*.jpg"))) == 3
    results = json.loads((tmp_path / "results.json").read_text())
    assert [s["key"] for s in results["scenarios"]] == ["1x1", "3x1", "1x8"]
    assert [s["summary"]["images_ok"] for s in results["scenarios"]] == [1, 3, 8]
    assert f"figure: {tmp_path / 'results.png'}" in result.stdout.replace("\n", "")
    with Image.open(tmp_path / "results.png") as figure:
        assert figure.format == "PNG"
        assert figure.size[0] >= 800 and figure.size[1] >= 600
        pixels = np.asarray(figure.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "the figure is blank"


def test_cliplens_version_answers_without_loading_anything() -> None:
    from cliplens import __version__

    result = subprocess.run(
        [sys.executable, "-m", "cliplens.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cliplens {__version__}"


def test_every_request_on_a_kept_alive_connection_has_its_own_trace(tiny_model: str, tmp_path: Path) -> None:
    """A body over uvicorn's 64 KiB flow-control mark once left its request's span current for every
    later request on the connection: they answered with its trace id (and joined its trace)."""
    photo = encode_jpeg(render_photo(5, 1024, 768))
    with (
        serving(tiny_model, tmp_path) as service,
        httpx.Client(base_url=service.url, timeout=60) as connection,
    ):
        for number in range(4):
            large = "data:image/jpeg;base64," + base64.b64encode(distinct_copy(photo, number)).decode()
            assert len(large) > 128 * 1024
            trace_id = secrets.token_hex(16)
            response = connection.post(
                "/v1/embeddings",
                json={"input": [large] if number % 2 == 0 else ["data:,"]},
                headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
            )
            assert response.status_code == 200
            assert response.headers["x-trace-id"] == trace_id, number
