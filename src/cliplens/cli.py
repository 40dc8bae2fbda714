"""`cliplens serve | demo`: the command line.

`serve` runs the service under uvicorn with settings from the environment. `demo` is the README's
first command: it generates a few phone-like photos, serves them from a local directory (no cloud,
no GPU), sends the study's kinds of load and prints the per-stage table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
from rich.console import Console

from cliplens.experiment.corpus import generate
from cliplens.experiment.inprocess import InProcessService, ServiceStartError
from cliplens.experiment.load import RequestRecord, Scenario, run_scenario
from cliplens.experiment.report import render_request_table
from cliplens.settings import Settings, SettingsError, load_settings
from cliplens.telemetry.logs import configure_logging

log = logging.getLogger("cliplens.cli")


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from cliplens.app import create_app

    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=fatal)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM, then re-raises the signal with the handler found before it started;
    # this one turns that into exit status 0, the status of a clean, requested shutdown.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run()
    return 1 if failures else 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


async def _demo_load(
    url: str, photos: list[str], scenarios: Sequence[Scenario]
) -> dict[str, list[RequestRecord]]:
    results: dict[str, list[RequestRecord]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await run_scenario(client, Scenario(min(4, len(photos))), photos)
        for scenario in scenarios:
            results[scenario.name] = await run_scenario(client, scenario, photos)
    return results


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    console = Console(width=None if sys.stdout.isatty() else 160)
    photo_dir = Path(args.dir) / "photos"
    console.print(
        f"[bold]cliplens demo[/bold]: generating {args.photos} phone-like photos in {photo_dir} ..."
    )
    photos = [photo.name for photo in generate(photo_dir, args.photos)]
    settings = dataclasses.replace(
        settings, image_root=photo_dir, default_bucket=None, random_weights_fallback=True
    )
    console.print(f"starting the service ({settings.model}/{settings.pretrained}) on the local directory ...")
    scenarios = [Scenario(1), Scenario(len(photos)), Scenario(len(photos), 4)]
    try:
        with InProcessService(settings) as url:
            models = httpx.get(f"{url}/v1/models").json()["data"][0]
            results = asyncio.run(_demo_load(url, photos, scenarios))
    except ServiceStartError as exc:
        console.print(f"[red]the service did not start:[/red] {exc}")
        return 1
    if models["random_weights"]:
        console.print("[yellow]RANDOM WEIGHTS: timings are real, vectors are meaningless[/yellow]")
    console.print(
        f"model {models['id']} on {models['device']} ({models['dtype']}), dimension {models['dimension']}"
    )
    render_request_table(results, console)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cliplens", description=__doc__.splitlines()[0] if __doc__ else None
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the embedding service under uvicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    demo = commands.add_parser("demo", help="serve generated photos locally and print per-stage timings")
    demo.add_argument("--dir", default="cliplens-demo", help="where the demo keeps its photos")
    demo.add_argument("--photos", type=int, default=12, help="how many photos to generate")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.stderr.write(f"cliplens: {exc}\n")
        return 2
    configure_logging(settings.log_level if args.command == "serve" else "WARNING")
    if args.command == "serve":
        return _serve(args, settings)
    return _demo(args, settings)


if __name__ == "__main__":
    sys.exit(main())
