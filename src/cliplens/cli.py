"""`cliplens serve | demo | experiment`: the command line.

`serve` runs the service under uvicorn with settings from the environment. `experiment` reproduces
the per-stage latency study for a deployment: it prepares phone-like photos, puts them where the
service loads from, runs the scenarios (default: 1, 50, 100 images; 50 images x 30 concurrent),
prints the study's table and writes results.json and a figure; `--compare A.json B.json` sets two
runs side by side. `demo` is the README's first command: the experiment at a size that finishes in
a minute or two on a laptop CPU, on the embedded default (local directory, no cloud, no GPU).

The experiment is an optional part (`pip install 'cliplens[experiment]'`): a server image has none
of its dependencies, so this module imports it only inside `demo` and `experiment`, and says what
to install when it is missing. Parsing and dispatch live here; what the commands print lives in
cliplens.experiment.report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cliplens import __version__
from cliplens.machine import bound_openmp_spinning
from cliplens.settings import Settings, SettingsError, describe_settings, load_settings
from cliplens.telemetry.logs import configure_logging

if TYPE_CHECKING:
    from cliplens.experiment.load import Scenario
    from cliplens.experiment.storage import BucketPrefix
    from cliplens.experiment.study import StudyPlan

log = logging.getLogger("cliplens.cli")

DEMO_PHOTOS = 48
DEMO_CONCURRENCY = 8
"""The demo's study, scaled to a laptop: 1, N/2 and N images, and N/2 images x 8 concurrent."""


class ExperimentExtraMissing(Exception):
    """The experiment's optional dependencies are not installed (a server-only install).

    Not a ValueError or TypeError, so that argparse lets it through from an argument's type function
    instead of reporting it as an invalid value."""

    def __init__(self, module: str) -> None:
        super().__init__(
            f"cliplens demo and experiment need the experiment extra (no module named {module!r}): "
            "pip install 'cliplens[experiment]'"
        )


@contextlib.contextmanager
def _experiment_extra() -> Iterator[None]:
    """Around the experiment's imports: a missing module other than cliplens's own is the extra's."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] == "cliplens":
            raise
        raise ExperimentExtraMissing(exc.name) from exc


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from cliplens.server import serve

    return serve(settings, args.host, args.port)


def _photos(text: str) -> int | Path | BucketPrefix:
    """`--photos 48` generates 48 photos; `--photos ./my-photos` uses a folder (`./48` for one named 48);
    `--photos gs://bucket/prefix` the photos already in a bucket."""
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError("at least one photo")
        return int(text)
    if text.startswith("gs://"):
        from cliplens.experiment.storage import BucketPrefix

        try:
            return BucketPrefix.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return Path(text)


def _limit(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of photos, at least 1")
    return int(text)


def _scenario(text: str) -> Scenario:
    with _experiment_extra():
        from cliplens.experiment.load import Scenario
    try:
        return Scenario.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _mix(text: str) -> dict[str, float]:
    with _experiment_extra():
        from cliplens.experiment.corpus import parse_mix
    try:
        return parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _demo_scenarios(photos: int) -> tuple[Scenario, ...]:
    from cliplens.experiment.load import Scenario

    half = max(1, photos // 2)
    scenarios = (Scenario(1), Scenario(half), Scenario(photos), Scenario(half, DEMO_CONCURRENCY))
    return tuple(dict.fromkeys(scenarios))


def _plan(args: argparse.Namespace, argv: Sequence[str], demo: bool) -> StudyPlan:
    from cliplens.experiment.load import STUDY_SCENARIOS
    from cliplens.experiment.study import StudyPlan

    photos_dir = args.photos if isinstance(args.photos, Path) else None
    count = args.photos if isinstance(args.photos, int) else None
    bucket = None if photos_dir is not None or count is not None else args.photos
    if args.scenario:
        scenarios = tuple(args.scenario)
    elif demo:
        scenarios = _demo_scenarios(count or DEMO_PHOTOS)
    else:
        scenarios = STUDY_SCENARIOS
    if demo and args.photos is None:
        count = DEMO_PHOTOS
    return StudyPlan(
        scenarios=scenarios,
        out_dir=Path(args.dir),
        label=args.label,
        url=args.url,
        storage=args.storage or ("gcs" if bucket is not None else "local"),
        photos_dir=photos_dir,
        photos_bucket=bucket,
        limit=args.limit,
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


def _run(args: argparse.Namespace, argv: Sequence[str], settings: Settings, demo: bool) -> int:
    with _experiment_extra():
        from cliplens.experiment import report
        from cliplens.experiment.results import write
        from cliplens.experiment.study import FAILURES, run_study
    console = report.make_console()
    plan = _plan(args, argv, demo)
    if demo:
        # The README's first command must run offline: random weights stand in, loudly, when the
        # pretrained ones cannot be fetched (the timings are the same). Only the demo does this.
        settings = dataclasses.replace(settings, random_weights_fallback=True)
    title = "cliplens demo" if demo else "cliplens experiment"
    report.render_plan(title, plan, console)
    try:
        results = run_study(plan, settings, console)
    except FAILURES as exc:
        report.render_failure(title, exc, console)
        return 1
    json_path = write(results, plan.out_dir / f"{plan.label}.json")
    report.render_run(results, console)
    report.render_file("results", json_path, console)
    if not args.no_figure:
        with _experiment_extra():
            from cliplens.experiment.figure import draw
        report.render_file("figure", draw(results, plan.out_dir / f"{plan.label}.png"), console)
    report.render_errors(results, json_path, console)
    return 0


def _compare(paths: tuple[str, str]) -> int:
    with _experiment_extra():
        from cliplens.experiment import report
        from cliplens.experiment.results import read
    console = report.make_console()
    try:
        a, b = (read(Path(path)) for path in paths)
    except ValueError as exc:
        report.render_failure("cliplens experiment --compare", exc, console)
        return 1
    report.render_pair(a, b, paths, console)
    return 0


def _add_study_options(parser: argparse.ArgumentParser, demo: bool) -> None:
    # The parser is built for every command: this part of the experiment needs no optional extra.
    from cliplens.experiment.storage import STORAGE_KINDS

    target = parser.add_argument_group("target")
    target.add_argument("--url", help="a running service (default: start one in this process)")
    target.add_argument("--token", help="bearer token, for a service with CLIPLENS_API_TOKENS")
    target.add_argument(
        "--storage",
        choices=STORAGE_KINDS,
        default=None,
        help="where the photos are put for the service to load: a local directory (default), "
        "fake-gcs-server on loopback, or a real GCS bucket (default with --photos gs://...: measured there)",
    )
    target.add_argument(
        "--bucket", help="bucket (required for gcs; default cliplens-experiment for fake-gcs)"
    )
    target.add_argument("--prefix", help="object name prefix in the bucket (default cliplens-experiment)")
    target.add_argument("--emulator", help="with --url and fake-gcs: the emulator the running service reads")
    target.add_argument(
        "--image-root",
        help="with local: the service's CLIPLENS_IMAGE_ROOT (with --url, the running service's); "
        "photos under it are measured in place, others copied under it",
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
        help="how many phone-like photos to generate, a folder of your own photos, or gs://BUCKET/PREFIX: "
        "photos already in a bucket, measured there (no upload) "
        + (f"(default {DEMO_PHOTOS})" if demo else "(default: as many as the largest request)"),
    )
    photos.add_argument(
        "--limit",
        type=_limit,
        default=None,
        help="of a folder's or a bucket's photos, a sample of this many, drawn with --seed (default: all)",
    )
    photos.add_argument(
        "--mix", type=_mix, default=None, help="size mix, e.g. 12mp=0.5,3mp=0.25,2mp=0.25 (or 640x480=1)"
    )
    photos.add_argument(
        "--seed", type=int, default=0, help="seed of the generated photos, --limit's sample and the jitter"
    )
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
    parser.add_argument("--version", action="version", version=f"cliplens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the embedding service under uvicorn",
        description="Every setting is read from its environment variable; a flag wins over it.",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    settings = serve.add_argument_group("settings (flag, or the variable in brackets)")
    for setting in describe_settings():
        settings.add_argument(
            setting.flag,
            dest=f"setting_{setting.field}",
            metavar="1|0" if setting.boolean else "VALUE",
            help=f"{setting.meaning} [{' / '.join(setting.variables)}; default {setting.default}]".replace(
                "%", "%%"
            ),
        )
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
    bound_openmp_spinning()  # before anything imports torch
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(build_parser().parse_args(arguments), arguments)
    except ExperimentExtraMissing as exc:
        sys.stderr.write(f"cliplens: {exc}\n")
        return 1


def _flagged_settings(args: argparse.Namespace) -> dict[str, str]:
    """{variable: value} for each setting given as a `serve` flag (parsed by load_settings, like
    the environment, so a flag and its variable can never mean different things)."""
    given = {}
    for setting in describe_settings():
        value = getattr(args, f"setting_{setting.field}", None)
        if value is not None:
            given[setting.variable] = value
    return given


def _dispatch(args: argparse.Namespace, arguments: Sequence[str]) -> int:
    if args.command == "experiment" and args.compare:
        return _compare(tuple(args.compare))
    try:
        settings = load_settings(overrides=_flagged_settings(args))
    except SettingsError as exc:
        sys.stderr.write(f"cliplens: {exc}\n")
        return 2
    configure_logging(settings.log_level if args.command == "serve" else "WARNING")
    if args.command == "serve":
        return _serve(args, settings)
    return _run(args, arguments, settings, demo=args.command == "demo")


if __name__ == "__main__":
    sys.exit(main())
