"""Hostile and odd images, and references that try to escape, through the real HTTP API.

Every hostile file is built here (no binaries in the repository) and sent between two good photos
in one request: the hostile item must get its exact code and the good items must come back with
the vectors the same photos get when sent alone. Odd but valid images (EXIF orientation, CMYK,
grayscale, 16-bit, palette, alpha, animated GIF) must embed like their explicitly converted
equivalent. The model is the seeded tiny one, so vectors are stable across app instances.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from PIL import Image, ImageOps

from cliplens.experiment.corpus import encode_jpeg, render_photo
from cliplens.settings import Settings
from tests.conftest import BUCKET, PARTIAL, photo_bytes, running
from tests.harness.hostile_bytes import HOSTILE_FILES, MAX_IMAGE_BYTES, PHOTO, jpeg_claiming, save
from tests.harness.servers import FakeGcs

Client = TestClient[Litestar]
GOOD = ("good/a.jpg", "good/b.jpg")
OTHER = render_photo(32, 640, 480)


# odd but valid images: (the odd file, its explicit equivalent, a wrong rendition of it)


def _odd_cases() -> dict[str, tuple[bytes, bytes, bytes]]:
    exif_rotated = encode_jpeg(PHOTO, orientation=6)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(exif_rotated)))
    gray = PHOTO.convert("L")
    wide = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    clipped = Image.fromarray(np.minimum(np.asarray(wide), 255).astype(np.uint8))
    palette = PHOTO.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    rgba = PHOTO.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(PHOTO.size))

    def over(colour: tuple[int, int, int]) -> Image.Image:
        return Image.alpha_composite(Image.new("RGBA", PHOTO.size, (*colour, 255)), rgba).convert("RGB")

    first = PHOTO.convert("P", palette=Image.Palette.ADAPTIVE)
    second = OTHER.convert("P", palette=Image.Palette.ADAPTIVE)
    return {
        # the stored pixels rotated by the EXIF tag vs the same pixels already upright; wrong: not rotated
        "exif-orientation.jpg": (exif_rotated, encode_jpeg(shown), save(PHOTO, "PNG")),
        # wrong: the CMYK channels read as inverted, the classic Adobe-CMYK mistake
        "cmyk.jpg": (
            save(PHOTO.convert("CMYK"), "JPEG", quality=90),
            save(PHOTO, "PNG"),
            save(ImageOps.invert(PHOTO), "PNG"),
        ),
        "grayscale.jpg": (
            save(gray, "JPEG", quality=90),
            save(gray.convert("RGB"), "PNG"),
            save(PHOTO, "PNG"),
        ),
        # 16-bit: scaled to 8 bits; wrong: clipped, nearly all white
        "sixteen-bit.png": (save(wide, "PNG"), save(gray, "PNG"), save(clipped, "PNG")),
        "palette.png": (
            save(palette, "PNG"),
            save(palette.convert("RGB"), "PNG"),
            save(palette.convert("L"), "PNG"),
        ),
        # alpha composited on white; wrong: on black
        "alpha.png": (save(rgba, "PNG"), save(over((255, 255, 255)), "PNG"), save(over((0, 0, 0)), "PNG")),
        # an animated GIF is its first frame; wrong: the second
        "animated.gif": (
            save(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0),
            save(first.convert("RGB"), "PNG"),
            save(second.convert("RGB"), "PNG"),
        ),
        # allowed formats other than JPEG and PNG, and a PNG behind a .jpg name
        "bitmap.bmp": (save(PHOTO, "BMP"), save(PHOTO, "PNG"), save(OTHER, "PNG")),
        "tiff.tif": (save(PHOTO, "TIFF"), save(PHOTO, "PNG"), save(OTHER, "PNG")),
        "webp.webp": (save(PHOTO, "WEBP", lossless=True), save(PHOTO, "PNG"), save(OTHER, "PNG")),
        "png-named.jpg": (save(PHOTO, "PNG"), save(PHOTO, "PNG"), save(OTHER, "PNG")),
    }


ODD = _odd_cases()
SAME = 1e-4
"""1 - cosine allowed between an odd image and its explicit equivalent. Measured with this model:
below 2e-6 for every case, JPEG re-encoding included, while the wrong renditions are 2e-3 (EXIF
ignored) to 0.25 (16-bit clipped) away: the tiny random CLIP maps all photos close together, so
the usual 0.99 would not tell right from wrong here; 1e-4 does, with margin on both sides."""
WRONG = 1e-3


# local references that try to escape, and names that are not regular files


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hostile")
    root = base / "root"
    (root / "good").mkdir(parents=True)
    (root / "good/a.jpg").write_bytes(photo_bytes("album/1/a.jpg"))
    (root / "good/b.jpg").write_bytes(photo_bytes("album/1/b.jpg"))
    for name, (data, _) in HOSTILE_FILES.items():
        (root / name).write_bytes(data)
    for name, files in ODD.items():
        for suffix, data in zip(("", ".equivalent.png", ".wrong.png"), files, strict=True):
            (root / "odd" / f"{name}{suffix}").parent.mkdir(exist_ok=True)
            (root / "odd" / f"{name}{suffix}").write_bytes(data)
    # a real photo outside the root: reading it through any name below would be an escape
    (base / "outside.jpg").write_bytes(photo_bytes("album/2/c.jpg"))
    (base / "outside-dir").mkdir()
    (base / "outside-dir/c.jpg").write_bytes(photo_bytes("album/2/c.jpg"))
    (root / "escape.jpg").symlink_to(base / "outside.jpg")
    (root / "escape-relative.jpg").symlink_to("../outside.jpg")
    (root / "linked-dir").symlink_to(base / "outside-dir")
    (root / "loop.jpg").symlink_to("loop.jpg")
    (root / "inside-link.jpg").symlink_to("good/a.jpg")
    os.mkfifo(root / "pipe.jpg")
    return root


LOCAL_REFERENCES: list[tuple[str, str]] = [
    ("../outside.jpg", "forbidden"),
    ("good/../../outside.jpg", "forbidden"),
    ("/etc/passwd", "forbidden"),
    ("..\\outside.jpg", "forbidden"),
    ("C:\\Windows\\win.ini", "forbidden"),
    ("escape.jpg", "forbidden"),
    ("escape-relative.jpg", "forbidden"),
    ("linked-dir/c.jpg", "forbidden"),
    ("a\x00b.jpg", "invalid_reference"),
    ("good/a.jpg\x00.png", "invalid_reference"),
    (".", "invalid_reference"),
    ("..", "invalid_reference"),
    ("file:///etc/passwd", "invalid_reference"),
    ("http://169.254.169.254/computeMetadata/v1/", "forbidden"),  # URLs are off (CLIPLENS_URL_HOSTS)
    ("gs://photos%2Fo%2Fother%2Fobj%3Falt%3Dmedia%23/x.jpg", "invalid_reference"),
    ("gs://photos/o/other%2Fobj?alt=media#", "forbidden"),  # no bucket is allowed in this service
    ("%2e%2e/outside.jpg", "not_found"),
    ("~/outside.jpg", "not_found"),
    ("\u2024\u2024/outside.jpg", "not_found"),
    ("good", "not_found"),
    ("good/a.jpg/child", "not_found"),
    ("x" * 300 + ".jpg", "not_found"),
    ("loop.jpg", "not_found"),
    ("pipe.jpg", "not_found"),
]


@pytest.fixture(scope="module")
def settings_hostile(tiny_weights: Path, layout: Path) -> Settings:
    return Settings(
        model=f"local-dir:{tiny_weights}",
        image_root=layout,
        cpu_workers=2,
        max_inputs=64,
        max_image_bytes=MAX_IMAGE_BYTES,
        request_timeout_s=20.0,
        on_error=PARTIAL,
    )


@pytest.fixture(scope="module")
def service(settings_hostile: Settings, layout: Path) -> Iterator[Client]:
    with running(settings_hostile) as client:
        yield client
        # should a regression open the FIFO for reading, give that thread EOF, so the app can stop
        with contextlib.suppress(OSError):
            os.close(os.open(layout / "pipe.jpg", os.O_WRONLY | os.O_NONBLOCK))


def embed(client: Client, inputs: list[str]) -> dict[str, object]:
    response = client.post("/v1/embeddings", json={"input": inputs})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def outcome(body: dict[str, object]) -> tuple[dict[int, str], dict[int, np.ndarray]]:
    codes = {int(d["index"]): "ok" for d in body["data"]}  # type: ignore[attr-defined]
    codes.update({int(e["index"]): e["code"] for e in body["errors"]})  # type: ignore[attr-defined]
    vectors = {
        int(d["index"]): np.asarray(d["embedding"], dtype=np.float64)
        for d in body["data"]  # type: ignore[attr-defined]
    }
    return codes, vectors


@pytest.fixture(scope="module")
def alone(service: Client) -> dict[str, np.ndarray]:
    """Each good photo's vector, sent alone."""
    return {name: outcome(embed(service, [name]))[1][0] for name in GOOD}


def assert_between_good_items(client: Client, alone: dict[str, np.ndarray], item: str, code: str) -> None:
    codes, vectors = outcome(embed(client, [GOOD[0], item, GOOD[1]]))
    assert codes == {0: "ok", 1: code, 2: "ok"}
    # batches of different composition differ by ~1e-6
    np.testing.assert_allclose(vectors[0], alone[GOOD[0]], atol=1e-5)
    np.testing.assert_allclose(vectors[2], alone[GOOD[1]], atol=1e-5)


@pytest.mark.parametrize(
    ("name", "code"), [(n, c) for n, (_, c) in HOSTILE_FILES.items()], ids=list(HOSTILE_FILES)
)
def test_a_hostile_file_gets_its_code_and_spares_the_good_items(
    service: Client, alone: dict[str, np.ndarray], name: str, code: str
) -> None:
    assert_between_good_items(service, alone, name, code)


@pytest.mark.parametrize(("item", "code"), LOCAL_REFERENCES, ids=[repr(i)[:40] for i, _ in LOCAL_REFERENCES])
def test_a_local_reference_that_tries_to_escape_gets_its_code(
    service: Client, alone: dict[str, np.ndarray], item: str, code: str
) -> None:
    assert_between_good_items(service, alone, item, code)


def test_a_symlink_inside_the_root_is_followed(service: Client, alone: dict[str, np.ndarray]) -> None:
    codes, vectors = outcome(embed(service, ["inside-link.jpg"]))
    assert codes == {0: "ok"}
    np.testing.assert_allclose(vectors[0], alone["good/a.jpg"], atol=1e-5)


@pytest.mark.parametrize("name", list(ODD))
def test_an_odd_but_valid_image_embeds_like_its_explicit_equivalent(
    service: Client, alone: dict[str, np.ndarray], name: str
) -> None:
    inputs = [GOOD[0], f"odd/{name}", f"odd/{name}.equivalent.png", f"odd/{name}.wrong.png", GOOD[1]]
    codes, vectors = outcome(embed(service, inputs))
    assert codes == dict.fromkeys(range(5), "ok")
    np.testing.assert_allclose(vectors[0], alone[GOOD[0]], atol=1e-5)
    np.testing.assert_allclose(vectors[4], alone[GOOD[1]], atol=1e-5)
    odd, equivalent, wrong = vectors[1], vectors[2], vectors[3]
    assert 1 - odd @ equivalent < SAME
    assert 1 - odd @ wrong > WRONG, (
        "this model cannot tell the wrong rendition apart; the test proves nothing"
    )


def test_every_hostile_file_at_once_in_an_upload_leaves_the_service_healthy(
    service: Client, alone: dict[str, np.ndarray], layout: Path
) -> None:
    names = [GOOD[0], *HOSTILE_FILES, GOOD[1]]
    files = [("files", (name, (layout / name).read_bytes(), "image/jpeg")) for name in names]
    response = service.post("/v1/embeddings/upload", files=files)
    assert response.status_code == 200
    codes, vectors = outcome(response.json())
    assert codes == {
        0: "ok",
        **{i + 1: c for i, (_, c) in enumerate(HOSTILE_FILES.values())},
        len(names) - 1: "ok",
    }
    np.testing.assert_allclose(vectors[0], alone[GOOD[0]], atol=1e-5)
    np.testing.assert_allclose(vectors[len(names) - 1], alone[GOOD[1]], atol=1e-5)
    assert service.get("/healthz").status_code == 200
    assert service.get("/readyz").status_code == 200


def test_the_device_decoder_path_gives_the_same_codes_and_embeddings(
    settings_hostile: Settings, alone: dict[str, np.ndarray]
) -> None:
    """With CLIPLENS_GPU_DECODE, JPEGs take torchvision's decoder (here on the CPU device, as on
    CUDA); every hostile file keeps its code and every odd image embeds like its equivalent."""
    with running(dataclasses.replace(settings_hostile, gpu_decode=True)) as device_path:
        body = embed(device_path, [GOOD[0], *HOSTILE_FILES, GOOD[1]])
        codes, vectors = outcome(body)
        expected = [c for _, c in HOSTILE_FILES.values()]
        assert codes == {0: "ok", **{i + 1: c for i, c in enumerate(expected)}, len(expected) + 1: "ok"}
        for name in ODD:
            inputs = [f"odd/{name}", f"odd/{name}.equivalent.png", f"odd/{name}.wrong.png"]
            codes, vectors = outcome(embed(device_path, inputs))
            assert codes == dict.fromkeys(range(3), "ok"), name
            assert 1 - vectors[0] @ vectors[1] < SAME, name
            assert 1 - vectors[0] @ vectors[2] > WRONG, name


def test_the_pixel_cap_is_the_setting_not_pillows_own_limit(settings_hostile: Settings, layout: Path) -> None:
    """95 MP is above Pillow's built-in bomb limit (89 MP) and below the 100 MP default cap: refused
    only when the setting says so. The file is a small JPEG whose header claims 95 MP; once the cap
    lets it through, libjpeg decodes it (at 1/8 scale, cheaply) and the scan ends long before its
    last block: `decode_failed` (a cut JPEG), never `too_large`."""
    (layout / "claims-95mp.jpg").write_bytes(jpeg_claiming(10_000, 9_500))
    for cap, code in ((100_000_000, "decode_failed"), (90_000_000, "too_large")):
        with running(dataclasses.replace(settings_hostile, max_image_pixels=cap)) as client:
            codes, _ = outcome(embed(client, ["claims-95mp.jpg"]))
            assert codes == {0: code}, cap


BOMB_PROBE = """
import json, pathlib, sys
from cliplens.pipeline.decode import decode_image
from cliplens.vocabulary import ItemError

def peak_since_reset_kib():
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

def reset_peak():
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)

def rss_kib():
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

codes = {}
reset_peak()
before = rss_kib()
for path in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    try:
        decode_image(path.read_bytes(), 224, 100_000_000)
        codes[path.name] = "ok"
    except ItemError as exc:
        codes[path.name] = exc.code.value
refused = peak_since_reset_kib() - before
# the control, proving the measure: a smaller JPEG bomb (24000 x 24000, decoded at 1/8 scale to
# 3000 x 3000) with the cap lifted does allocate
reset_peak()
before = rss_kib()
try:
    decode_image(pathlib.Path(sys.argv[2]).read_bytes(), 224, 10**10)
except ItemError:
    pass  # it is cut short too; the allocation being measured happens before that is found
control = peak_since_reset_kib() - before
print(json.dumps({"refused_kib": refused, "control_kib": control, "codes": codes}))
"""


def test_bombs_are_refused_from_the_header_before_any_large_allocation(tmp_path: Path) -> None:
    """In a fresh process, whose peak RSS no earlier test has raised: decoding these would take from
    170 MB (the JPEG, even at 1/8 scale) to 12 GB (the GIF); refusing them takes next to nothing."""
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    for name, (data, _) in HOSTILE_FILES.items():
        if name.startswith("bomb."):
            (bombs / name).write_bytes(data)
    control = tmp_path / "control.jpg"
    control.write_bytes(jpeg_claiming(24_000, 24_000))
    result = subprocess.run(
        [sys.executable, "-c", BOMB_PROBE, str(bombs), str(control)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print("bombs:", report)
    assert report["codes"] == dict.fromkeys(sorted(p.name for p in bombs.iterdir()), "too_large")
    assert report["refused_kib"] < 10 * 1024, report
    assert report["control_kib"] > 25 * 1024, report


# gs:// references and the bucket injection, against the real fake-gcs-server


GCS_REFERENCES: list[tuple[str, str]] = [
    ("gs://other-bucket/secret.jpg", "forbidden"),
    # a "bucket" that gcloud-aio would paste into the URL unescaped, to read other-bucket/secret.jpg
    ("gs://other-bucket%2Fo%2Fsecret.jpg%3Falt%3Dmedia%23/x.jpg", "invalid_reference"),
    ("gs://photos?alt=media#/x.jpg", "invalid_reference"),
    ("gs://photos#/album/1/a.jpg", "invalid_reference"),
    ("gs://photos%2F..%2Fother-bucket/secret.jpg", "invalid_reference"),
    ("gs://PHOTOS/album/1/a.jpg", "invalid_reference"),
    ("gs://photos./album/1/a.jpg", "invalid_reference"),
    ("gs://ph\u043etos/album/1/a.jpg", "invalid_reference"),
    ("gs:///album/1/a.jpg", "invalid_reference"),
    ("gs://photos", "invalid_reference"),
    ("gs://photos/album/1/a.jpg\r\nHost: evil", "invalid_reference"),
    ("gs://photos-archive/album/1/a.jpg", "forbidden"),
    # the object name is escaped whole: these are (missing) objects of the allowed bucket
    ("gs://photos/o/other%2Fobj?alt=media#", "not_found"),
    ("gs://photos/../other-bucket/secret.jpg", "not_found"),
    ("../other-bucket/o/secret.jpg", "not_found"),
    ("album%2F1%2Fa.jpg", "not_found"),
    ("album/1/a.jpg?alt=media#", "not_found"),
]


@pytest.fixture(scope="module")
def gcs_service(tiny_weights: Path, fake_gcs: FakeGcs) -> Iterator[Client]:
    settings = Settings(
        model=f"local-dir:{tiny_weights}",
        default_bucket=BUCKET,
        allowed_buckets=(BUCKET,),
        gcs_emulator_host=fake_gcs.url,
        cpu_workers=2,
        download_retries=0,
        on_error=PARTIAL,
    )
    with running(settings) as client:
        yield client


@pytest.mark.parametrize(("item", "code"), GCS_REFERENCES, ids=[repr(i)[:50] for i, _ in GCS_REFERENCES])
def test_a_gcs_reference_that_tries_to_escape_gets_its_code(
    gcs_service: Client, item: str, code: str
) -> None:
    good = (f"gs://{BUCKET}/album/1/a.jpg", "album/1/b.jpg")
    alone = [outcome(embed(gcs_service, [name]))[1][0] for name in good]
    codes, vectors = outcome(embed(gcs_service, [good[0], item, good[1]]))
    assert codes == {0: "ok", 1: code, 2: "ok"}
    np.testing.assert_allclose(vectors[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(vectors[2], alone[1], atol=1e-5)
