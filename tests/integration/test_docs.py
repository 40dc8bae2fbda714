"""The documentation is tested: every fenced block of README.md and docs/*.md carries a marker, and
every block marked `run` is executed here, against a real served app.

A marker is an HTML comment on the line right before a block's opening fence (GitHub does not show it):

    <!-- doc-test: run -->
    ```sh
    curl -s localhost:8000/v1/models
    ```

The markers:

    run               executed here (how, below)
    serve             starts the service and does not return: started once, in the background, as the
                      service every `run` block calls; it must answer /readyz, and exit 0 on SIGTERM
    ci                the repository's own entry points (`./scripts/NAME`), run by CI itself: `.ci/run`
                      runs `./scripts/test`; any other script sources the same bootstrap, and its final
                      `cliplens SUBCOMMAND` is run, at a small size, by a test. Not rerun here (the
                      suite would run itself)
    text              not a command: a response or a table shown, a schema, a layout, arithmetic
    tested-small      `cliplens` commands too slow to run here as written (a full study takes minutes on
                      two cores), which a test runs at a small size: each is accepted by the real
                      parser, and some test file under tests/ runs `cliplens.cli` with its
                      subcommand, its variables, every option it gives and every choice it makes
                      (they are string literals of that file: tests/integration/test_experiment.py
                      runs the studies and `--compare`, tests/integration/test_server.py the demo)
    needs-cloud       real Google Cloud credentials (a `gs://` bucket, `--storage gcs`, a key file)
    needs-docker      a Docker daemon (`docker compose`)
    needs-kubernetes  a cluster (`kubectl apply`)
    needs-gpu         a CUDA device
    needs-locust      locust, which is neither a dependency of cliplens nor of its tests
    TODO              undecided: always a failure

A block without a marker, with an unknown one, or a marker with no block under it fails, naming the
file and line. Every command of a `needs-*` block must name what its marker needs (`gs://`,
`docker`, `kubectl`, ...), so that a runnable command cannot hide under one; the one exception is a
`cliplens serve ... &` in the background, the service the block's other commands call. The
`cliplens` commands of every shell block, whatever its marker, and every inline code span of the
prose that is a `cliplens` command (`CLIPLENS_MAX_BATCH=16 cliplens experiment`), must be accepted
by the real argument parser (`cliplens.cli.build_parser`), every option spelled out in full.

How a `run` block runs, by language:

- sh: `bash -e`, in a throwaway copy of the checkout (its tracked and not-ignored files, so that a
  command that writes, like the dashboard generator, cannot touch the checkout), with the test's
  virtual environment first on PATH and linked as `.venv`, generated photos under the demo's names
  (photo-0000-12mp.jpg, ..., at a small size) in `cliplens-demo/photos` and in `srv/photos/album`
  (the docs' `/srv/photos`, the reader's own folder), a fake-gcs-server holding bucket `photos`
  (album/...) for a block that names the emulator, and the tiny random CLIP as CLIPLENS_MODEL /
  CLIPLENS_PRETRAINED=none (the docs' default weights would be a download; the `serve` block gets
  neither, and serves ViT-B-32 with the random weights it asks for). A block that starts its own
  `cliplens serve ... &` talks to that one, on its own free port; any other block that calls the
  served app must get only 2xx answers from it (its own /metrics, before and after), with at least
  one image embedded. An HTTP status a block prints (`curl -D -`) must be 2xx; a `cliplens
  experiment` must write its LABEL.json with every item answered; `--compare` must name both runs
  and every setting the block changed for one of them.
- python: executed in this process with the real `openai` package; every embeddings response it
  leaves must hold vectors of the served model's dimension.
- promql: parsed by promtool (as a recording rule), and found verbatim in a file under deploy/ or
  observability/: the docs quote a query that is configured there.

A block that prints JSON and is followed by a `text` block in `json` shows its output there: the
printed JSON must match it (same keys; strings, integers and booleans equal; floats only floats;
`...` stands for anything, or for more list items).

The only changes made to a block's text are the REWRITES below, each with why; each must still match
some `run` block (a rewrite must not outlive the text it was written for).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types import CreateEmbeddingResponse
from prometheus_client.parser import text_string_to_metric_families

from cliplens.cli import build_parser
from cliplens.experiment.corpus import encode_jpeg, plan, render_photo
from cliplens.experiment.inprocess import free_port
from cliplens.experiment.processes import stop_process, wait_until_answering
from cliplens.settings import describe_settings
from tests.harness.servers import FakeGcs, child_environment
from tests.harness.tools import debian, required

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 180

NEEDS = {
    "needs-cloud": ("gs://", "--storage gcs", "GOOGLE_APPLICATION_CREDENTIALS"),
    "needs-docker": ("docker",),
    "needs-kubernetes": ("kubectl",),
    "needs-gpu": ("cuda", "gpu", "nvidia"),
    "needs-locust": ("locust",),
}
TESTED_SMALL = "tested-small"
MARKERS = frozenset({"run", "serve", "ci", "text", TESTED_SMALL, *NEEDS})
SHELL_LANGUAGES = ("sh", "bash", "shell")
RUN_LANGUAGES = (*SHELL_LANGUAGES, "python", "promql")

MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<marker>\S+?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    """One fenced block of a document, with the marker on the line before it (if any)."""

    document: Path
    line: int
    """1-based line of the opening fence."""
    language: str
    text: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def parse(document: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown file, and what is wrong with its markers."""
    lines = document.read_text(encoding="utf-8").splitlines()
    name = document.relative_to(ROOT)
    blocks: list[Block] = []
    problems: list[str] = []
    number = 0
    while number < len(lines):
        marker = MARKER.match(lines[number])
        opening = FENCE.match(lines[number])
        if marker and not (number + 1 < len(lines) and FENCE.match(lines[number + 1])):
            problems.append(f"{name}:{number + 1}: marker {marker['marker']!r} with no fenced block under it")
        if not opening:
            number += 1
            continue
        above = MARKER.match(lines[number - 1]) if number > 0 else None
        fence = opening["fence"]
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = number + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        if end == len(lines):
            problems.append(f"{name}:{number + 1}: the block is never closed")
        body = [line.removeprefix(opening["indent"]) for line in lines[number + 1 : end]]
        blocks.append(
            Block(
                document,
                number + 1,
                opening["info"].strip().split(" ")[0],
                "\n".join(body) + "\n",
                above["marker"] if above else None,
            )
        )
        number = end + 1
    return blocks, problems


def all_blocks() -> list[Block]:
    return [block for document in documents() for block in parse(document)[0]]


def following(block: Block) -> Block | None:
    """The next block of the same document."""
    blocks = parse(block.document)[0]
    later = [other for other in blocks if other.line > block.line]
    return later[0] if later else None


# ---------------------------------------------------------------------------------------------
# Shell commands, as words


@dataclass(frozen=True)
class Command:
    """One simple command of a shell block: its variable assignments and its words."""

    environment: dict[str, str]
    words: list[str]
    background: bool = False
    """Ended by `&`."""

    def __str__(self) -> str:
        return " ".join([*(f"{name}={value}" for name, value in self.environment.items()), *self.words])


ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
OPERATORS = frozenset({"|", "||", "&", "&&", ";", ";;", "(", ")", "|&"})


def commands(script: str) -> list[Command]:
    """The simple commands of a script, line by line (continuations joined, comments dropped).

    Enough for the documentation's commands; a line shlex cannot split (a shell construct) is
    skipped, so a `cliplens` command must stay on lines of its own."""
    found: list[Command] = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:
            continue
        current: list[str] = []
        for token in [*tokens, ";"]:
            if token not in OPERATORS:
                current.append(token)
                continue
            leading = next((n for n, word in enumerate(current) if not ASSIGNMENT.match(word)), len(current))
            assignments, words = current[:leading], current[leading:]
            if words:
                environment = dict(word.split("=", 1) for word in assignments)
                found.append(Command(environment, words, background=token == "&"))
            current = []
    return found


def cliplens_commands(script: str) -> list[Command]:
    return [command for command in commands(script) if Path(command.words[0]).name == "cliplens"]


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser | None = action.choices.get(name)
            return found
    return None


def refusal(
    parser: argparse.ArgumentParser, args: list[str], capsys: pytest.CaptureFixture[str]
) -> str | None:
    """Why the parser refuses `args`, or None when it takes them (`--help` and `--version` too)."""
    try:
        parser.parse_args(args)
    except SystemExit as exited:
        error = capsys.readouterr().err.strip()
        return None if exited.code == 0 else error or f"exit status {exited.code}"
    return None


def strict_parser() -> argparse.ArgumentParser:
    """cliplens's own parser, refusing abbreviated options: the docs spell each option out (an
    abbreviation breaks as soon as a new option shares its prefix)."""
    parser = build_parser()
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += action.choices.values()
    for each in parsers:
        each.allow_abbrev = False
    return parser


# ---------------------------------------------------------------------------------------------
# What is changed in a block before it runs


@dataclass(frozen=True)
class Rewrite:
    name: str
    pattern: re.Pattern[str]
    template: str | Callable[[str], str]
    """str.format'ed with the match's named groups and the run's context (port, prometheus_port,
    emulator_port, photo_root); or a function of the matched `command`."""
    why: str

    def apply(self, text: str, context: dict[str, object]) -> tuple[str, int]:
        def replace(match: re.Match[str]) -> str:
            if callable(self.template):
                return self.template(match["command"])
            return self.template.format(**match.groupdict(), **context)

        return self.pattern.subn(replace, text)


SMALL_STUDY = (("--photos", "2 --mix 640x480=1"), ("--scenario", "1"), ("--warmup", "0"), ("--no-figure", ""))
"""Options appended to a study the block runs, each unless the block gives it."""


def smaller(command: str) -> str:
    words = command.split()
    added = [f"{option} {value}".strip() for option, value in SMALL_STUDY if option not in words]
    return " ".join([command, *added])


def one_line(command: str) -> re.Pattern[str]:
    """A whole line holding `command` (a regex, captured as `command`), its comment dropped."""
    return re.compile(rf"^(?P<command>[^#\n]*{command}[^#\n]*?)[ \t]*(?:#[^\n]*)?$", re.MULTILINE)


REWRITES = (
    Rewrite(
        "port",
        re.compile(r"(?:(?<=localhost:)|(?<=127\.0\.0\.1:)|(?<=--port ))8000\b"),
        "{port}",
        "the served app (or the one a block starts itself) listens on a free port, not on 8000",
    ),
    Rewrite(
        "pause",
        re.compile(r"\bsleep \d+(?:\.\d+)?\b"),
        "sleep 0",
        "a pause for a person watching the dashboard; nobody watches here",
    ),
    Rewrite(
        "study size",
        one_line(r"\bcliplens (?:experiment|demo)\b(?:(?!--compare)[^#\n])*"),
        smaller,
        "the study at full size takes minutes; these options, where the block does not give them, "
        "only make it smaller (two 640x480 photos, one one-image scenario, no warm-up, no figure)",
    ),
    Rewrite(
        "background service",
        re.compile(r"^(?P<command>[^#\n]*\bcliplens serve\b[^#\n&]*?)[ \t]*&[ \t]*(?:#[^\n]*)?$", re.M),
        "{command} >serve.log 2>&1 &\ndoc_ready http://127.0.0.1:{port}/readyz serve.log",
        "a reader waits for the service started in the background to be ready before calling it",
    ),
    Rewrite(
        "prometheus",
        re.compile(r"^(?P<command>prometheus [^#\n]*?)[ \t]*(?:#[^\n]*)?$", re.MULTILINE),
        "{command} --web.listen-address=127.0.0.1:{prometheus_port} --storage.tsdb.path=prometheus-data"
        " >prometheus.log 2>&1 &\ndoc_ready http://127.0.0.1:{prometheus_port}/-/ready prometheus.log",
        "Prometheus serves until stopped: it is started in the background on a free port, must "
        "become ready, and is stopped when the block ends",
    ),
    Rewrite(
        "photo folder",
        re.compile(r"/srv/photos\b"),
        "{photo_root}",
        "the reader's own photo folder: generated photos here, in album/",
    ),
    Rewrite(
        "emulator",
        re.compile(r"(?:(?<=localhost:)|(?<=127\.0\.0\.1:))4443\b"),
        "{emulator_port}",
        "fake-gcs-server (the compose stack's listens on 4443) on a free port, with bucket `photos` "
        "holding generated photos under album/",
    ),
)
PORT, EMULATOR = REWRITES[0], REWRITES[-1]
STATIC_CONTEXT: dict[str, object] = {"port": 1, "prometheus_port": 2, "emulator_port": 3, "photo_root": "/p"}


def rewritten(block: Block, context: dict[str, object]) -> tuple[str, dict[str, int]]:
    text = block.text
    used: dict[str, int] = {}
    for rewrite in REWRITES:
        text, used[rewrite.name] = rewrite.apply(text, context)
    return text, used


# ---------------------------------------------------------------------------------------------
# The place the blocks run, and the served app


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout's tracked and not-ignored files, the venv as `.venv`, and photos."""
    root = tmp_path_factory.mktemp("docs-checkout")
    listing = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    )
    for name in listing.stdout.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            target.chmod(source.stat().st_mode)
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent)
    photos = root / "cliplens-demo" / "photos"
    photos.mkdir(parents=True)
    for index, size_class in enumerate(plan(8)):
        (photos / f"photo-{index:04d}-{size_class}.jpg").write_bytes(small_photo(index))
    album = root / "srv" / "photos" / "album"
    album.mkdir(parents=True)
    for index in range(ALBUM):
        (album / f"photo-{index}.jpg").write_bytes(small_photo(index))
    return root


ALBUM = 3
"""Photos in the album of the reader's folder and of the emulator's bucket."""


def small_photo(seed: int) -> bytes:
    return encode_jpeg(render_photo(seed, 640, 480))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcs]:
    """fake-gcs-server with bucket `photos` holding album/photo-N.jpg."""
    server = FakeGcs(tmp_path_factory.mktemp("docs-gcs") / "fake-gcs.log").start()
    try:
        server.create_bucket("photos")
        for index in range(ALBUM):
            server.upload("photos", f"album/photo-{index}.jpg", small_photo(index))
        yield server
    finally:
        server.stop()


def path_with_venv() -> str:
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@dataclass
class Served:
    """The service the `serve` block started."""

    block: Block
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def counts(self) -> dict[str, float]:
        """Answers by status class (the API's own HTTP metric) and images embedded, from /metrics."""
        totals = {"2xx": 0.0, "other": 0.0, "images_ok": 0.0}
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "http_server_request_duration_seconds_count":
                    status = sample.labels["http_response_status_code"]
                    totals["2xx" if status.startswith("2") else "other"] += sample.value
                elif sample.name == "cliplens_images_total" and sample.labels.get("outcome") == "ok":
                    totals["images_ok"] += sample.value
        return totals

    def model(self) -> dict[str, Any]:
        models: dict[str, Any] = httpx.get(f"{self.url}/v1/models", timeout=10).json()
        assert len(models["data"]) == 1, models
        card: dict[str, Any] = models["data"][0]
        return card


@pytest.fixture(scope="module")
def served(workdir: Path) -> Iterator[Served]:
    """The documentation's one `serve` block, run in the background with its port rewritten."""
    blocks = [block for block in all_blocks() if block.marker == "serve"]
    assert len(blocks) == 1, f"one `serve` block is needed, found: {[b.where for b in blocks]}"
    block = blocks[0]
    port = free_port()
    script, used = rewritten(block, {**STATIC_CONTEXT, "port": port})
    assert used[PORT.name], f"{block.where}: the `serve` block must listen on 8000 (`--port 8000`)"
    log = workdir / f"serve-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["bash", "-ec", script],
            cwd=workdir,
            env=child_environment(PATH=path_with_venv()),
            stdout=sink,
            stderr=sink,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        problem = wait_until_answering(f"{url}/readyz", process, 180)
        assert problem is None, f"{block.where}: {problem}: {log.read_text()[-3000:]}"
        yield Served(block, url, port, process, log)
    finally:
        status = stop_process(process, 30)
    assert status == 0, f"{block.where}: exit status {status} after SIGTERM: {log.read_text()[-3000:]}"


# ---------------------------------------------------------------------------------------------
# Every block is accounted for


def test_every_fenced_block_has_a_known_marker() -> None:
    problems: list[str] = []
    blocks: list[Block] = []
    for document in documents():
        found, wrong = parse(document)
        blocks += found
        problems += wrong
    assert len(blocks) >= 20, "the documents' blocks were not found"
    for block in blocks:
        if block.marker is None:
            problems.append(f"{block.where}: no `<!-- doc-test: ... -->` marker on the line before the block")
        elif block.marker == "TODO":
            problems.append(f"{block.where}: marked TODO: run it here, or say what it needs")
        elif block.marker not in MARKERS:
            problems.append(f"{block.where}: unknown marker {block.marker!r} (known: {sorted(MARKERS)})")
        elif block.marker == "run" and block.language not in RUN_LANGUAGES:
            problems.append(f"{block.where}: `run` needs a language this test runs {RUN_LANGUAGES}")
        elif block.marker == "text" and block.language in (*SHELL_LANGUAGES, "python"):
            problems.append(f"{block.where}: a {block.language} block is a command, not `text`")
        elif block.marker in NEEDS and not any(
            needed.lower() in block.text.lower() for needed in NEEDS[block.marker]
        ):
            problems.append(f"{block.where}: marked {block.marker} but names none of {NEEDS[block.marker]}")
    serving = [block.where for block in blocks if block.marker == "serve"]
    if len(serving) != 1:
        problems.append(f"exactly one `serve` block is needed (the app the `run` blocks call): {serving}")
    assert not problems, "\n".join(problems)


def test_every_command_of_a_needs_block_needs_what_it_says() -> None:
    """A command that could run here must not ride along in a block that cannot."""
    problems: list[str] = []
    checked = 0
    for block in all_blocks():
        if block.marker not in NEEDS:
            continue
        needed = NEEDS[block.marker]
        for command in commands(block.text):
            checked += 1
            if command.background and cliplens_commands(" ".join(command.words)):
                continue  # the service the block's other commands call
            if not any(need.lower() in str(command).lower() for need in needed):
                problems.append(
                    f"{block.where}: `{command}` needs none of {needed}: give it a block of its own "
                    f"(`run`, or `{TESTED_SMALL}` if a test runs it at a small size)"
                )
    assert checked >= 8, "the documents' needs-* commands were not found"
    assert not problems, "\n".join(problems)


def test_every_cliplens_command_in_the_docs_is_accepted_by_the_real_parser(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = strict_parser()
    refused: list[str] = []
    checked = 0
    for block in all_blocks():
        if block.language not in SHELL_LANGUAGES:
            continue
        for command in cliplens_commands(block.text):
            checked += 1
            problem = refusal(parser, command.words[1:], capsys)
            if problem:
                refused.append(f"{block.where}: {command}: {problem}")
    assert checked >= 10, "the documents' cliplens commands were not found"
    assert not refused, "\n".join(refused)


CODE_SPAN = re.compile(r"(?<!`)`(?P<code>[^`]+)`(?!`)")
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*|<[^<>]+>)$")


def prose(document: Path) -> str:
    """The document with its fenced blocks blanked out (line by line, so line numbers still hold)."""
    lines = document.read_text(encoding="utf-8").splitlines()
    fence: str | None = None
    for number, line in enumerate(lines):
        opening = FENCE.match(line)
        if fence is None and not opening:
            continue
        if fence is None and opening:
            fence = opening["fence"]
        elif fence is not None and re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", line):
            fence = None
        lines[number] = ""
    return "\n".join(lines)


def inline_commands(document: Path) -> list[tuple[str, Command]]:
    """The inline code spans of the prose that are a `cliplens` command (after any VAR=value), with
    where each is: an ellipsis is not a command; a placeholder word (N, DIR, <path>) is read as 1."""
    text = prose(document)
    found: list[tuple[str, Command]] = []
    for span in CODE_SPAN.finditer(text):
        code = span["code"]
        if "\n\n" in code or "…" in code or "..." in code:
            continue
        first = next(iter(commands(" ".join(code.split()))), None)
        if first is None or Path(first.words[0]).name != "cliplens" or len(first.words) < 2:
            continue
        words = ["1" if PLACEHOLDER.match(word) else word for word in first.words]
        where = f"{document.relative_to(ROOT)}:{text.count(chr(10), 0, span.start()) + 1}"
        found.append((where, Command(first.environment, words)))
    return found


def test_every_inline_cliplens_command_is_accepted_by_the_real_parser(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = strict_parser()
    variables = {variable for setting in describe_settings() for variable in setting.variables}
    found = [each for document in documents() for each in inline_commands(document)]
    refused = [
        f"{where}: `{command}`: {problem}"
        for where, command in found
        if (problem := refusal(parser, command.words[1:], capsys))
    ]
    refused += [
        f"{where}: `{command}`: {name} is no setting"
        for where, command in found
        for name in command.environment
        if name not in variables
    ]
    assert len(found) >= 10, "the documents' inline cliplens commands were not found"
    assert not refused, "\n".join(refused)


def string_literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def spelled(parser: argparse.ArgumentParser, command: Command) -> set[str]:
    """What a test that runs `command` spells out: its subcommand, variables, options and choices."""
    arguments = command.words[1:]
    wanted = {*arguments[:1], *command.environment}
    chosen = subparser(parser, arguments[0]) if arguments else None
    options = {name: action for action in (chosen or parser)._actions for name in action.option_strings}
    for word, after in zip(arguments, [*arguments[1:], ""], strict=True):
        if not word.startswith("--"):
            continue
        option, equals, value = word.partition("=")
        wanted.add(option)
        action = options.get(option)
        if action is not None and action.choices:
            wanted.add(value if equals else after)
    return wanted


def test_tested_small_commands_are_run_by_a_test() -> None:
    parser = strict_parser()
    literals = {
        path.relative_to(ROOT): string_literals(path)
        for path in (ROOT / "tests").rglob("*.py")
        if path != Path(__file__).resolve()
    }
    problems: list[str] = []
    blocks = [block for block in all_blocks() if block.marker == TESTED_SMALL]
    assert blocks, f"no `{TESTED_SMALL}` block found"
    for block in blocks:
        found = commands(block.text)
        if not found:
            problems.append(f"{block.where}: no command")
        for command in found:
            if command.background or Path(command.words[0]).name != "cliplens":
                problems.append(f"{block.where}: `{command}` is not a cliplens command in the foreground")
                continue
            wanted = {"cliplens.cli", *spelled(parser, command)}
            if not any(wanted <= strings for strings in literals.values()):
                best = max(literals, key=lambda path: len(wanted & literals[path]))
                problems.append(
                    f"{block.where}: no test runs `{command}`; the closest, {best}, never spells "
                    f"{sorted(wanted - literals[best])}"
                )
    assert not problems, "\n".join(problems)


def test_ci_blocks_are_what_ci_runs(capsys: pytest.CaptureFixture[str]) -> None:
    ci_run = (ROOT / ".ci" / "run").read_text()
    tests = "\n".join(
        path.read_text() for path in (ROOT / "tests").rglob("*.py") if path != Path(__file__).resolve()
    )
    blocks = [block for block in all_blocks() if block.marker == "ci"]
    assert blocks
    for block in blocks:
        for command in commands(block.text):
            script = command.words[0]
            assert re.fullmatch(r"\./scripts/[\w-]+", script), (
                f"{block.where}: {script} is not ./scripts/NAME"
            )
            path = ROOT / script
            assert path.is_file() and os.access(path, os.X_OK), f"{block.where}: {script} is not executable"
            if re.search(rf"^exec {re.escape(script)}\b", ci_run, re.MULTILINE):
                continue
            body = path.read_text()
            assert "/bootstrap" in body, f"{block.where}: {script} does not use the bootstrap CI runs"
            final = re.search(r'^exec "\$VENV/bin/cliplens" (.*)$', body, re.MULTILINE)
            assert final, f"{block.where}: {script} is not run by .ci/run and does not exec `cliplens`"
            arguments = [word for word in shlex.split(final[1]) if word != "$@"]
            problem = refusal(strict_parser(), arguments, capsys)
            assert problem is None, f"{block.where}: {script}: cliplens {final[1]}: {problem}"
            subcommand = arguments[0]
            run_by_a_test = f'"cliplens.cli", "{subcommand}"' in tests
            assert run_by_a_test, f"{block.where}: {script} runs `cliplens {subcommand}`, which no test runs"


def test_every_rewrite_is_still_needed() -> None:
    used = dict.fromkeys((rewrite.name for rewrite in REWRITES), 0)
    for block in all_blocks():
        if block.marker in ("run", "serve"):
            for name, count in rewritten(block, STATIC_CONTEXT)[1].items():
                used[name] += count
    assert all(used.values()), (
        f"rewrites that match no block any more: {[n for n, c in used.items() if not c]}"
    )


# ---------------------------------------------------------------------------------------------
# The blocks run


@pytest.mark.slow
def test_the_serve_block_serves(served: Served) -> None:
    assert served.process.poll() is None
    assert httpx.get(f"{served.url}/readyz", timeout=10).status_code == 200
    assert served.model()["dimension"] > 0


def run_blocks() -> list[Block]:
    return [block for block in all_blocks() if block.marker == "run"]


@pytest.mark.slow
@pytest.mark.parametrize("block", run_blocks(), ids=lambda block: block.where)
def test_run_block(block: Block, request: pytest.FixtureRequest, workdir: Path, tiny_model: str) -> None:
    starts_its_own = any(command.words[1:2] == ["serve"] for command in cliplens_commands(block.text))
    calls_the_app = bool(PORT.pattern.search(block.text)) and not starts_its_own
    app: Served | None = request.getfixturevalue("served") if calls_the_app else None
    gcs: FakeGcs | None = request.getfixturevalue("emulator") if EMULATOR.pattern.search(block.text) else None
    context: dict[str, object] = {
        "port": app.port if app else free_port(),
        "prometheus_port": free_port(),
        "emulator_port": gcs.port if gcs else 0,
        "photo_root": workdir / "srv" / "photos",
    }
    text, _ = rewritten(block, context)
    before = app.counts() if app else None
    if block.language in SHELL_LANGUAGES:
        output = run_shell(block, text, workdir, tiny_model)
        for status in re.findall(r"^HTTP/[\d.]+ (\d{3})", output, re.MULTILINE):
            assert status.startswith("2"), f"{block.where}: the block printed an HTTP {status}"
        check_experiments(block, text, output, workdir)
    elif block.language == "python":
        assert app is not None, f"{block.where}: a python block is run against the served app"
        output = ""
        run_python(block, text, app)
    else:
        output = ""
        check_promql(block, text, workdir)
    if app is not None and before is not None:
        after = app.counts()
        assert after["other"] == before["other"], f"{block.where}: the served app answered non-2xx"
        assert after["2xx"] > before["2xx"], f"{block.where}: the served app got no request"
        assert after["images_ok"] > before["images_ok"], f"{block.where}: no image was embedded"
    shown = following(block)
    if shown is not None and shown.marker == "text" and shown.language == "json":
        printed = last_json(output)
        assert printed is not None, f"{block.where}: {shown.where} shows JSON, the block printed none"
        problems = mismatches(documented_json(shown), printed, "$")
        assert not problems, f"{shown.where} is not what {block.where} printed:\n" + "\n".join(problems)


PRELUDE = """\
doc_ready() {  # URL LOG: wait until URL answers 200, else show the end of LOG and fail
  for _ in $(seq 600); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  tail -n 40 "$2" >&2; return 1
}
doc_stop() {  # on exit: stop what the block left in the background, keep the block's status
  status=$?; running=$(jobs -p); [ -z "$running" ] || kill $running 2>/dev/null || true; wait; exit $status
}
trap doc_stop EXIT
"""
TOOLS = {"curl": debian("curl"), "promtool": debian("prometheus"), "prometheus": debian("prometheus")}


def run_shell(block: Block, script: str, workdir: Path, tiny_model: str) -> str:
    for program, install in TOOLS.items():
        if re.search(rf"(?:^|[\s|;&(]){program}\s", script, re.MULTILINE):
            required(program, install)
    environment = child_environment(
        PATH=path_with_venv(), CLIPLENS_MODEL=tiny_model, CLIPLENS_PRETRAINED="none"
    )
    process = subprocess.Popen(
        ["bash", "-ec", PRELUDE + script],
        cwd=workdir,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{block.where}: still running after {RUN_TIMEOUT_S} s\n{script}\n{stderr[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, (
        f"{block.where}: exit status {process.returncode}\n--- ran:\n{script}\n--- stdout:\n"
        f"{stdout[-3000:]}\n--- stderr:\n{stderr[-3000:]}"
    )
    return stdout


def check_experiments(block: Block, script: str, output: str, workdir: Path) -> None:
    """Each study a block ran wrote its results with every item answered; `--compare` names both
    runs and every setting the block changed for one of them."""
    parser = strict_parser()
    changed = {variable: s.field for s in describe_settings() for variable in s.variables}
    labels: list[str] = []
    settings: set[str] = set()
    for command in cliplens_commands(script):
        if command.words[1:2] not in (["experiment"], ["demo"]):
            continue
        args = parser.parse_args(command.words[1:])
        if getattr(args, "compare", None):
            for label in labels:
                assert label in output, f"{block.where}: --compare does not name the run {label!r}"
            for field in settings:
                assert field in output, f"{block.where}: --compare does not show the setting {field}"
            continue
        results = json.loads((workdir / args.dir / f"{args.label}.json").read_text())
        for scenario in results["scenarios"]:
            summary = scenario["summary"]
            assert summary["images_ok"] == summary["images"] > 0, f"{block.where}: {scenario['key']}"
        labels.append(args.label)
        settings |= {changed[variable] for variable in command.environment if variable in changed}


def run_python(block: Block, code: str, app: Served) -> None:
    namespace: dict[str, Any] = {"__name__": "__doc_test__"}
    exec(compile(code, block.where, "exec"), namespace)
    responses = [value for value in namespace.values() if isinstance(value, CreateEmbeddingResponse)]
    assert responses, f"{block.where}: the snippet left no embeddings response to check"
    dimension = app.model()["dimension"]
    for response in responses:
        assert response.data, f"{block.where}: no vectors"
        for item in response.data:
            assert isinstance(item.embedding, list) and len(item.embedding) == dimension
            assert all(math.isfinite(value) for value in item.embedding)


def check_promql(block: Block, query: str, workdir: Path) -> None:
    promtool = required("promtool", debian("prometheus"))
    rules = workdir / "doc-query.rules.yml"
    expression = json.dumps(" ".join(query.split()))
    rules.write_text(
        f"groups:\n  - name: doc\n    rules:\n      - record: doc:query\n        expr: {expression}\n"
    )
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, f"{block.where}: promtool: {checked.stdout}{checked.stderr}"
    wanted = " ".join(query.split())
    quoted = [
        path
        for folder in ("deploy", "observability")
        for path in (ROOT / folder).rglob("*.y*ml")
        if wanted in " ".join(path.read_text().split())
    ]
    assert quoted, f"{block.where}: the query is in no file under deploy/ or observability/"


# ---------------------------------------------------------------------------------------------
# Documented JSON against printed JSON

ELLIPSIS = "<doc-test: anything>"


def documented_json(block: Block) -> Any:
    """The JSON a `text` block shows, its bare `...` read as "anything"."""
    return json.loads(re.sub(r'(?<!")\.\.\.(?!")', lambda _: json.dumps(ELLIPSIS), block.text))


def last_json(output: str) -> Any:
    for line in reversed(output.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def mismatches(shown: Any, printed: Any, where: str) -> list[str]:
    """Where `printed` differs from what the documentation `shown` says it is."""
    problems: list[str] = []
    if shown in (ELLIPSIS, "..."):
        return problems
    if isinstance(shown, dict):
        if not isinstance(printed, dict):
            return [f"{where}: shown an object, printed {printed!r}"]
        if set(shown) != set(printed):
            problems.append(f"{where}: keys shown {sorted(shown)}, printed {sorted(printed)}")
        for key in sorted(set(shown) & set(printed)):
            problems += mismatches(shown[key], printed[key], f"{where}.{key}")
        return problems
    if isinstance(shown, list):
        if not isinstance(printed, list):
            return [f"{where}: shown a list, printed {printed!r}"]
        more = bool(shown) and shown[-1] == ELLIPSIS
        items = shown[:-1] if more else shown
        if len(printed) < len(items) or (not more and len(printed) != len(items)):
            return [f"{where}: shown {len(items)} items{' or more' if more else ''}, printed {len(printed)}"]
        for index, item in enumerate(items):
            problems += mismatches(item, printed[index], f"{where}[{index}]")
        return problems
    if isinstance(shown, float):
        return [] if isinstance(printed, float) else [f"{where}: shown a float, printed {printed!r}"]
    same = type(shown) is type(printed) and shown == printed
    return [] if same else [f"{where}: shown {shown!r}, printed {printed!r}"]
