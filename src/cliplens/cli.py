"""`cliplens serve | demo | experiment`: the command line.

`serve` runs the service under uvicorn with settings from the environment. `experiment` reproduces
the per-stage latency study for a deployment: it prepares phone-like photos, puts them where the
service loads from, runs the scenarios (default: 1, 50, 100 images; 50 images x 30 concurrent),
prints the study's table and writes results.json and a figure; `--compare A.json B.json` sets two
runs side by side. `demo` is the README's first command: the experiment at a size that finishes in
a minute or two on a laptop CPU, on the embedded default (local directory, no cloud, no GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cliplens.experiment.corpus import parse_mix
from cliplens.experiment.fakegcs import FakeGcsUnavailable
from cliplens.experiment.inprocess import ServiceStartError
from cliplens.experiment.load import STUDY_SCENARIOS, Scenario
from cliplens.experiment.report import render_comparison, render_tables
from cliplens.experiment.results import Results, read, write
from cliplens.experiment.study import STORAGE_KINDS, StudyError, StudyPlan, run_study
from cliplens.settings import Settings, SettingsError, load_settings
from cliplens.telemetry.logs import configure_logging

log = logging.getLogger("cliplens.cli")

DEMO_PHOTOS = 48
DEMO_CONCURRENCY = 8
"""The demo's study, scaled to a laptop: 1, N/2 and N images, and N/2 images x 8 concurrent."""


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from cliplens.server import serve

    return serve(settings, args.host, args.port)


def _photos(text: str) -> int | Path:
    """`--photos 48` generates 48 photos; `--photos ./my-photos` uses a folder (`./48` for one named 48)."""
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError("at least one photo")
        return int(text)
    return Path(text)


def _scenario(text: str) -> Scenario:
    try:
        return Scenario.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _mix(text: str) -> dict[str, float]:
    try:
        return parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _demo_scenarios(photos: int) -> tuple[Scenario, ...]:
    half = max(1, photos // 2)
    scenarios = (Scenario(1), Scenario(half), Scenario(photos), Scenario(half, DEMO_CONCURRENCY))
    return tuple(dict.fromkeys(scenarios))


def _plan(args: argparse.Namespace, argv: Sequence[str], demo: bool) -> StudyPlan:
    photos_dir = args.photos if isinstance(args.photos, Path) else None
    count = args.photos if isinstance(args.photos, int) else None
    if args.scenario:
        scenarios = tuple(args.scenario)
    elif demo:
        scenarios = _demo_scenarios(count or DEMO_PHOTOS)
    else:
        scenarios = STUDY_SCENARIOS
    if demo and count is None and photos_dir is None:
        count = DEMO_PHOTOS
    return StudyPlan(
        scenarios=scenarios,
        out_dir=Path(args.dir),
        label=args.label,
        url=args.url,
        storage=args.storage,
        photos_dir=photos_dir,
        corpus_size=count,
        mix=args.mix,
        seed=args.seed,
        image_root=Path(args.image_root) if args.image_root else None,
        bucket=args.bucket,
        prefix=args.prefix,
        emulator=args.emulator,
        delay_ms=args.delay_ms,
        jitter_ms=args.jitter_ms,
        rate_mbps=args.rate_mbps,
        repeat=args.repeat,
        warmup=args.warmup,
        timeout_s=args.timeout,
        token=args.token,
        command=("cliplens", *argv),
    )


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 200)


def _describe_run(results: Results, console: Console) -> None:
    model: dict[str, Any] = results.service.get("model", {})
    if model.get("random_weights"):
        console.print("[yellow]RANDOM WEIGHTS: timings are real, vectors are meaningless[/yellow]")
    storage = results.storage
    injected = ""
    if storage.get("delay_ms") or storage.get("rate_mbps"):
        rate = storage.get("rate_mbps")
        injected = f" (+{storage.get('delay_ms', 0):g} ms per object, " + (
            f"{rate:g} Mbit/s per connection)" if rate else "no rate limit)"
        )
    corpus = results.corpus
    console.print(
        f"model {model.get('id')} on {model.get('device')} ({model.get('dtype')}), "
        f"dimension {model.get('dimension')}; service {results.service.get('url')}"
        + (" (in-process)" if results.service.get("in_process") else "")
    )
    console.print(
        f"photos: {corpus.get('count')} ({corpus.get('source')}, {corpus.get('mean_megapixels', 0):.1f} MP "
        f"and {corpus.get('mean_bytes', 0) / 1e6:.2f} MB on average) from storage "
        f"{storage.get('kind')}{injected}"
    )
    console.print(
        f"machine: {results.machine.get('cpu')}, {results.machine.get('cores_usable')} cores usable, "
        f"{len(results.machine.get('gpus', []))} GPU"
    )


def _slowest(results: Results, console: Console) -> None:
    """The slowest request, with its trace id: the one to open in Jaeger first."""
    answered = [(run.scenario, r) for run in results.runs for r in run.records if r.status == 200]
    if not answered:
        return
    scenario, record = max(answered, key=lambda pair: pair[1].stages_ms.get("total", pair[1].latency_ms))
    console.print(
        f"slowest request: {scenario.name}, {record.stages_ms.get('total', record.latency_ms):.0f} ms "
        f"in the service, trace id {record.trace_id}"
    )


def _run(args: argparse.Namespace, argv: Sequence[str], settings: Settings, demo: bool) -> int:
    console = _console()
    plan = _plan(args, argv, demo)
    if demo:
        # The README's first command must run offline: random weights stand in, loudly, when the
        # pretrained ones cannot be fetched (the timings are the same). Only the demo does this.
        settings = dataclasses.replace(settings, random_weights_fallback=True)
    title = "cliplens demo" if demo else "cliplens experiment"
    console.print(
        f"[bold]{title}[/bold]: scenarios {', '.join(s.key for s in plan.scenarios)}"
        + (f", {plan.repeat} rounds each" if plan.repeat > 1 else "")
        + f"; service {plan.url or 'in-process'}, storage {plan.storage}, output in {plan.out_dir}"
    )
    try:
        results = run_study(plan, settings, console)
    except (StudyError, ServiceStartError, FakeGcsUnavailable, ValueError) as exc:
        console.print(f"[red]{title} failed:[/red] {exc}")
        return 1
    json_path = write(results, plan.out_dir / f"{plan.label}.json")
    _describe_run(results, console)
    render_tables(results.summaries(), console)
    _slowest(results, console)
    console.print(f"results: {json_path}")
    if not args.no_figure:
        from cliplens.experiment.figure import draw

        figure_path = draw(results, plan.out_dir / f"{plan.label}.png")
        console.print(f"figure: {figure_path}")
    errors = sum(summary.error_count for summary in results.summaries())
    if errors:
        console.print(f"[yellow]{errors} images failed: see the errors column and {json_path}[/yellow]")
    return 0


_LOOPBACK_PORT = re.compile(r"(127\.0\.0\.1|localhost|\[::1\]):\d+")


def _shown(value: object) -> str:
    """A value as the differences table shows it; loopback ports are drawn afresh each run."""
    return _LOOPBACK_PORT.sub(r"\1:*", str(value))


def _differences(a: Results, b: Results) -> list[tuple[str, str, str]]:
    """What changed between two runs: settings, model, storage, machine."""
    rows: list[tuple[str, str, str]] = []

    def compare(prefix: str, left: dict[str, Any] | None, right: dict[str, Any] | None) -> None:
        left, right = left or {}, right or {}
        for key in sorted(set(left) | set(right)):
            if isinstance(left.get(key), dict) or isinstance(right.get(key), dict):
                continue
            shown = _shown(left.get(key, "-")), _shown(right.get(key, "-"))
            if shown[0] != shown[1]:
                rows.append((f"{prefix}{key}", *shown))

    compare("settings.", a.service.get("settings"), b.service.get("settings"))
    compare("model.", a.service.get("model"), b.service.get("model"))
    compare("storage.", a.storage, b.storage)
    for key in ("cpu", "cores_usable", "gpus"):
        if a.machine.get(key) != b.machine.get(key):
            rows.append((f"machine.{key}", str(a.machine.get(key)), str(b.machine.get(key))))
    return rows


def _compare(paths: Sequence[str]) -> int:
    console = _console()
    try:
        a, b = (read(Path(path)) for path in paths)
    except ValueError as exc:
        console.print(f"[red]cliplens experiment --compare failed:[/red] {exc}")
        return 1
    labels = (a.label, b.label) if a.label != b.label else (Path(paths[0]).stem, Path(paths[1]).stem)
    if labels[0] == labels[1]:
        labels = ("A", "B")
    console.print(f"[bold]{labels[0]}[/bold] = {paths[0]}, [bold]{labels[1]}[/bold] = {paths[1]}")
    differences = _differences(a, b)
    if differences:
        table = Table(title="what differs")
        table.add_column("")
        table.add_column(labels[0])
        table.add_column(labels[1])
        for row in differences:
            table.add_row(*row)
        console.print(table)
    render_comparison(a.summaries(), b.summaries(), console, labels)
    return 0


def _add_study_options(parser: argparse.ArgumentParser, demo: bool) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--url", help="a running service (default: start one in this process)")
    target.add_argument("--token", help="bearer token, for a service with CLIPLENS_API_TOKENS")
    target.add_argument(
        "--storage",
        choices=STORAGE_KINDS,
        default="local",
        help="where the photos are put for the service to load: a local directory (default), "
        "fake-gcs-server on loopback, or a real GCS bucket",
    )
    target.add_argument(
        "--bucket", help="bucket (required for gcs; default cliplens-experiment for fake-gcs)"
    )
    target.add_argument("--prefix", default="cliplens-experiment", help="object name prefix in the bucket")
    target.add_argument("--emulator", help="with --url and fake-gcs: the emulator the running service reads")
    target.add_argument(
        "--image-root", help="with --url and local: the running service's CLIPLENS_IMAGE_ROOT"
    )
    latency = parser.add_argument_group("storage latency (fake-gcs in-process only)")
    latency.add_argument("--delay-ms", type=float, default=0.0, help="added to every storage request")
    latency.add_argument("--jitter-ms", type=float, default=0.0, help="the delay varies uniformly by +-this")
    latency.add_argument("--rate-mbps", type=float, default=None, help="Mbit/s per storage connection")
    photos = parser.add_argument_group("photos")
    photos.add_argument(
        "--photos",
        type=_photos,
        default=None,
        help="how many phone-like photos to generate, or a folder of your own photos "
        + (f"(default {DEMO_PHOTOS})" if demo else "(default: as many as the largest request)"),
    )
    photos.add_argument(
        "--mix", type=_mix, default=None, help="size mix, e.g. 12mp=0.5,3mp=0.25,2mp=0.25 (or 640x480=1)"
    )
    photos.add_argument("--seed", type=int, default=0, help="seed of the generated photos and of the jitter")
    load = parser.add_argument_group("load")
    load.add_argument(
        "--scenario",
        type=_scenario,
        action="append",
        help="IMAGES or IMAGESxCONCURRENT, repeatable "
        + (
            f"(default: 1, N/2, N, N/2x{DEMO_CONCURRENCY} for N photos)"
            if demo
            else "(default: the study's 1, 50, 100, 50x30)"
        ),
    )
    load.add_argument("--repeat", type=int, default=1, help="rounds of each scenario (pooled in the stats)")
    load.add_argument("--warmup", type=int, default=1, help="warm-up requests before the scenarios")
    load.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--dir",
        default="cliplens-demo" if demo else "cliplens-results",
        help="where the generated photos, LABEL.json and LABEL.png go",
    )
    output.add_argument("--label", default="results", help="name of this run's files and in --compare")
    output.add_argument("--no-figure", action="store_true", help="skip the PNG figure")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cliplens", description=__doc__.splitlines()[0] if __doc__ else None
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the embedding service under uvicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    demo = commands.add_parser(
        "demo", help="the experiment at laptop size on generated photos in a local directory"
    )
    _add_study_options(demo, demo=True)
    experiment = commands.add_parser(
        "experiment", help="per-stage latency under concurrency: table, results.json and figure"
    )
    _add_study_options(experiment, demo=False)
    experiment.add_argument(
        "--compare", nargs=2, metavar=("A.json", "B.json"), help="set two runs side by side, and exit"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    if args.command == "experiment" and args.compare:
        return _compare(args.compare)
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.stderr.write(f"cliplens: {exc}\n")
        return 2
    configure_logging(settings.log_level if args.command == "serve" else "WARNING")
    if args.command == "serve":
        return _serve(args, settings)
    return _run(args, arguments, settings, demo=args.command == "demo")


if __name__ == "__main__":
    sys.exit(main())
