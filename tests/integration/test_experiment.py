"""`cliplens experiment` end to end: the real CLI, the real in-process service, real fake-gcs-server.

The experiment runs at a tiny size (tiny model, four 320x240 photos, scenarios 1 and 4x3), once on
the local directory and once on fake GCS behind the latency proxy. The tests read its results.json
and stdout, and recompute the table's numbers from the raw records with plain Python, independently
of cliplens.experiment.report. Photos already where the service reads (a bucket of the session's
fake-gcs-server, a folder under a running service's image root) are measured in place.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from cliplens.experiment import corpus
from cliplens.experiment.corpus import encode_jpeg, render_photo
from cliplens.experiment.inprocess import InProcessService
from cliplens.experiment.latency import LatencyProxy
from cliplens.experiment.storage import BucketPrefix, list_photos
from cliplens.settings import Settings
from cliplens.vocabulary import PIPELINE_STAGES, ErrorCode, Stage
from tests.conftest import BUCKET
from tests.harness.servers import FakeGcs, child_environment

STAGES = PIPELINE_STAGES  # the study's load skips the embedding cache
SCENARIOS = {"1x1": (1, 1), "4x3": (4, 3)}
DELAY_MS = 150.0
RATE_MBPS = 8.0


@dataclass
class Run:
    directory: Path
    stdout: str
    stderr: str
    returncode: int

    def results(self, label: str) -> dict[str, Any]:
        return json.loads((self.directory / f"{label}.json").read_text())  # type: ignore[no-any-return]


def _env(tiny_model: str) -> dict[str, str]:
    return child_environment(CLIPLENS_MODEL=tiny_model, CLIPLENS_PRETRAINED="none", CLIPLENS_CPU_WORKERS="2")


def _cliplens(
    tiny_model: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cliplens.cli", *args],
        env={**_env(tiny_model), **(env or {})},
        capture_output=True,
        text=True,
        timeout=240,
    )


def _experiment(tiny_model: str, directory: Path, label: str, *extra: str) -> Run:
    result = _cliplens(
        tiny_model,
        "experiment",
        "--dir",
        str(directory),
        "--label",
        label,
        "--photos",
        "4",
        "--mix",
        "320x240=1",
        "--scenario",
        "1",
        "--scenario",
        "4x3",
        *extra,
    )
    return Run(directory, result.stdout, result.stderr, result.returncode)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("experiment")


@pytest.fixture(scope="module")
def local_run(tiny_model: str, results_dir: Path) -> Run:
    run = _experiment(tiny_model, results_dir, "local")
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    return run


@pytest.fixture(scope="module")
def delayed_run(tiny_model: str, results_dir: Path) -> Run:
    run = _experiment(
        tiny_model,
        results_dir,
        "delayed",
        "--storage",
        "fake-gcs",
        "--delay-ms",
        str(DELAY_MS),
        "--rate-mbps",
        str(RATE_MBPS),
    )
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    return run


# --- the test's own arithmetic: plain Python, nothing from cliplens.experiment.report -------------


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _quantile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "p50": _quantile(values, 50),
        "p95": _quantile(values, 95),
        "p99": _quantile(values, 99),
    }


def _in_stage(timing: dict[str, float]) -> float:
    return timing["queue_ms"] + timing["work_ms"]


def _per_image(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    series: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "load+decode")}
    for record in records:
        for item in record["items"]:
            for stage in STAGES:
                series[stage].append(_in_stage(item["stages"][stage]))
            series["load+decode"].append(
                _in_stage(item["stages"][Stage.LOAD]) + _in_stage(item["stages"][Stage.DECODE])
            )
    return series


def _per_request(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    series: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "total", "load+decode")}
    for record in records:
        for stage in (*STAGES, "total"):
            series[stage].append(record["stages_ms"][stage])
        series["load+decode"].append(
            max(
                _in_stage(i["stages"][Stage.LOAD]) + _in_stage(i["stages"][Stage.DECODE])
                for i in record["items"]
            )
        )
    return series


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("│┃").split("│")]


def _rows(table_text: str, scenario_name: str, images: int, requests: int) -> tuple[list[str], list[str]]:
    lines = table_text.splitlines()
    for index, line in enumerate(lines):
        if scenario_name in line and f"per image ({images})" in line:
            request_line = lines[index + 1]
            assert f"per request ({requests})" in request_line
            return _cells(line), _cells(request_line)
    raise AssertionError(f"no row for {scenario_name!r} in\n{table_text}")


def _shows(cell: str, stats: dict[str, float], fields: tuple[str, str, str]) -> bool:
    """The cell prints the values, each to within half a unit of its last digit.

    The cell's text is compared number by number rather than as a string: two correct sums in a
    different order may differ in the last bit, which flips a value lying exactly on a rounding
    boundary (a mean of four Server-Timing values such as 5.125) to one side or the other.
    """
    values = [stats["mean"]] if stats["count"] == 1 else [stats[name] for name in fields]
    shown = cell.split(" / ")
    if len(shown) != len(values):
        return False
    for text, value in zip(shown, values, strict=True):
        decimals = len(text.partition(".")[2])
        close = abs(float(text) - value) <= 0.5 * 10**-decimals + 1e-9
        if text != _fmt(value) and not (close and decimals == len(_fmt(value).partition(".")[2])):
            return False
    return True


# --- the tests ----------------------------------------------------------------------------------


def test_results_hold_every_stage_of_every_scenario_with_the_counts_sent(local_run: Run) -> None:
    data = local_run.results("local")
    assert [s["key"] for s in data["scenarios"]] == list(SCENARIOS)
    for scenario in data["scenarios"]:
        images, concurrency = SCENARIOS[scenario["key"]]
        summary = scenario["summary"]
        assert (summary["requests"], summary["requests_ok"]) == (concurrency, concurrency)
        assert (summary["images"], summary["images_ok"]) == (images * concurrency, images * concurrency)
        assert summary["error_count"] == 0
        assert len(scenario["records"]) == concurrency
        assert all(len(r["items"]) == images and r["status"] == 200 for r in scenario["records"])
        for stage in (*STAGES, "load+decode"):
            for measure, stats in summary["per_image"][stage].items():
                assert stats["count"] == images * concurrency, (stage, measure)
                assert stats["min"] <= stats["mean"] <= stats["max"]
                assert stats["min"] <= stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"]
        assert set(summary["per_image"][Stage.LOAD]) == {"time", "wait", "work"}
        for stage in (*STAGES, "load+decode", "total", "latency"):
            stats = summary["per_request"][stage]
            assert stats["count"] == concurrency, stage
            assert stats["min"] <= stats["mean"] <= stats["max"]
    model = data["service"]["model"]
    assert model["random_weights"] is True and model["device"] == "cpu" and model["dimension"] == 32
    assert data["service"]["settings"]["model"].startswith("local-dir:")
    assert data["corpus"]["count"] == 4 and data["corpus"]["classes"] == {"320x240": 4}
    machine = data["machine"]
    assert machine["cores_usable"] >= 1 and machine["cpu"] and machine["memory_bytes"] > 0
    assert machine["gpus"] == [] and machine["versions"]["torch"] and machine["versions"]["open_clip_torch"]
    assert data["options"]["scenarios"] == list(SCENARIOS)


def test_the_figure_is_a_valid_png(local_run: Run) -> None:
    path = local_run.directory / "local.png"
    assert f"figure: {path}" in local_run.stdout.replace("\n", "")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 600


def test_the_table_and_summaries_are_what_the_raw_records_say(local_run: Run) -> None:
    data = local_run.results("local")
    first_table, percentile_table = local_run.stdout.split("p50 / p95 / p99", 1)
    columns = (Stage.LOAD, Stage.DECODE, "load+decode", Stage.PREPROCESS, Stage.EMBED)
    for scenario in data["scenarios"]:
        images, concurrency = SCENARIOS[scenario["key"]]
        records = scenario["records"]
        per_image = {stage: _stats(values) for stage, values in _per_image(records).items()}
        per_request = {stage: _stats(values) for stage, values in _per_request(records).items()}
        summary = scenario["summary"]
        for stage, expected in per_image.items():
            got = summary["per_image"][stage]["time"]
            for name, value in expected.items():
                assert math.isclose(got[name], value, rel_tol=1e-9, abs_tol=1e-9), (stage, name)
        for stage, expected in per_request.items():
            got = summary["per_request"][stage]
            for name, value in expected.items():
                assert math.isclose(got[name], value, rel_tol=1e-9, abs_tol=1e-9), (stage, name)
        wall_s = (max(r["done_ms"] for r in records) - min(r["sent_ms"] for r in records)) / 1e3
        throughput = sum(r["ok"] for r in records) / wall_s
        assert math.isclose(summary["images_per_s"], throughput, rel_tol=1e-9)

        for table, fields in (
            (first_table, ("min", "max", "mean")),
            (percentile_table, ("p50", "p95", "p99")),
        ):
            image_row, request_row = _rows(table, scenario["name"], images * concurrency, concurrency)
            for cell, column in zip(image_row[2:7], columns, strict=True):
                assert _shows(cell, per_image[column], fields), (scenario["key"], column, cell)
            assert image_row[7] == "-"
            for cell, column in zip(request_row[2:8], (*columns, "total"), strict=True):
                assert _shows(cell, per_request[column], fields), (scenario["key"], column, cell)
            assert image_row[8] == f"{throughput:.1f}" and image_row[9] == "0"


def test_injected_storage_latency_shows_in_the_measured_load_stage(delayed_run: Run) -> None:
    data = delayed_run.results("delayed")
    smallest = min(p.stat().st_size for p in (delayed_run.directory / "photos").glob("*.jpg"))
    transfer_ms = smallest * 8 / (RATE_MBPS * 1e6) * 1e3
    loads = [
        item["stages"][Stage.LOAD]["work_ms"]
        for scenario in data["scenarios"]
        for record in scenario["records"]
        for item in record["items"]
    ]
    assert len(loads) == 1 + 12
    assert min(loads) >= DELAY_MS + transfer_ms
    for scenario in data["scenarios"]:
        assert all(r["stages_ms"][Stage.LOAD] >= DELAY_MS for r in scenario["records"])
    proxy = data["storage"]["proxy"]
    assert proxy["delay_ms"] == DELAY_MS and proxy["rate_mbps"] == RATE_MBPS
    assert proxy["requests"] >= len(loads)
    assert data["storage"]["kind"] == "fake-gcs"
    assert data["service"]["settings"]["gcs_emulator_host"] == data["storage"]["service_reads_from"]


def test_compare_sets_two_runs_side_by_side_with_the_ratio_per_stage(
    local_run: Run, delayed_run: Run, tiny_model: str
) -> None:
    result = _cliplens(
        tiny_model,
        "experiment",
        "--compare",
        str(local_run.directory / "local.json"),
        str(delayed_run.directory / "delayed.json"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "local -> delayed" in result.stdout
    assert "storage.kind" in result.stdout and "fake-gcs" in result.stdout
    local, delayed = (
        run.results(label)["scenarios"][0]["summary"]["per_image"][Stage.LOAD]["time"]["mean"]
        for run, label in ((local_run, "local"), (delayed_run, "delayed"))
    )
    load_row = next(line for line in result.stdout.splitlines() if "per image load " in line)
    cells = _cells(load_row)
    assert cells[0] == "1 image"
    assert cells[4] == f"x{delayed / local:.2f}"
    assert delayed / local > 10


@pytest.fixture
def proxied_gcs(fake_gcs: FakeGcs) -> Iterator[tuple[LatencyProxy, bytes]]:
    data = os.urandom(250_000)
    fake_gcs.upload(BUCKET, "proxy/blob.bin", data, content_type="application/octet-stream")
    with LatencyProxy("127.0.0.1", fake_gcs.port, delay_ms=120, rate_mbps=4) as proxy:
        yield proxy, data


def test_the_proxy_delays_every_request_and_paces_each_connection(
    proxied_gcs: tuple[LatencyProxy, bytes], fake_gcs: FakeGcs
) -> None:
    proxy, data = proxied_gcs
    path = f"/storage/v1/b/{BUCKET}/o/proxy%2Fblob.bin"
    floor_s = 0.120 + len(data) * 8 / 4e6
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        for _ in range(2):
            started = time.perf_counter()
            response = client.get(path, params={"alt": "media"})
            elapsed = time.perf_counter() - started
            assert response.content == data
            assert elapsed >= floor_s
    assert proxy.counters.connections == 1
    assert proxy.counters.requests == 2
    assert proxy.counters.bytes_down >= 2 * len(data)
    started = time.perf_counter()
    direct = httpx.get(f"{fake_gcs.url}{path}", params={"alt": "media"}, timeout=30)
    assert direct.content == data and time.perf_counter() - started < floor_s / 2


def test_a_running_service_is_measured_through_its_url_with_photos_copied_to_its_root(
    tiny_model: str, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    settings = Settings(model=tiny_model, pretrained="none", image_root=served, cpu_workers=2)
    with InProcessService(settings) as url:
        result = _cliplens(
            tiny_model,
            "experiment",
            "--url",
            url,
            "--image-root",
            str(served),
            "--dir",
            str(tmp_path / "out"),
            "--photos",
            "2",
            "--mix",
            "64x48=1",
            "--scenario",
            "2x2",
            "--no-figure",
        )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["service"] == {**data["service"], "url": url, "in_process": False, "settings": None}
    assert data["scenarios"][0]["summary"]["images_ok"] == 4
    copied = sorted(p.name for p in (served / "cliplens-experiment").iterdir())
    assert copied == sorted(p.name for p in (tmp_path / "out" / "photos").iterdir())
    assert (tmp_path / "out" / "references.txt").read_text().split() == [
        f"cliplens-experiment/{name}" for name in copied
    ]
    assert not (tmp_path / "out" / "results.png").exists()


def test_your_own_photos_are_measured_from_an_empty_working_directory(
    tiny_model: str, tmp_path: Path
) -> None:
    """The headline use: `cliplens experiment --photos ./my-photos` where nothing else exists yet
    (the default output folder, cliplens-results, is made by the study, not only by generation)."""
    photos = tmp_path / "my-photos"
    photos.mkdir()
    for index, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (96, 64), colour).save(photos / f"photo-{index}.jpg")
    cwd = tmp_path / "empty"
    cwd.mkdir()
    command = ["experiment", "--photos", "../my-photos", "--scenario", "3", "--no-figure"]
    result = subprocess.run(
        [sys.executable, "-m", "cliplens.cli", *command],
        env=_env(tiny_model),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    data = json.loads((cwd / "cliplens-results" / "results.json").read_text())
    assert data["scenarios"][0]["summary"]["images_ok"] == 3
    assert data["corpus"]["count"] == 3 and data["corpus"]["source"] == "folder"
    assert (cwd / "cliplens-results" / "references.txt").read_text().split() == [
        f"photo-{index}.jpg" for index in range(3)
    ]
    assert sorted(p.name for p in cwd.iterdir()) == ["cliplens-results"]


def test_a_folder_under_a_running_services_image_root_is_measured_in_place(
    tiny_model: str, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    (served / "album").mkdir(parents=True)
    for index in range(3):
        (served / "album" / f"photo-{index}.jpg").write_bytes(encode_jpeg(render_photo(index, 96, 64)))
    before = sorted(path.relative_to(served) for path in served.rglob("*"))
    settings = Settings(model=tiny_model, pretrained="none", image_root=served, cpu_workers=2)
    with InProcessService(settings) as url:
        result = _cliplens(
            tiny_model,
            "experiment",
            "--url",
            url,
            "--image-root",
            str(served),
            "--photos",
            str(served / "album"),
            "--dir",
            str(tmp_path / "out"),
            "--scenario",
            "3",
            "--no-figure",
        )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert sorted(path.relative_to(served) for path in served.rglob("*")) == before
    assert (tmp_path / "out" / "references.txt").read_text().split() == [
        f"album/photo-{index}.jpg" for index in range(3)
    ]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["storage"]["in_place"] is True and data["storage"]["image_root"] == str(served)
    assert data["scenarios"][0]["summary"]["images_ok"] == 3


# --- photos already in a bucket: `--photos gs://BUCKET/PREFIX` ------------------------------------

IN_PLACE_BUCKET = "experiment-in-place"
SHOTS = [f"shots/photo-{index}.jpg" for index in range(4)]
BROKEN = "shots/zz-broken.jpg"
"""Named last, so that the study's one-photo preflight asks for a good one."""


def _objects(gcs: FakeGcs, bucket: str) -> list[tuple[str, str, str]]:
    """Every object of the bucket with its generation and size: an upload, even of the same bytes
    under the same name, would show as a new generation."""
    response = httpx.get(f"{gcs.url}/storage/v1/b/{bucket}/o", timeout=30)
    response.raise_for_status()
    return sorted((item["name"], item["generation"], item["size"]) for item in response.json()["items"])


@pytest.fixture(scope="module")
def stocked_gcs(fake_gcs: FakeGcs) -> FakeGcs:
    """A bucket of the session's fake-gcs-server holding four photos and a broken one under `shots/`,
    with a note beside them and a photo under a prefix that only starts like it."""
    fake_gcs.create_bucket(IN_PLACE_BUCKET)
    for index, name in enumerate(SHOTS):
        fake_gcs.upload(IN_PLACE_BUCKET, name, encode_jpeg(render_photo(index, 96, 64)))
    fake_gcs.upload(IN_PLACE_BUCKET, BROKEN, b"\xff\xd8 not really a JPEG")
    fake_gcs.upload(IN_PLACE_BUCKET, "shots/notes.txt", b"not a photo", content_type="text/plain")
    fake_gcs.upload(IN_PLACE_BUCKET, "shots-old/photo.jpg", encode_jpeg(render_photo(9, 96, 64)))
    return fake_gcs


def _emulator(gcs: FakeGcs) -> dict[str, str]:
    """The experiment's environment for a GCS that is the emulator: its settings, as for the service."""
    return {"STORAGE_EMULATOR_HOST": gcs.url, "CLIPLENS_ALLOW_EMULATOR": "1"}


def _words(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + result.stderr).split())


def test_photos_already_in_a_bucket_are_measured_there_without_an_upload(
    tiny_model: str, stocked_gcs: FakeGcs, tmp_path: Path
) -> None:
    before = _objects(stocked_gcs, IN_PLACE_BUCKET)
    out = tmp_path / "out"
    result = _cliplens(
        tiny_model,
        "experiment",
        "--photos",
        f"gs://{IN_PLACE_BUCKET}/shots",
        "--scenario",
        "5",
        "--dir",
        str(out),
        "--no-figure",
        env=_emulator(stocked_gcs),
    )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert _objects(stocked_gcs, IN_PLACE_BUCKET) == before
    listed = [*SHOTS, BROKEN]
    assert (out / "references.txt").read_text().split() == [f"gs://{IN_PLACE_BUCKET}/{n}" for n in listed]
    data = json.loads((out / "results.json").read_text())
    assert data["corpus"]["count"] == 5 and data["corpus"]["source"] == "bucket"
    assert data["corpus"]["directory"] == f"gs://{IN_PLACE_BUCKET}/shots/"
    assert data["storage"]["kind"] == "gcs" and data["storage"]["in_place"] is True
    assert data["storage"]["emulator"] == stocked_gcs.url
    assert data["service"]["settings"]["gcs_emulator_host"] == stocked_gcs.url
    assert data["service"]["settings"]["default_bucket"] == IN_PLACE_BUCKET
    # Every request asks for partial answers: the broken photo is one counted item error, and the
    # other four are measured, whatever the service's default for failed items.
    (record,) = data["scenarios"][0]["records"]
    assert record["status"] == 200 and record["ok"] == 4 and sum(record["errors"].values()) == 1
    assert set(record["errors"]) <= set(ErrorCode)
    summary = data["scenarios"][0]["summary"]
    assert (summary["images"], summary["images_ok"], summary["error_count"]) == (5, 4, 1)
    assert "per image (4)" in result.stdout and "per request (1)" in result.stdout


def test_limit_takes_a_sample_of_the_bucket_drawn_with_the_seed(
    tiny_model: str, stocked_gcs: FakeGcs, tmp_path: Path
) -> None:
    listed = list_photos(BucketPrefix.parse(f"gs://{IN_PLACE_BUCKET}/shots"), stocked_gcs.url)
    assert [photo.name for photo in listed] == [*SHOTS, BROKEN]
    samples = {tuple(p.name for p in corpus.sample(listed, 3, seed)) for seed in range(6)}
    assert len(samples) > 1
    good = [photo for photo in listed if photo.name != BROKEN]
    seed = next(seed for seed in range(100) if BROKEN not in {p.name for p in corpus.sample(listed, 3, seed)})
    runs = []
    for label in ("first", "again"):
        result = _cliplens(
            tiny_model,
            "experiment",
            "--photos",
            f"gs://{IN_PLACE_BUCKET}/shots/",
            "--limit",
            "3",
            "--seed",
            str(seed),
            "--scenario",
            "3",
            "--warmup",
            "0",
            "--dir",
            str(tmp_path / label),
            "--no-figure",
            env=_emulator(stocked_gcs),
        )
        assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
        runs.append((tmp_path / label / "references.txt").read_text().split())
        data = json.loads((tmp_path / label / "results.json").read_text())
        assert data["corpus"]["count"] == 3 and data["scenarios"][0]["summary"]["images_ok"] == 3
    expected = [f"gs://{IN_PLACE_BUCKET}/{p.name}" for p in corpus.sample(listed, 3, seed)]
    assert runs[0] == runs[1] == expected
    assert set(expected) <= {f"gs://{IN_PLACE_BUCKET}/{p.name}" for p in good}


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (f"gs://{IN_PLACE_BUCKET}/nothing-here", f"gs://{IN_PLACE_BUCKET}/nothing-here/ holds no photos"),
        ("gs://no-such-bucket/shots", "the bucket 'no-such-bucket' does not exist"),
    ],
)
def test_an_empty_prefix_or_a_missing_bucket_is_a_message_and_an_exit_status(
    tiny_model: str, stocked_gcs: FakeGcs, tmp_path: Path, uri: str, message: str
) -> None:
    before = _objects(stocked_gcs, IN_PLACE_BUCKET)
    result = _cliplens(
        tiny_model, "experiment", "--photos", uri, "--dir", str(tmp_path / "out"), env=_emulator(stocked_gcs)
    )
    assert result.returncode == 1
    assert message in _words(result)
    assert "Traceback" not in result.stdout + result.stderr
    assert _objects(stocked_gcs, IN_PLACE_BUCKET) == before
