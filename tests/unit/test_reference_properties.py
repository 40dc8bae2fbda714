"""Properties of the reference parser and validators, over generated strings (hypothesis).

The parser is the only gate between a client's string and a storage request, so the properties
are stated from outside: whatever the string, the outcome is a reference or an item error with a
reference code; a GCS reference names an allowed bucket exactly, and the URL gcloud-aio-storage
builds from it (captured from its own code) addresses exactly that bucket and object; bucket and
object names are accepted exactly when GCS's naming rules (re-stated here from the GCS docs)
accept them; a local name never reads anything outside the root.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import ipaddress
import os
import re
import string
from pathlib import Path
from urllib.parse import unquote

import pytest
import yarl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cliplens.pipeline.references import (
    GcsReference,
    InlineReference,
    LocalReference,
    ReferenceParser,
    validate_bucket,
    validate_object_name,
)
from cliplens.pipeline.sources import GcsSource, LocalDirectorySource
from cliplens.vocabulary import ErrorCode, ItemError

ALLOWED = frozenset({"photos", "my.archive.example", "a_b-c"})
CAP = 4096
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
REFERENCE_CODES = {ErrorCode.INVALID_REFERENCE, ErrorCode.FORBIDDEN, ErrorCode.TOO_LARGE}
INJECTION = "gs://photos/o/other%2Fobj?alt=media#/x.jpg"
BUCKET_INJECTION = "photos/o/other%2Fobj?alt=media#"
"""gcloud-aio-storage pastes the bucket into the URL unescaped: this "bucket" reads photos/other/obj."""


def parser(default_bucket: str | None = "photos", local: bool = False) -> ReferenceParser:
    return ReferenceParser(
        buckets=ALLOWED, default_bucket=default_bucket, has_local_root=local, max_image_bytes=CAP
    )


def outcome(item: str, p: ReferenceParser) -> object:
    """The reference, or the ItemError's code; any other exception fails the property."""
    try:
        return p.parse(item)
    except ItemError as exc:
        assert exc.code in REFERENCE_CODES, (item, exc)
        return exc.code


# GCS naming rules, from https://cloud.google.com/storage/docs/buckets#naming and
# https://cloud.google.com/storage/docs/objects#naming


def gcs_accepts_bucket(name: str) -> bool:
    if not re.fullmatch(r"[a-z0-9._-]+", name):
        return False
    if not (name[0].isalnum() and name[-1].isalnum()):
        return False
    components = name.split(".")
    if "." in name:
        if not 3 <= len(name) <= 222 or any(not 1 <= len(c) <= 63 for c in components):
            return False
    elif not 3 <= len(name) <= 63:
        return False
    try:
        ipaddress.IPv4Address(name)
        return False
    except ValueError:
        pass
    return not (name.startswith("goog") or re.search(r"g[o0][o0]gle", name))


def gcs_accepts_object(name: str) -> bool:
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return (
        1 <= size <= 1024
        and "\r" not in name
        and "\n" not in name
        and name not in (".", "..")
        and not name.startswith(".well-known/acme-challenge/")
    )


BUCKET_CHARS = string.ascii_lowercase[:6] + "0123456789" + "._-" + "Ag/%?#:@ "
buckets = st.one_of(
    st.text(alphabet=BUCKET_CHARS, min_size=0, max_size=70),
    st.builds(".".join, st.lists(st.text(alphabet="abc019-", min_size=1, max_size=70), max_size=4)),
    st.sampled_from(
        ["goog-photos", "my-google-photos", "g00gle", "192.168.5.4", "1.2.3", "a" * 63, "a" * 64]
    ),
    st.sampled_from(sorted(ALLOWED)),
    st.just(BUCKET_INJECTION),
)
names = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="ab/.%?#\\\r\n\x00~", max_size=20),
    st.sampled_from([".", "..", ".well-known/acme-challenge/x", "x" * 1025, "é" * 513, "\ud800"]),
)


@given(buckets)
@example(BUCKET_INJECTION)
@settings(max_examples=400)
def test_a_bucket_is_accepted_exactly_when_gcs_would_accept_it(bucket: str) -> None:
    try:
        validate_bucket(bucket)
        accepted = True
    except ItemError as exc:
        assert exc.code == ErrorCode.INVALID_REFERENCE
        accepted = False
    assert accepted == gcs_accepts_bucket(bucket), bucket


@given(names)
@settings(max_examples=300)
def test_an_object_name_is_accepted_only_when_gcs_would_and_never_with_control_characters(name: str) -> None:
    try:
        validate_object_name(name)
        accepted = True
    except ItemError as exc:
        assert exc.code == ErrorCode.INVALID_REFERENCE
        accepted = False
    no_controls = not CONTROL.search(name)
    assert accepted == (gcs_accepts_object(name) and no_controls), repr(name)


class _Captured(Exception):
    pass


class _RecordingSession:
    """Stands in for the aiohttp session: records the URL gcloud-aio built, then stops."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def get(self, url: str, **kwargs: object) -> None:
        self.calls.append((url, kwargs.get("params")))
        raise _Captured


def url_requested_for(reference: GcsReference) -> tuple[yarl.URL, object]:
    session = _RecordingSession()
    source = GcsSource(session, CAP, "http://storage.test:4443", retries=0)  # type: ignore[arg-type]
    with pytest.raises(_Captured):
        asyncio.run(source.load(reference))
    (url, params), *_ = session.calls
    return yarl.URL(url), params  # parsed as aiohttp parses it


@given(st.tuples(buckets, names).map(lambda pair: f"gs://{pair[0]}/{pair[1]}"))
@example(INJECTION)
@example(f"gs://{BUCKET_INJECTION}/x.jpg")
@example("gs://photos%2Fo%2Fother%2Fobj%3Falt%3Dmedia%23/x.jpg")
@settings(max_examples=300, deadline=None)
def test_a_gs_uri_reaches_exactly_its_allowed_bucket_and_object(item: str) -> None:
    result = outcome(item, parser())
    if not isinstance(result, GcsReference):
        return
    bucket, _, name = item[len("gs://") :].partition("/")
    assert (result.bucket, result.name) == (bucket, name)
    assert result.bucket in ALLOWED
    url, params = url_requested_for(result)
    assert (url.scheme, url.host, url.port) == ("http", "storage.test", 4443)
    assert url.raw_parts[:6] == ("/", "storage", "v1", "b", result.bucket, "o")
    assert len(url.raw_parts) == 7 and unquote(url.raw_parts[6]) == result.name
    assert url.query_string == "" and url.fragment == ""
    assert params == {"alt": "media"}


@given(buckets, names)
@example(BUCKET_INJECTION, "x.jpg")
@settings(max_examples=300, deadline=None)
def test_the_gcs_source_refuses_a_reference_built_elsewhere_that_would_change_the_url(
    bucket: str, name: str
) -> None:
    reference = GcsReference(bucket, name)
    try:
        url, _ = url_requested_for(reference)
    except ItemError as exc:
        assert exc.code == ErrorCode.INVALID_REFERENCE
        assert not (gcs_accepts_bucket(bucket) and gcs_accepts_object(name) and not CONTROL.search(name))
        return
    assert url.raw_parts[:6] == ("/", "storage", "v1", "b", bucket, "o")
    assert len(url.raw_parts) == 7 and unquote(url.raw_parts[6]) == name
    assert url.query_string == "" and url.fragment == ""


@given(names)
@example("../other-bucket/o/secret.jpg")
@example("o/other%2Fobj?alt=media#")
@example("HTTP://")
@settings(max_examples=300, deadline=None)
def test_a_bare_name_is_an_object_of_the_default_bucket_whatever_it_contains(name: str) -> None:
    result = outcome(name, parser())
    if isinstance(result, ErrorCode):
        # http(s) URLs are refused as such when the service has no URL hosts; the rest is invalid
        is_url = name[:8].lower().startswith(("http://", "https://"))
        assert result == (ErrorCode.FORBIDDEN if is_url else ErrorCode.INVALID_REFERENCE)
        return
    if isinstance(result, InlineReference):  # the name happened to be a data: URI
        return
    assert isinstance(result, GcsReference) and result.bucket == "photos"
    url, _ = url_requested_for(result)
    assert url.raw_parts[:5] == ("/", "storage", "v1", "b", "photos")
    assert len(url.raw_parts) == 7 and unquote(url.raw_parts[6]) == name
    assert url.query_string == "" and url.fragment == ""


@given(st.text(max_size=80))
@example(INJECTION)
@example("HTTP://169.254.169.254/computeMetadata/v1/")
@example("Gs://photos/a.jpg")
@example("data:image/png;base64,////")
@settings(max_examples=400)
def test_any_string_parses_to_a_reference_or_a_reference_error(item: str) -> None:
    for p in (parser(), parser(default_bucket=None, local=True), parser(default_bucket=None)):
        result = outcome(item, p)
        if isinstance(result, GcsReference):
            assert result.bucket in ALLOWED
        if isinstance(result, LocalReference):
            validate_object_name(result.name)
        if isinstance(result, (GcsReference, LocalReference)):
            assert not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", item) or item[:5].lower() == "gs://"


@given(st.binary(max_size=2 * CAP), st.sampled_from(["image/png", "image/jpeg", "", "IMAGE/WEBP;x=1"]))
@settings(max_examples=200)
def test_a_data_uri_carries_its_exact_bytes_up_to_the_cap(data: bytes, media_type: str) -> None:
    item = f"data:{media_type};base64,{base64.b64encode(data).decode()}"
    result = outcome(item, parser())
    if len(data) > CAP:
        assert result == ErrorCode.TOO_LARGE
    else:
        assert isinstance(result, InlineReference) and result.data == data


# the local directory: nothing outside the root is ever read


@pytest.fixture(scope="module")
def local_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalDirectorySource, dict[str, bytes]]:
    base = tmp_path_factory.mktemp("local-properties")
    root = base / "root"
    (root / "a/b").mkdir(parents=True)
    inside = {"a/b/c.jpg": b"inside-1", "a/x.jpg": b"inside-2", "top.jpg": b"inside-3"}
    for name, data in inside.items():
        (root / name).write_bytes(data)
    (base / "secret.jpg").write_bytes(b"SECRET")
    (base / "secret-dir").mkdir()
    (base / "secret-dir/s.jpg").write_bytes(b"SECRET")
    (root / "out.jpg").symlink_to(base / "secret.jpg")
    (root / "a/up.jpg").symlink_to("../../secret.jpg")
    (root / "a/outdir").symlink_to(base / "secret-dir")
    (root / "loop").symlink_to("loop")
    (root / "a/in.jpg").symlink_to("x.jpg")
    os.mkfifo(root / "fifo")
    return LocalDirectorySource(root, max_bytes=CAP), inside


def read_within(source: LocalDirectorySource, name: str, timeout_s: float) -> bytes:
    """source.load(name)'s bytes, failing (not hanging) if it blocks: opening a FIFO for reading would."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(source.load, name)
        try:
            return future.result(timeout_s).data
        except concurrent.futures.TimeoutError:
            with contextlib.suppress(OSError):  # give the blocked reader its writer, and EOF
                os.close(os.open(source.root / "fifo", os.O_WRONLY | os.O_NONBLOCK))
            raise AssertionError(f"reading {name!r} blocked") from None


PIECES = ["..", ".", "a", "b", "c.jpg", "x.jpg", "top.jpg", "out.jpg", "up.jpg", "outdir", "s.jpg"]
PIECES += ["loop", "in.jpg", "fifo", "", "\\", "\x00", "%2e%2e", "~", "/", "secret.jpg", "x" * 300]
local_names = st.one_of(
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("/".join),
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("".join),
    st.text(max_size=30),
)


@given(local_names)
@example("../secret.jpg")
@example("a/outdir/s.jpg")
@example("a/b/c.jpg/x")
@example("fifo")
@example("loop")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_local_name_reads_a_regular_file_inside_the_root_or_fails_with_a_reference_code(
    local_root: tuple[LocalDirectorySource, dict[str, bytes]], name: str
) -> None:
    source, inside = local_root
    try:
        data = read_within(source, name, timeout_s=5.0)
    except ItemError as exc:
        assert exc.code in {ErrorCode.NOT_FOUND, ErrorCode.FORBIDDEN, ErrorCode.INVALID_REFERENCE}, (
            name,
            exc,
        )
        return
    assert data in inside.values(), name
    assert Path(os.path.realpath(source.root / name)).is_relative_to(source.root)
