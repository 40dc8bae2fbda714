"""The service's vectors are open_clip's own, for the same weights and photo."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageOps

from cliplens.settings import Settings
from tests.conftest import TINY_ARCHITECTURE, running
from tests.harness.open_clip_reference import REAL_PHOTO


def reference_vector(model_name: str, data: bytes) -> np.ndarray:
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    model.eval()
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    with torch.no_grad():
        features = model.encode_image(preprocess(image).unsqueeze(0))
    return torch.nn.functional.normalize(features, dim=-1)[0].numpy()


def reference_text(model_name: str, text: str) -> np.ndarray:
    model = open_clip.create_model(model_name).eval()
    with torch.no_grad():
        features = model.encode_text(open_clip.get_tokenizer(model_name)([text]))
    return torch.nn.functional.normalize(features, dim=-1)[0].numpy()


def test_image_vector_equals_open_clip_reference_pipeline(tiny_weights: Path) -> None:
    model_name = f"local-dir:{tiny_weights}"
    settings = Settings(model=model_name, dtype="float32", image_root=REAL_PHOTO.parent, cpu_workers=2)
    with running(settings) as client:
        body = client.post("/v1/embeddings", json={"input": [REAL_PHOTO.name]}).json()
        assert client.get("/v1/models").json()["data"][0]["random_weights"] is False
    ours = np.asarray(body["data"][0]["embedding"], dtype=np.float32)
    theirs = reference_vector(model_name, REAL_PHOTO.read_bytes())
    assert float(ours @ theirs) >= 0.9999


def test_text_vector_equals_open_clip_reference(tiny_weights: Path) -> None:
    model_name = f"local-dir:{tiny_weights}"
    with running(Settings(model=model_name, dtype="float32", cpu_workers=2)) as client:
        body = client.post("/v1/embeddings", json={"input": "a woman in uniform", "modality": "text"}).json()
    ours = np.asarray(body["data"][0]["embedding"], dtype=np.float32)
    assert float(ours @ reference_text(model_name, "a woman in uniform")) >= 0.9999


def test_a_local_checkpoint_file_is_a_pretrained_value(tiny_weights: Path, tmp_path: Path) -> None:
    """open_clip's own convention: `pretrained` may be a checkpoint path for a named architecture."""
    config = tmp_path / "cliplens-tiny-test.json"
    config.write_text(json.dumps(TINY_ARCHITECTURE))
    open_clip.add_model_config(config)
    checkpoint = tiny_weights / "open_clip_pytorch_model.bin"
    settings = Settings(
        model="cliplens-tiny-test", pretrained=str(checkpoint), dtype="float32", image_root=REAL_PHOTO.parent
    )
    with running(settings) as client:
        model = client.get("/v1/models").json()["data"][0]
        body = client.post("/v1/embeddings", json={"input": [REAL_PHOTO.name]}).json()
    assert model["id"] == "cliplens-tiny-test/open_clip_pytorch_model"
    assert model["random_weights"] is False
    ours = np.asarray(body["data"][0]["embedding"], dtype=np.float32)
    assert float(ours @ reference_vector(f"local-dir:{tiny_weights}", REAL_PHOTO.read_bytes())) >= 0.9999


@pytest.mark.slow
def test_the_real_vit_b_32_architecture_serves_512_dimensional_vectors(photo_dir: Path) -> None:
    settings = Settings(model="ViT-B-32", pretrained="none", image_root=photo_dir, cpu_workers=2)
    with running(settings) as client:
        model = client.get("/v1/models").json()["data"][0]
        body = client.post("/v1/embeddings", json={"input": ["album/1/a.jpg", "album/2/c.jpg"]}).json()
        text = client.post("/v1/embeddings", json={"input": "a photo", "modality": "text"}).json()
    assert model["id"] == "ViT-B-32/random"
    assert model["dimension"] == 512
    assert model["image_size"] == [224, 224]
    assert [len(d["embedding"]) for d in body["data"]] == [512, 512]
    assert len(text["data"][0]["embedding"]) == 512
