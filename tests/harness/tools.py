"""The external programs the tests run (promtool, prometheus, haproxy, kubectl): found on PATH,
or the test fails with how to install them, instead of an opaque FileNotFoundError."""

from __future__ import annotations

import shutil

import pytest

DEBIAN = "install Debian's `{package}` package (scripts/test does it when run as root)"


def required(program: str, install: str) -> str:
    """The path of `program`; fail the test, saying `install`, when it is not on PATH."""
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"`{program}` is not on PATH: {install}")
    return path


def debian(package: str) -> str:
    """The install hint for a program from one of Debian's packages."""
    return DEBIAN.format(package=package)
