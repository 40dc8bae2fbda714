"""The study, as one command: prepare the photos, put them where the service loads from, run the
scenarios, and keep every number.

This is the orchestration behind `cliplens experiment` and `cliplens demo`. It targets a running
service (`url`) or starts the real one in this process on the source the plan names: the local
directory (the embedded default, no cloud), fake-gcs-server on loopback (optionally behind the
latency proxy, so `load` behaves like a real bucket), or a real bucket; one target type per
storage kind (targets.py) puts the photos there. Photos that are already where the service reads,
a folder under its image root or objects in a bucket (`gs://BUCKET/PREFIX`, listed here), are
measured in place. The client sends the scenarios with `"timings": true` and keeps each response's
`Server-Timing`; the result is a `Results` (written as results.json) from which the report and the
figure are computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, assert_never

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from cliplens.experiment import corpus, machine, storage
from cliplens.experiment.fakegcs import FakeGcsUnavailable
from cliplens.experiment.inprocess import InProcessService, ServiceStartError
from cliplens.experiment.load import RequestRecord, Scenario, request_body, run_scenario, send_request
from cliplens.experiment.results import Results, ScenarioRun, settings_json
from cliplens.experiment.storage import BucketPrefix, BucketUnreadable, StorageKind
from cliplens.experiment.targets import (
    DEFAULT_FAKE_BUCKET,
    DEFAULT_PREFIX,
    FakeGcsTarget,
    GcsTarget,
    InPlaceGcsTarget,
    LocalTarget,
    Placement,
    PlacementError,
    Target,
)
from cliplens.machine import usable_cpus
from cliplens.settings import Settings

log = logging.getLogger(__name__)

_WARMUP_IMAGES = 8


class StudyError(RuntimeError):
    """The study cannot run as planned; the message says why and what to change."""


FAILURES: tuple[type[Exception], ...] = (
    StudyError,
    PlacementError,
    ServiceStartError,
    FakeGcsUnavailable,
    BucketUnreadable,
    ValueError,
)
"""What a study may end with whose message says what to change: the commands print it, no traceback."""


@dataclass(frozen=True)
class StudyPlan:
    """What to run, against what, on which photos; the command line maps onto it one to one."""

    scenarios: tuple[Scenario, ...]
    out_dir: Path
    label: str = "results"
    url: str | None = None
    """A running service; None starts the real service in this process."""
    storage: StorageKind = "local"
    photos_dir: Path | None = None
    """A user's folder of photos instead of the generated corpus."""
    photos_bucket: BucketPrefix | None = None
    """Photos already in a bucket instead of the generated corpus: measured there, nothing uploaded."""
    limit: int | None = None
    """Of a folder's or a bucket's photos, a sample of this many (drawn with `seed`); None: all."""
    corpus_size: int | None = None
    """Photos to generate; None = the largest request of the scenarios."""
    mix: dict[str, float] | None = None
    seed: int = 0
    image_root: Path | None = None
    """With local storage: the service's CLIPLENS_IMAGE_ROOT (a running one's with `url`, else the one
    the in-process service is started with); photos under it are measured in place."""
    bucket: str | None = None
    prefix: str | None = None
    """Object name prefix of the uploads; None: DEFAULT_PREFIX."""
    emulator: str | None = None
    """With `url` and fake-gcs: the emulator the running service reads from."""
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbps: float | None = None
    repeat: int = 1
    warmup: int = 1
    timeout_s: float = 600.0
    token: str | None = None
    """Bearer token for a service with CLIPLENS_API_TOKENS (in-process: its first token is used)."""
    command: tuple[str, ...] = ()

    @property
    def photo_count(self) -> int:
        return self.corpus_size or max(scenario.images for scenario in self.scenarios)

    def check(self) -> None:
        """Reject combinations that cannot work, before anything slow starts."""
        if not self.scenarios:
            raise StudyError("no scenarios to run")
        injects = self.delay_ms > 0 or self.rate_mbps is not None
        if injects and self.storage != "fake-gcs":
            raise StudyError("--delay-ms / --rate-mbps shape the fake GCS only: add --storage fake-gcs")
        if injects and self.url is not None:
            raise StudyError(
                "latency injection needs the service to read through the proxy this command starts: "
                "drop --url to run the service in-process"
            )
        if self.storage == "gcs" and not self.bucket and self.photos_bucket is None:
            raise StudyError("--storage gcs needs --bucket NAME (an existing bucket you can write to)")
        if self.storage == "fake-gcs" and self.url is not None and not self.emulator:
            raise StudyError(
                "with --url, --storage fake-gcs needs --emulator URL: the fake-gcs-server the running "
                "service reads from (its STORAGE_EMULATOR_HOST)"
            )
        if self.delay_ms < 0 or not 0 <= self.jitter_ms <= self.delay_ms:
            raise StudyError("--delay-ms must be >= 0 and --jitter-ms between 0 and the delay")
        if self.rate_mbps is not None and self.rate_mbps <= 0:
            raise StudyError("--rate-mbps must be > 0 (leave it out for no limit)")
        if self.repeat < 1 or self.warmup < 0:
            raise StudyError("--repeat must be >= 1 and --warmup >= 0")
        if not 0 < self.timeout_s < math.inf:
            raise StudyError(f"--timeout must be a number of seconds > 0, not {self.timeout_s:g}")
        if self.limit is not None and self.limit < 1:
            raise StudyError("--limit must be >= 1")
        if self.limit is not None and self.photos_dir is None and self.photos_bucket is None:
            raise StudyError(
                "--limit samples a folder or a bucket of photos; for generated ones, --photos N says how many"
            )
        if self.photos_bucket is not None:
            self._check_in_place_bucket()

    def _check_in_place_bucket(self) -> None:
        source = self.photos_bucket
        if self.storage != "gcs":
            raise StudyError(
                f"--photos {source} is measured in its bucket, as it is: leave out --storage {self.storage}"
            )
        if self.bucket is not None or self.prefix is not None:
            raise StudyError(
                f"--bucket and --prefix say where photos are uploaded; --photos {source} is not uploaded: "
                "leave them out"
            )


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _prepare_corpus(
    plan: StudyPlan, settings: Settings, progress: Progress
) -> tuple[list[corpus.Photo], Path, dict[str, Any]]:
    """The photos, the directory they are files in (for a bucket's, the output folder: they are no
    files here), and what results.json says about them."""
    if plan.photos_bucket is not None:
        task = progress.add_task(f"listing {plan.photos_bucket}", total=None)
        listed = storage.list_photos(plan.photos_bucket, settings.gcs_emulator_host)
        progress.update(task, total=len(listed), completed=len(listed))
        photos = corpus.sample(listed, plan.limit, plan.seed)
        return photos, plan.out_dir, corpus.describe(photos, "bucket", str(plan.photos_bucket))
    if plan.photos_dir is not None:
        photos = corpus.sample(corpus.collect(plan.photos_dir), plan.limit, plan.seed)
        return photos, plan.photos_dir, corpus.describe(photos, "folder", plan.photos_dir)
    directory = plan.out_dir / "photos"
    count = plan.photo_count
    task = progress.add_task(f"photos in {directory}", total=count)
    photos = []
    for photo in corpus.generate(directory, count, plan.mix, plan.seed, workers=usable_cpus()):
        photos.append(photo)
        progress.advance(task)
    photos.sort(key=lambda photo: photo.name)
    return photos, directory, corpus.describe(photos, "generated", directory, plan.mix or corpus.DEFAULT_MIX)


def _target(plan: StudyPlan, settings: Settings) -> Target:
    """The plan's storage kind as a target: pointed at a running service, or set up for one started here.
    GCS is the one of the settings: Google's, or the emulator of `STORAGE_EMULATOR_HOST`."""
    running = plan.url is not None
    prefix = plan.prefix if plan.prefix is not None else DEFAULT_PREFIX
    if plan.photos_bucket is not None:
        return InPlaceGcsTarget(plan.photos_bucket, emulator=settings.gcs_emulator_host)
    if plan.storage == "local":
        return LocalTarget(image_root=plan.image_root, started_here=not running)
    if plan.storage == "fake-gcs":
        return FakeGcsTarget(
            bucket=plan.bucket or DEFAULT_FAKE_BUCKET,
            prefix=prefix,
            emulator=plan.emulator if running else None,
            log_path=plan.out_dir / "fake-gcs-server.log",
            delay_ms=plan.delay_ms,
            jitter_ms=plan.jitter_ms,
            rate_mbps=plan.rate_mbps,
            seed=plan.seed,
        )
    if plan.storage == "gcs":
        assert plan.bucket is not None
        return GcsTarget(bucket=plan.bucket, prefix=prefix, emulator=settings.gcs_emulator_host)
    assert_never(plan.storage)


@contextlib.contextmanager
def _service(
    plan: StudyPlan, settings: Settings, placement: Placement, progress: Progress
) -> Iterator[tuple[str, Settings | None]]:
    """The service to measure: the running one at `plan.url`, or the real one started here and set to
    read where the photos were placed; yields its URL and, when started here, its settings."""
    if plan.url is not None:
        yield plan.url.rstrip("/"), None
        return
    settings = _in_process_settings(dataclasses.replace(settings, **placement.settings), plan)
    task = progress.add_task(f"starting the service ({settings.model}/{settings.pretrained})", total=1)
    with InProcessService(settings) as url:
        progress.advance(task)
        yield url, settings


def _in_process_settings(settings: Settings, plan: StudyPlan) -> Settings:
    """The settings the in-process service runs with: the environment's, fitted to the plan.

    Requests may carry the largest scenario's images, and the request deadline is at least the
    client's `--timeout`, so that a slow CPU shows up as queueing in the table rather than as
    `timeout` errors.
    """
    largest = max(scenario.images for scenario in plan.scenarios)
    return dataclasses.replace(
        settings,
        max_inputs=max(settings.max_inputs, largest, _WARMUP_IMAGES),
        request_timeout_s=max(settings.request_timeout_s, plan.timeout_s),
    )


async def _preflight(
    client: httpx.AsyncClient, references: Sequence[str], timeout_s: float
) -> dict[str, Any]:
    """The service's model card, and one request that proves it can load the photos."""
    try:
        models = await client.get("/v1/models")
    except httpx.TransportError as exc:
        raise StudyError(f"the service at {client.base_url} does not answer: {exc}") from exc
    if models.status_code != 200:
        raise StudyError(f"GET /v1/models answered HTTP {models.status_code}: {models.text[:200]}")
    card: dict[str, Any] = models.json()["data"][0]
    probe = await client.post("/v1/embeddings", json=request_body(references[:1]), timeout=timeout_s)
    if probe.status_code != 200:
        raise StudyError(f"a one-photo request answered HTTP {probe.status_code}: {probe.text[:300]}")
    body = probe.json()
    if body["errors"]:
        error = body["errors"][0]
        raise StudyError(
            f"the service cannot load {references[0]!r}: {error['code']}: {error['message']} "
            "(is it reading from where the photos were put? see --image-root, --emulator, --bucket)"
        )
    if "timings" not in body:
        log.warning("the service returns no per-image timings: the per-image scope will be empty")
    return card


async def _measure(
    url: str,
    plan: StudyPlan,
    references: list[str],
    progress: Progress,
    token: str | None,
) -> tuple[dict[str, Any], list[ScenarioRun]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(
        base_url=url, timeout=plan.timeout_s, limits=limits, headers=headers
    ) as client:
        card = await _preflight(client, references, plan.timeout_s)
        if plan.warmup:
            warm = Scenario(min(_WARMUP_IMAGES, len(references)))
            task = progress.add_task("warm-up", total=plan.warmup)
            for index in range(plan.warmup):
                await send_request(client, warm, references[index:] + references[:index], plan.timeout_s)
                progress.advance(task)
        runs = []
        for scenario in plan.scenarios:
            task = progress.add_task(
                scenario.name + (f" x {plan.repeat} rounds" if plan.repeat > 1 else ""),
                total=scenario.in_flight * plan.repeat,
            )

            def advance(record: RequestRecord, task: Any = task) -> None:
                progress.advance(task, record.images)

            records = await run_scenario(client, scenario, references, plan.repeat, plan.timeout_s, advance)
            runs.append(ScenarioRun(scenario, records))
    return card, runs


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run_study(
    plan: StudyPlan,
    settings: Settings,
    console: Console,
    on_service: Callable[[dict[str, Any]], None] | None = None,
) -> Results:
    """Run the plan; the Results hold every raw number and the context they were measured in."""
    plan.check()
    plan.out_dir.mkdir(parents=True, exist_ok=True)  # whether photos are generated here or not
    started = _now()
    with _progress(console) as progress:
        photos, directory, corpus_info = _prepare_corpus(plan, settings, progress)
        if len(photos) < max(s.images for s in plan.scenarios):
            log.warning("the corpus has fewer photos than a request asks for: requests repeat photos")
        with _target(plan, settings) as target:
            placement = target.place(photos, directory, progress)
            references = placement.references
            with _service(plan, settings, placement, progress) as (url, used):
                # The references as the service resolves them: what locustfile.py --references sends.
                (plan.out_dir / "references.txt").write_text("\n".join(references) + "\n")
                token = plan.token
                if token is None and used is not None and used.api_tokens:
                    token = used.api_tokens[0]
                card, runs = asyncio.run(_measure(url, plan, references, progress, token))
                if on_service is not None:
                    on_service(card)
    storage_info: dict[str, Any] = {
        "kind": plan.storage,
        "delay_ms": plan.delay_ms,
        "jitter_ms": plan.jitter_ms,
        "rate_mbps": plan.rate_mbps,
        **placement.storage,
    }
    return Results(
        runs=runs,
        label=plan.label,
        service={
            "url": plan.url or url,
            "in_process": plan.url is None,
            "model": card,
            "settings": settings_json(used) if used is not None else None,
        },
        storage=storage_info,
        corpus=corpus_info,
        machine=machine.describe(),
        options={
            "scenarios": [scenario.key for scenario in plan.scenarios],
            "repeat": plan.repeat,
            "warmup": plan.warmup,
            "timeout_s": plan.timeout_s,
            "seed": plan.seed,
        },
        command=list(plan.command),
        started_at=started,
        finished_at=_now(),
    )
