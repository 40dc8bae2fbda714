import asyncio
import base64

import pytest

from cliplens.pipeline.references import (
    DECODE_CHUNK_CHARS,
    DataUriReference,
    GcsReference,
    InlineReference,
    LocalReference,
    ReferenceParser,
    RefusedReference,
)
from cliplens.pipeline.sources import ImageSources
from cliplens.vocabulary import ErrorCode, ItemError


def parser(default_bucket: str | None = None, local: bool = True) -> ReferenceParser:
    buckets = frozenset({"photos", "archive"} | ({default_bucket} if default_bucket else set()))
    return ReferenceParser(
        buckets=buckets, default_bucket=default_bucket, has_local_root=local, max_image_bytes=1000
    )


def code_of(item: str, p: ReferenceParser | None = None) -> ErrorCode:
    with pytest.raises(ItemError) as caught:
        (p or parser()).parse(item)
    return caught.value.code


def test_a_bare_name_goes_to_the_local_directory_without_a_default_bucket() -> None:
    assert parser().parse("album/1/a.jpg") == LocalReference("album/1/a.jpg")


def test_a_bare_name_goes_to_the_default_bucket_when_one_is_set() -> None:
    assert parser("photos").parse("album/1/a.jpg") == GcsReference("photos", "album/1/a.jpg")


def test_a_gs_uri_names_bucket_and_object() -> None:
    assert parser().parse("gs://archive/2019/x y.jpg") == GcsReference("archive", "2019/x y.jpg")


def test_a_bucket_outside_the_allowlist_is_forbidden() -> None:
    assert code_of("gs://somebody-else/a.jpg") == ErrorCode.FORBIDDEN


@pytest.mark.parametrize(
    "item",
    [
        "gs://photos",
        "gs://Photos/a.jpg",
        "gs://ph/a.jpg",
        "gs://photos%2Fo%2Fother?alt=media#/x.jpg",
        "gs://photos?alt=media#/x.jpg",
        "gs://photos/",
        "gs://photos/a\nb.jpg",
        "http://example.com/a.jpg",
        "file:///etc/passwd",
        "",
        "a\x00b",
    ],
)
def test_malformed_references_are_invalid(item: str) -> None:
    assert code_of(item) in (ErrorCode.INVALID_REFERENCE, ErrorCode.FORBIDDEN)


def test_a_data_uri_carries_its_bytes() -> None:
    payload = base64.b64encode(b"\xff\xd8\xffrest").decode()
    reference = parser().parse(f"data:image/jpeg;base64,{payload}")
    assert isinstance(reference, InlineReference)
    assert reference.data == b"\xff\xd8\xffrest"
    assert "data:image/jpeg" in str(reference)


def test_a_data_uri_over_the_byte_cap_is_too_large_before_decoding() -> None:
    payload = base64.b64encode(b"x" * 2000).decode()
    assert code_of(f"data:image/png;base64,{payload}") == ErrorCode.TOO_LARGE


@pytest.mark.parametrize("item", ["data:image/png;base64,@@@@", "data:text/html,<b>x</b>", "data:;base64"])
def test_a_broken_data_uri_is_invalid(item: str) -> None:
    assert code_of(item) == ErrorCode.INVALID_REFERENCE


def test_without_any_default_source_a_bare_name_is_invalid() -> None:
    assert code_of("a.jpg", parser(local=False)) == ErrorCode.INVALID_REFERENCE


def test_a_reference_too_long_to_name_any_object_is_refused_by_its_length_first() -> None:
    for item in ("http://" + "a" * 2000, "gs://somebody-else/" + "a" * 2000, "é" * 700):
        with pytest.raises(ItemError) as caught:
            parser().parse(item)
        assert caught.value.code == ErrorCode.INVALID_REFERENCE
        assert "longer than any storage name" in caught.value.message, item[:20]


def test_a_gs_uri_with_the_longest_object_name_is_still_a_reference() -> None:
    name = "é" * 512  # 1,024 bytes of UTF-8: GCS's limit, exactly
    assert parser().parse(f"gs://archive/{name}") == GcsReference("archive", name)
    assert code_of(f"gs://archive/{name}x") == ErrorCode.INVALID_REFERENCE


def big_parser() -> ReferenceParser:
    return ReferenceParser(
        buckets=frozenset(), default_bucket=None, has_local_root=True, max_image_bytes=2**24
    )


def test_a_large_data_uri_is_decoded_by_the_load_stage_not_while_parsing() -> None:
    data = bytes(range(256)) * (3 * DECODE_CHUNK_CHARS // 256)  # 4 chunks of base64
    item = f"data:image/png;base64, {base64.b64encode(data).decode()}\n"
    reference = big_parser().parse(item)
    assert isinstance(reference, DataUriReference)
    assert reference.text is item  # not a copy
    assert str(reference) == f"data:image/png;base64,...({len(data)} bytes)"
    assert reference.decode() == data
    sources = ImageSources(None, None, max_bytes=2**24)
    assert not sources.needs_slot(reference)
    assert asyncio.run(sources.load(reference)).data == data


@pytest.mark.parametrize(
    "payload",
    [
        "QUFB" * DECODE_CHUNK_CHARS + "@",  # outside the alphabet, in the last chunk
        "QUFB" * (DECODE_CHUNK_CHARS // 8) + "é" + "QUFB" * DECODE_CHUNK_CHARS,  # not ASCII
        "QUFB" * (DECODE_CHUNK_CHARS // 4 - 1) + "QQ==" + "QUFB" * 10,  # padding ending a chunk, not the URI
        "QUFB" * DECODE_CHUNK_CHARS + "QUF",  # not a whole number of quanta
    ],
    ids=["alphabet", "non-ascii", "padding-mid-uri", "partial-quantum"],
)
def test_a_large_data_uri_with_broken_base64_is_invalid_when_decoded(payload: str) -> None:
    reference = big_parser().parse(f"data:image/png;base64,{payload}")
    assert isinstance(reference, DataUriReference)
    with pytest.raises(ItemError) as caught:
        reference.decode()
    assert caught.value.code == ErrorCode.INVALID_REFERENCE


def test_a_refused_reference_fails_with_its_error_without_any_io() -> None:
    sources = ImageSources(None, None, max_bytes=10)
    reference = RefusedReference(ErrorCode.TOO_LARGE, "the file is larger than 10 bytes", "big.jpg")
    assert not sources.needs_slot(reference)
    with pytest.raises(ItemError) as caught:
        asyncio.run(sources.load(reference))
    assert (caught.value.code, str(reference)) == (ErrorCode.TOO_LARGE, "big.jpg")
