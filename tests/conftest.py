"""Shared fixtures: a tiny open_clip architecture, generated photos, and real servers on loopback."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from litestar import Litestar
from litestar.testing import TestClient

from cliplens.app import create_app
from cliplens.experiment.corpus import encode_jpeg, render_photo
from cliplens.settings import OnError, Settings
from tests.harness.servers import FakeGcs

TINY_ARCHITECTURE = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
"""A CLIP with the real structure (ViT image tower, transformer text tower) at a size 2 cores run fast."""

PHOTOS = {
    "album/1/a.jpg": (800, 600, 1),
    "album/1/b.jpg": (640, 480, 2),
    "album/2/c.jpg": (1024, 768, 3),
}
BUCKET = "photos"


@pytest.fixture(autouse=True)
def auto_means_torch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`CLIPLENS_RUNTIME=auto` picks ONNX Runtime on CPUs without native bfloat16 when it is
    installed (it is, in the dev environment): the suite's services run torch wherever it runs,
    unless a test is marked `onnx`."""
    if request.node.get_closest_marker("onnx") is None:
        monkeypatch.setattr("cliplens.pipeline.model.onnxruntime_installed", lambda: False)


def write_tiny_model(folder: Path, with_weights: bool, seed: int = 0) -> Path:
    """An open_clip `local-dir:` folder: the tiny config, and seeded weights when asked."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_ARCHITECTURE, "preprocess_cfg": {}})
    )
    if with_weights:
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{folder}")
        torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"local-dir:{write_tiny_model(tmp_path_factory.mktemp('tiny-random'), with_weights=False)}"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-weights"), with_weights=True)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) batches of vectors (the model's raw projections)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.asarray((a * b).sum(axis=1))


def photo_bytes(name: str) -> bytes:
    width, height, seed = PHOTOS[name]
    return encode_jpeg(render_photo(seed, width, height))


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photo_bytes(name))
    return root


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    buffer = io.BytesIO()
    render_photo(9, 300, 200).save(buffer, "PNG")
    return buffer.getvalue()


PARTIAL: OnError = "partial"
"""The tests' services answer item errors with the other items' vectors (`on_error: partial`), so
that a test of one item's failure also sees that the others were served; the deployment default,
`fail`, is tested in tests/integration/test_request_fields.py."""


def local_settings(tiny_model: str, photo_dir: Path) -> Settings:
    """The tiny random model serving the test photos from a local directory."""
    return Settings(
        model=tiny_model,
        pretrained="none",
        image_root=photo_dir,
        cpu_workers=2,
        max_inputs=16,
        on_error=PARTIAL,
    )


@pytest.fixture
def settings(tiny_model: str, photo_dir: Path) -> Settings:
    return local_settings(tiny_model, photo_dir)


def wait_ready(client: TestClient[Litestar], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready: {client.get('/readyz').text}")


@contextmanager
def running(settings: Settings) -> Iterator[TestClient[Litestar]]:
    """The app, lifespan started, model loaded."""
    with TestClient(create_app(settings), timeout=120) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient[Litestar]]:
    with running(settings) as client:
        yield client


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcs]:
    server = FakeGcs(tmp_path_factory.mktemp("gcs") / "fake-gcs.log").start()
    server.create_bucket(BUCKET)
    server.create_bucket("other-bucket")
    for name in PHOTOS:
        server.upload(BUCKET, name, photo_bytes(name))
    server.upload("other-bucket", "secret.jpg", photo_bytes("album/1/a.jpg"))
    yield server
    server.stop()


@pytest.fixture
def gcs_settings(tiny_weights: Path, fake_gcs: FakeGcs) -> Settings:
    """The service reading bucket `photos` of the fake-gcs-server, with a checkpoint's weights."""
    return Settings(
        model=f"local-dir:{tiny_weights}",
        default_bucket=BUCKET,
        allowed_buckets=(BUCKET,),
        gcs_emulator_host=fake_gcs.url,
        cpu_workers=2,
        on_error=PARTIAL,
    )
