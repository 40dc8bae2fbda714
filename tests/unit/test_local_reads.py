"""Reading a file of the image directory: exactly its bytes, the cap held, and a file that grows
while it is read (between the stat and the read) read whole, not cut at the size stat'ed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cliplens.pipeline.sources import LocalDirectorySource
from cliplens.vocabulary import ErrorCode, ItemError


def _stat_saying(size: int, real: object) -> object:
    """os.fstat as it was before the file grew to its present size."""

    def fstat(fd: int) -> os.stat_result:
        status = real(fd)  # type: ignore[operator]
        fields = list(status)
        fields[6] = size  # st_size
        return os.stat_result(fields)

    return fstat


def test_a_file_is_read_exactly(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "a.jpg").write_bytes(data)
    assert LocalDirectorySource(tmp_path, max_bytes=1_000_000).load("a.jpg").data == data


def test_a_file_over_the_cap_is_too_large(tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(bytes(1001))
    with pytest.raises(ItemError) as refused:
        LocalDirectorySource(tmp_path, max_bytes=1000).load("big.jpg")
    assert refused.value.code is ErrorCode.TOO_LARGE


def test_a_file_that_grew_after_its_stat_is_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(200_000)
    (tmp_path / "growing.jpg").write_bytes(data)
    monkeypatch.setattr(os, "fstat", _stat_saying(1_000, os.fstat))
    assert LocalDirectorySource(tmp_path, max_bytes=1_000_000).load("growing.jpg").data == data


def test_a_file_that_grew_past_the_cap_after_its_stat_is_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "growing.jpg").write_bytes(bytes(5_000))
    monkeypatch.setattr(os, "fstat", _stat_saying(1_000, os.fstat))
    with pytest.raises(ItemError) as refused:
        LocalDirectorySource(tmp_path, max_bytes=4_000).load("growing.jpg")
    assert refused.value.code is ErrorCode.TOO_LARGE
