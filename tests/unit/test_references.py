import base64

import pytest

from cliplens.pipeline.references import GcsReference, InlineReference, LocalReference, ReferenceParser
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
