"""The study, as one command: prepare the photos, put them where the service loads from, run the
scenarios, and keep every number.

This is the orchestration behind `cliplens experiment` and `cliplens demo`. It targets a running
service (`url`) or starts the real one in this process on the source the plan names: the local
directory (the embedded default, no cloud), fake-gcs-server on loopback (optionally behind the
latency proxy, so `load` behaves like a real bucket), or a real bucket. The client sends the
scenarios with `"timings": true` and keeps each response's `Server-Timing`; the result is a
`Results` (written as results.json) from which the report and the figure are computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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

from cliplens.experiment import corpus, fakegcs, machine, storage
from cliplens.experiment.inprocess import InProcessService
from cliplens.experiment.latency import LatencyProxy
from cliplens.experiment.load import RequestRecord, Scenario, run_scenario, send_request
from cliplens.experiment.results import Results, ScenarioRun, settings_json
from cliplens.pipeline.service import usable_cpus
from cliplens.settings import Settings

log = logging.getLogger(__name__)

StorageKind = Literal["local", "fake-gcs", "gcs"]
STORAGE_KINDS: tuple[StorageKind, ...] = ("local", "fake-gcs", "gcs")
_WARMUP_IMAGES = 8


class StudyError(RuntimeError):
    """The study cannot run as planned; the message says why and what to change."""


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
    corpus_size: int | None = None
    """Photos to generate; None = the largest request of the scenarios."""
    mix: dict[str, float] | None = None
    seed: int = 0
    image_root: Path | None = None
    """With `url` and local storage: the running service's CLIPLENS_IMAGE_ROOT."""
    bucket: str | None = None
    prefix: str = "cliplens-experiment"
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
        if self.storage == "gcs" and not self.bucket:
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


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _prepare_corpus(plan: StudyPlan, progress: Progress) -> tuple[list[corpus.Photo], Path, dict[str, Any]]:
    if plan.photos_dir is not None:
        photos = corpus.collect(plan.photos_dir)
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


def _upload(
    photos: Sequence[corpus.Photo], directory: Path, plan: StudyPlan, api_root: str | None, progress: Progress
) -> list[str]:
    assert plan.bucket is not None
    where = f"gs://{plan.bucket}/{plan.prefix}" + (f" on {api_root}" if api_root else "")
    task = progress.add_task(f"uploading to {where}", total=len(photos))
    try:
        return storage.upload(
            photos, directory, plan.bucket, plan.prefix, api_root, on_upload=lambda _: progress.advance(task)
        )
    except Exception as exc:
        raise StudyError(f"uploading the photos to {where} failed: {exc}") from exc


@contextlib.contextmanager
def _target(
    plan: StudyPlan,
    settings: Settings,
    photos: list[corpus.Photo],
    directory: Path,
    progress: Progress,
    storage_info: dict[str, Any],
) -> Iterator[tuple[str, list[str], Settings | None]]:
    """Put the photos where the service reads, start the service if asked; yield (url, refs, settings)."""
    with contextlib.ExitStack() as stack:
        references: list[str]
        if plan.storage == "local":
            if plan.url is None:
                references = [photo.name for photo in photos]
                settings = dataclasses.replace(
                    settings, image_root=directory, default_bucket=None, allowed_buckets=()
                )
                storage_info.update(image_root=str(directory))
            else:
                root = plan.image_root or directory
                references = storage.local_references(photos, directory, root)
                storage_info.update(image_root=str(root))
        elif plan.storage == "fake-gcs":
            bucket = plan.bucket or "cliplens-experiment"
            plan = dataclasses.replace(plan, bucket=bucket)
            if plan.url is None:
                gcs = stack.enter_context(fakegcs.FakeGcsServer(plan.out_dir / "fake-gcs-server.log"))
                gcs.create_bucket(bucket)
                references = _upload(photos, directory, plan, gcs.url, progress)
                emulator = gcs.url
                if plan.delay_ms > 0 or plan.rate_mbps is not None:
                    proxy = stack.enter_context(
                        LatencyProxy(
                            gcs.host,
                            gcs.port,
                            delay_ms=plan.delay_ms,
                            rate_mbps=plan.rate_mbps,
                            jitter_ms=plan.jitter_ms,
                            seed=plan.seed,
                        )
                    )
                    emulator = proxy.url
                    stack.callback(lambda: storage_info.update(proxy=proxy.describe()))
                settings = dataclasses.replace(
                    settings,
                    image_root=None,
                    default_bucket=bucket,
                    allowed_buckets=(),
                    gcs_emulator_host=emulator,
                    allow_emulator=True,
                )
                storage_info.update(emulator=gcs.url, service_reads_from=emulator)
            else:
                assert plan.emulator is not None
                with httpx.Client(timeout=10) as client:
                    client.post(f"{plan.emulator}/storage/v1/b", json={"name": bucket})
                references = _upload(photos, directory, plan, plan.emulator, progress)
                storage_info.update(emulator=plan.emulator)
            storage_info.update(bucket=bucket, prefix=plan.prefix)
        else:
            assert plan.bucket is not None
            references = _upload(photos, directory, plan, None, progress)
            if plan.url is None:
                settings = dataclasses.replace(
                    settings, image_root=None, default_bucket=plan.bucket, gcs_emulator_host=None
                )
            storage_info.update(bucket=plan.bucket, prefix=plan.prefix)
        if plan.url is not None:
            yield plan.url.rstrip("/"), references, None
            return
        settings = _in_process_settings(settings, plan)
        task = progress.add_task(f"starting the service ({settings.model}/{settings.pretrained})", total=1)
        url = stack.enter_context(InProcessService(settings))
        progress.advance(task)
        yield url, references, settings


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
    probe = await client.post(
        "/v1/embeddings", json={"input": [references[0]], "timings": True}, timeout=timeout_s
    )
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
    started = _now()
    storage_info: dict[str, Any] = {
        "kind": plan.storage,
        "delay_ms": plan.delay_ms,
        "jitter_ms": plan.jitter_ms,
        "rate_mbps": plan.rate_mbps,
    }
    with _progress(console) as progress:
        photos, directory, corpus_info = _prepare_corpus(plan, progress)
        if len(photos) < max(s.images for s in plan.scenarios):
            log.warning("the corpus has fewer photos than a request asks for: requests repeat photos")
        with _target(plan, settings, photos, directory, progress, storage_info) as (url, references, used):
            # The references as the service resolves them: what locustfile.py --references sends.
            (plan.out_dir / "references.txt").write_text("\n".join(references) + "\n")
            token = plan.token
            if token is None and used is not None and used.api_tokens:
                token = used.api_tokens[0]
            card, runs = asyncio.run(_measure(url, plan, references, progress, token))
            if on_service is not None:
                on_service(card)
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
