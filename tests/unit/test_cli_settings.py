"""`cliplens serve` takes every setting as a flag or a variable, from one description of Settings
that its help, its flags and the README's table share."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cliplens.cli import _flagged_settings, build_parser, main
from cliplens.settings import Settings, describe_settings, load_settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_described_with_its_variable_default_and_meaning() -> None:
    described = {setting.field: setting for setting in describe_settings()}
    assert list(described) == [field.name for field in dataclasses.fields(Settings)]
    assert all(setting.meaning for setting in described.values()), [
        name for name, setting in described.items() if not setting.meaning
    ]
    assert described["max_batch"].variable == "CLIPLENS_MAX_BATCH" and described["max_batch"].default == "32"
    assert described["gcs_emulator_host"].variable == "STORAGE_EMULATOR_HOST"
    assert described["gpu_decode"].boolean and not described["max_batch"].boolean
    assert described["api_tokens"].default == "unset"


def test_serve_help_lists_every_setting_as_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for setting in describe_settings():
        assert setting.flag in shown and setting.variable in shown, setting


def test_a_flag_wins_over_its_variable_and_is_parsed_the_same_way() -> None:
    args = build_parser().parse_args(
        ["serve", "--max-batch", "8", "--gpu-decode", "on", "--otlp-protocol", "GRPC"]
    )
    flagged = _flagged_settings(args)
    assert flagged == {
        "CLIPLENS_MAX_BATCH": "8",
        "CLIPLENS_GPU_DECODE": "on",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "GRPC",
    }
    settings = load_settings({"CLIPLENS_MAX_BATCH": "16", "CLIPLENS_MAX_INPUTS": "9"}, flagged)
    assert (settings.max_batch, settings.gpu_decode, settings.otlp_protocol, settings.max_inputs) == (
        8,
        True,
        "grpc",
        9,
    )


@pytest.mark.parametrize("flag", ["--max-batch", "--request-timeout-s", "--download-timeout-s"])
def test_a_zero_or_negative_flag_is_a_one_line_start_up_error(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", flag, "0"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("cliplens: ") and "=" in error, error


def test_the_readme_table_has_every_setting_with_its_default_and_a_meaning() -> None:
    """The meaning column is the README's own wording (shorter, or with links, where `serve --help`
    has the docstring's), so it is held to say something, not to equal the docstring."""
    rows: dict[str, tuple[str, str]] = {}
    for line in README.read_text().splitlines():
        if match := re.match(r"\| `([A-Z0-9_]+)`(?: / `([A-Z0-9_]+)`)? \| (.*?) \| (.*?) \|$", line):
            for variable in match.group(1, 2):
                if variable:
                    rows[variable] = (match.group(3), match.group(4).strip())
    for setting in describe_settings():
        variable = setting.variable
        assert variable in rows, f"README's settings table has no row for {variable}"
        cell, meaning = rows[variable]
        documented = cell if cell == "unset" else re.match(r"`([^`]*)`", cell).group(1)  # type: ignore[union-attr]
        assert documented == setting.default, (variable, cell, setting.default)
        assert len(re.findall(r"[a-z]{2,}", meaning)) >= 3, (
            f"README's row for {variable} says nothing: {meaning!r}"
        )


def test_help_is_fast_because_nothing_heavy_is_imported() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cliplens.cli", "serve", "--help"], capture_output=True, timeout=60
    )
    took = time.monotonic() - started
    assert done.returncode == 0 and b"--max-batch" in done.stdout
    assert took < 3.0, took  # generous: ~0.7 s here; torch alone takes several seconds
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, cliplens.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert imported.stdout.strip() == "False"
