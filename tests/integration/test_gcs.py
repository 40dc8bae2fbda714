"""GCS as the image source, against a real fake-gcs-server on loopback."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from cliplens.experiment.inprocess import free_port
from cliplens.settings import Settings
from tests.conftest import BUCKET, running


def vectors(body: dict[str, list[dict[str, object]]]) -> dict[int, np.ndarray]:
    return {d["index"]: np.asarray(d["embedding"], dtype=np.float32) for d in body["data"]}  # type: ignore[misc]


def test_bare_names_and_gs_uris_load_from_the_bucket_with_partial_failure(gcs_settings: Settings) -> None:
    inputs = [
        "album/1/a.jpg",
        f"gs://{BUCKET}/album/1/b.jpg",
        f"gs://{BUCKET}/album/missing.jpg",
        "gs://other-bucket/secret.jpg",
        f"gs://{BUCKET}/album/2/c.jpg",
    ]
    with running(gcs_settings) as client:
        response = client.post("/v1/embeddings", json={"input": inputs})
    assert response.status_code == 200
    body = response.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 4]
    assert [(e["index"], e["code"]) for e in body["errors"]] == [(2, "not_found"), (3, "forbidden")]
    assert body["errors"][0]["input"] == f"gs://{BUCKET}/album/missing.jpg"
    assert "load;dur=" in response.headers["server-timing"]


def test_the_same_photo_gives_the_same_vector_from_gcs_and_from_a_local_directory(
    gcs_settings: Settings, photo_dir: Path
) -> None:
    with running(gcs_settings) as client:
        from_gcs = vectors(client.post("/v1/embeddings", json={"input": ["album/2/c.jpg"]}).json())
    local = dataclasses.replace(gcs_settings, default_bucket=None, allowed_buckets=(), image_root=photo_dir)
    with running(local) as client:
        from_disk = vectors(client.post("/v1/embeddings", json={"input": ["album/2/c.jpg"]}).json())
    np.testing.assert_allclose(from_gcs[0], from_disk[0], atol=1e-6)


def test_unreachable_storage_is_storage_unavailable_per_item(gcs_settings: Settings, photo_dir: Path) -> None:
    broken = dataclasses.replace(
        gcs_settings, gcs_emulator_host=f"http://127.0.0.1:{free_port()}", image_root=photo_dir
    )
    data_uri = (
        "data:image/jpeg;base64,"
        + __import__("base64").b64encode((photo_dir / "album/1/a.jpg").read_bytes()).decode()
    )
    with running(broken) as client:
        body = client.post("/v1/embeddings", json={"input": ["album/1/a.jpg", data_uri]}).json()
    assert [e["code"] for e in body["errors"]] == ["storage_unavailable"]
    assert [d["index"] for d in body["data"]] == [1]
