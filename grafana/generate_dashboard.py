"""Writes grafana/dashboards/cliplens-stage-latency.json, the "cliplens — stage latency" dashboard.

The dashboard repeats one pattern (min, mean, p50, p95, p99, max) over three scopes (per request,
per image work, per image wait), and one panel per stage of `Stage`, so it is generated here rather
than edited by hand (a new stage appears by regenerating it); the JSON is
committed next to this file and tests/config/test_observability_files.py fails when the two differ.
Standard library only:

    python grafana/generate_dashboard.py          # rewrite the JSON
    python grafana/generate_dashboard.py --check  # exit 1 if the committed JSON is stale

Every query aggregates across instances (replicas) correctly: sums of rates, means from the summed
`_sum` and `_count`, quantiles from the bucket rates summed by `le`, the minimum of the windowed
minima and the maximum of the windowed maxima (exact; see src/cliplens/telemetry/extremes.py).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

from cliplens.vocabulary import Stage

Json = dict[str, Any]

OUTPUT = Path(__file__).parent / "dashboards" / "cliplens-stage-latency.json"
PROMETHEUS: Json = {"type": "prometheus", "uid": "cliplens-prometheus"}
JAEGER_UI = "http://localhost:16686"
STAGES = tuple(stage.value for stage in Stage)
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
INSTANCE = 'instance=~"$instance"'
OK = 'outcome="ok",'
FAILED = 'outcome!="ok",'


def rate(metric: str, match: str = "") -> str:
    """`rate(metric{match,instance=~"$instance"}[$__rate_interval])`."""
    return f"rate({metric}{{{match}{INSTANCE}}}[$__rate_interval])"


def increase(metric: str, match: str = "") -> str:
    """`increase(metric{match,instance=~"$instance"}[$__range])`."""
    return f"increase({metric}{{{match}{INSTANCE}}}[$__range])"


class Scope:
    """One family of the metric contract: `<base>_seconds` histogram + `<base>_{min,max}_seconds` gauges."""

    def __init__(self, base: str, label: str, variable: str | None = None) -> None:
        self.base = base
        self.label = label
        self.filter = f'{label}=~"{variable}",{INSTANCE}' if variable else INSTANCE

    def series(self, suffix: str) -> str:
        return f"{self.base}{suffix}{{{self.filter}}}"

    def minimum(self) -> str:
        return f"min by ({self.label}) ({self.series('_min_seconds')})"

    def maximum(self) -> str:
        return f"max by ({self.label}) ({self.series('_max_seconds')})"

    def mean(self) -> str:
        return self._mean("rate", "$__rate_interval")

    def quantile(self, q: float) -> str:
        return self._quantile(q, "rate", "$__rate_interval")

    def range_minimum(self) -> str:
        return f"min by ({self.label}) (min_over_time({self.series('_min_seconds')}[$__range]))"

    def range_maximum(self) -> str:
        return f"max by ({self.label}) (max_over_time({self.series('_max_seconds')}[$__range]))"

    def range_count(self) -> str:
        return f"sum by ({self.label}) (increase({self.series('_seconds_count')}[$__range]))"

    def range_mean(self) -> str:
        return self._mean("increase", "$__range")

    def range_quantile(self, q: float) -> str:
        return self._quantile(q, "increase", "$__range")

    def _mean(self, function: str, window: str) -> str:
        """Summed over replicas before dividing: the mean of all observations, not of means."""
        by = f"sum by ({self.label})"
        return (
            f"{by} ({function}({self.series('_seconds_sum')}[{window}]))"
            f" / {by} ({function}({self.series('_seconds_count')}[{window}]))"
        )

    def _quantile(self, q: float, function: str, window: str) -> str:
        return (
            f"histogram_quantile({q}, sum by ({self.label}, le) "
            f"({function}({self.series('_seconds_bucket')}[{window}])))"
        )


REQUEST_STAGE = Scope("cliplens_request_stage", "stage", "$stage")
IMAGE_WORK = Scope("cliplens_image_stage", "stage", "$work_stage")
IMAGE_WAIT = Scope("cliplens_stage_queue", "stage", "$stage")
WHOLE_REQUEST = Scope("cliplens_request", "modality")
CACHE_LOOKUP = Scope("cliplens_cache", "tier")
"""cliplens_cache_seconds{tier}: only the histogram half of a scope (the cache has no min/max gauges)."""
CACHE_LOOKUPS = "cliplens_cache_requests_total"
CACHE_WRITES = "cliplens_cache_writes_total"
MEMORY = 'tier="memory",'
REDIS = 'tier="redis",'
HIT = 'result="hit",'
ASKED = 'result!="bypass",'
FAILED_OR_SKIPPED = 'result=~"error|bypass",'
WITH_A_CACHE = (
    "With a cache on, a hit crosses only the `cache` stage (inline data crosses `load` first, to be "
    "hashed): the load, decode, preprocess and embed panels observe the misses only, so their counts "
    "fall and their times describe the misses as the hit ratio rises, while cliplens_images_total "
    "(Throughput, failed images) and the whole request count the hits too."
)
"""How to read the stage panels when the embedding cache serves some images."""


def target(ref: str, expr: str, legend: str = "", exemplar: bool = False) -> Json:
    return {
        "refId": ref,
        "datasource": PROMETHEUS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": True,
        "instant": False,
        "exemplar": exemplar,
    }


def instant(ref: str, expr: str, legend: str = "") -> Json:
    return {
        "refId": ref,
        "datasource": PROMETHEUS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "format": "table",
        "range": False,
        "instant": True,
        "exemplar": False,
    }


def refs() -> list[str]:
    return [chr(ord("A") + i) for i in range(26)]


DASHED_EXTREMES: Json = {
    "matcher": {"id": "byRegexp", "options": ".*\\b(min|max)$"},
    "properties": [
        {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
        {"id": "custom.lineWidth", "value": 2},
    ],
}


def timeseries(
    title: str,
    description: str,
    targets: list[Json],
    unit: str = "s",
    width: int = 12,
    height: int = 8,
    repeat: str | None = None,
    max_per_row: int = 4,
    overrides: list[Json] | None = None,
    stacked: bool = False,
) -> Json:
    custom: Json = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "showPoints": "never"}
    if stacked:
        custom |= {"fillOpacity": 30, "stacking": {"mode": "normal", "group": "A"}}
    panel: Json = {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": PROMETHEUS,
        "gridPos": {"w": width, "h": height},
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "custom": custom,
            },
            "overrides": overrides if overrides is not None else [DASHED_EXTREMES],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["min", "mean", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }
    if repeat:
        panel["repeat"] = repeat
        panel["repeatDirection"] = "h"
        panel["maxPerRow"] = max_per_row
    return panel


def stats_over_time(scope: Scope, title: str, description: str, width: int, repeat: str) -> Json:
    """min / mean / p50 / p95 / p99 / max of one scope as they move (one panel per stage)."""
    legend = "{{" + scope.label + "}}"
    letters = refs()
    targets = [
        target(letters[0], scope.minimum(), f"{legend} min"),
        target(letters[1], scope.mean(), f"{legend} mean"),
    ]
    for i, (name, q) in enumerate(QUANTILES):
        targets.append(target(letters[2 + i], scope.quantile(q), f"{legend} {name}", exemplar=name == "p95"))
    targets.append(target(letters[5], scope.maximum(), f"{legend} max"))
    return timeseries(title, description, targets, width=width, repeat=repeat)


def stats_over_range(scope: Scope, title: str, description: str, width: int = 24) -> Json:
    """One row per stage (or modality): observations, min, mean, p50, p95, p99, max over the range."""
    columns = [
        ("observations", scope.range_count()),
        ("min", scope.range_minimum()),
        ("mean", scope.range_mean()),
        *((name, scope.range_quantile(q)) for name, q in QUANTILES),
        ("max", scope.range_maximum()),
    ]
    letters = refs()
    targets = [instant(letters[i], expr) for i, (_, expr) in enumerate(columns)]
    rename = {f"Value #{letters[i]}": name for i, (name, _) in enumerate(columns)}
    order = {scope.label: 0, **{name: i + 1 for i, (name, _) in enumerate(columns)}}
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": PROMETHEUS,
        "gridPos": {"w": width, "h": 6},
        "targets": targets,
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True}, "renameByName": rename, "indexByName": order},
            },
        ],
        "fieldConfig": {
            "defaults": {"unit": "s", "decimals": 4},
            "overrides": [
                {
                    "matcher": {"id": "byName", "options": "observations"},
                    "properties": [{"id": "unit", "value": "short"}, {"id": "decimals", "value": 0}],
                }
            ],
        },
        "options": {"showHeader": True, "cellHeight": "sm"},
    }


def right_axis(legend: str, unit: str) -> Json:
    """Draws the series whose legend matches the regular expression `legend` on a right axis in `unit`."""
    return {
        "matcher": {"id": "byRegexp", "options": legend},
        "properties": [{"id": "unit", "value": unit}, {"id": "custom.axisPlacement", "value": "right"}],
    }


def row(title: str, collapsed: list[Json] | None = None, repeat: str | None = None) -> Json:
    """A row; given `collapsed`, a closed row holding those panels (Grafana queries them only once
    the row is opened), and given `repeat`, one row per value of that variable."""
    panel: Json = {
        "type": "row",
        "title": title,
        "collapsed": collapsed is not None,
        "panels": collapsed or [],
        "gridPos": {"w": 24, "h": 1},
    }
    if repeat:
        panel["repeat"] = repeat
    return panel


def load_row() -> list[Json]:
    images_per_request = "cliplens_request_images"
    return [
        row("Load: concurrency, throughput and errors"),
        timeseries(
            "Requests in flight (the concurrency level)",
            "Embeddings requests being served, sampled at each scrape: the x axis of every latency "
            "panel below. Sum over the selected instances, and each instance.",
            [
                target("A", f"sum(cliplens_requests_in_flight{{{INSTANCE}}})", "all selected instances"),
                target("B", f"cliplens_requests_in_flight{{{INSTANCE}}}", "{{instance}}"),
            ],
            unit="short",
            width=8,
            overrides=[],
        ),
        timeseries(
            "Throughput",
            "Images finished per second (any outcome, cache hits included), requests per second by "
            "modality, texts per second.",
            [
                target("A", f"sum({rate('cliplens_images_total')})", "images/s"),
                target(
                    "B",
                    f"sum by (modality) ({rate('cliplens_request_seconds_count')})",
                    "{{modality}} requests/s",
                ),
                target("C", f"sum({rate('cliplens_texts_total')})", "texts/s"),
            ],
            unit="short",
            width=8,
            overrides=[],
        ),
        timeseries(
            "Images per request",
            "Mean and quantiles of the number of images in one embeddings request.",
            [
                target(
                    "A",
                    f"sum({rate(images_per_request + '_sum')}) / sum({rate(images_per_request + '_count')})",
                    "mean",
                ),
                target(
                    "B",
                    f"histogram_quantile(0.5, sum by (le) ({rate(images_per_request + '_bucket')}))",
                    "p50",
                ),
                target(
                    "C",
                    f"histogram_quantile(0.95, sum by (le) ({rate(images_per_request + '_bucket')}))",
                    "p95",
                ),
            ],
            unit="short",
            width=8,
            overrides=[],
        ),
        timeseries(
            "Failed images per second, by error code",
            "not_found, forbidden, invalid_reference, too_large, unsupported_format and decode_failed "
            "are the caller's; storage_unavailable and timeout are the service's or its storage's; "
            "internal is an unexpected exception in the image's path (a bug: its trace has the error).",
            [
                target(
                    "A",
                    f"sum by (outcome) ({rate('cliplens_images_total', FAILED)})",
                    "{{outcome}}",
                )
            ],
            unit="short",
            width=12,
            overrides=[],
        ),
        {
            "type": "stat",
            "title": "Over the selected range",
            "description": "Requests and images counted over the dashboard's time range (increase of the "
            "counters, so approximate at the edges of the range).",
            "datasource": PROMETHEUS,
            "gridPos": {"w": 6, "h": 8},
            "targets": [
                instant("A", f"sum({increase('cliplens_request_seconds_count')})", "requests"),
                instant("B", f"sum({increase('cliplens_images_total', OK)})", "images ok"),
                instant("C", f"sum({increase('cliplens_images_total', FAILED)})", "images failed"),
            ],
            "fieldConfig": {"defaults": {"unit": "short", "decimals": 0}, "overrides": []},
            "options": {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "orientation": "horizontal",
                "textMode": "value_and_name",
                "colorMode": "none",
                "graphMode": "none",
            },
        },
        {
            "type": "bargauge",
            "title": "Failed images by error code, over the selected range",
            "description": "Item errors by code (the `outcome` label of cliplens_images_total).",
            "datasource": PROMETHEUS,
            "gridPos": {"w": 6, "h": 8},
            "targets": [
                instant(
                    "A",
                    f"sort_desc(sum by (outcome) ({increase('cliplens_images_total', FAILED)}))",
                    "{{outcome}}",
                )
            ],
            "fieldConfig": {"defaults": {"unit": "short", "decimals": 0, "min": 0}, "overrides": []},
            "options": {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "orientation": "horizontal",
                "displayMode": "basic",
            },
        },
    ]


AUTOSCALING_WINDOW = "30s"
"""The window of the autoscaling query (deploy/kubernetes/components/keda/scaledobject.yaml)."""


def images_in_flight_per_replica() -> str:
    """The KEDA query divided by the replicas reporting: what the autoscaler holds to its target.

    KEDA's query is the sum over replicas (metricType AverageValue divides it by the replica count
    itself); the same 30 s average of each replica's sampled gauge is drawn here per replica.
    """
    return (
        f"sum(avg_over_time(cliplens_images_in_flight{{{INSTANCE}}}[{AUTOSCALING_WINDOW}]))"
        f" / count(cliplens_images_in_flight_limit{{{INSTANCE}}})"
    )


def held_against_bound(held: tuple[str, str], bound: tuple[str, str]) -> list[Json]:
    """A gauge summed over the selected replicas against the sum of their bounds, and the gauge of
    each replica: `held` and `bound` are (series, legend)."""
    return [
        target("A", f"sum({held[0]}{{{INSTANCE}}})", held[1]),
        target("B", f"sum({bound[0]}{{{INSTANCE}}})", bound[1]),
        target("C", f"{held[0]}{{{INSTANCE}}}", "{{instance}}"),
    ]


def replica_rows() -> list[Json]:
    return [
        row("Replicas: admission, autoscaling signal, exact peaks, rejections and retries"),
        timeseries(
            "Images in flight vs admission limit",
            "Images admitted and not finished, summed over the selected replicas, against the sum of "
            "their admission bounds (CLIPLENS_MAX_IMAGES_IN_FLIGHT each): at the bound, new requests get "
            "429 `overloaded`. Sampled at each scrape; one line per replica below the sum.",
            held_against_bound(
                ("cliplens_images_in_flight", "in flight, selected replicas"),
                ("cliplens_images_in_flight_limit", "admission limit, selected"),
            ),
            unit="short",
            width=8,
            overrides=[],
        ),
        timeseries(
            "Autoscaling signal: images in flight per replica",
            "What KEDA scales on (deploy/kubernetes/components/keda): each replica's images in flight "
            f"averaged over {AUTOSCALING_WINDOW}, summed, divided by the replicas reporting; the autoscaler "
            "adds replicas while it stays above the target (the ScaledObject's threshold, recorded as "
            "cliplens:images_in_flight_per_replica_target). Replicas, by device, on the same axis.",
            [
                target("A", images_in_flight_per_replica(), f"per replica ({AUTOSCALING_WINDOW} mean)"),
                target("B", "cliplens:images_in_flight_per_replica_target", "target (KEDA threshold)"),
                target("C", f"count by (device) (cliplens_model_info{{{INSTANCE}}})", "{{device}} replicas"),
            ],
            unit="short",
            width=8,
            overrides=[],
        ),
        timeseries(
            "Exact in-flight peaks between scrapes",
            "The highest number of requests and images in flight on one replica within its window "
            "(cliplens_requests_in_flight_max, cliplens_images_in_flight_max: exact, unlike the sampled "
            "gauges). `busiest` is the max over the selected replicas; peaks of different replicas may "
            "fall at different moments, so their sum only bounds the fleet's peak from above.",
            [
                target("A", f"max(cliplens_requests_in_flight_max{{{INSTANCE}}})", "requests, busiest"),
                target("B", f"max(cliplens_images_in_flight_max{{{INSTANCE}}})", "images, busiest"),
                target("C", f"cliplens_requests_in_flight_max{{{INSTANCE}}}", "{{instance}} requests"),
                target("D", f"cliplens_images_in_flight_max{{{INSTANCE}}}", "{{instance}} images"),
            ],
            unit="short",
            width=8,
            overrides=[],
        ),
        timeseries(
            "Rejected requests per second, by reason",
            "Requests refused before any work (cliplens_rejected_requests_total): `overloaded` (429, the "
            "admission bound) and `shutting_down` (503, a draining replica). Sum over the selected replicas.",
            [
                target(
                    "A",
                    f"sum by (reason) ({rate('cliplens_rejected_requests_total')})",
                    "{{reason}}",
                )
            ],
            unit="short",
            width=12,
            overrides=[],
        ),
        timeseries(
            "Download retries per second, by source and reason",
            "Downloads retried (cliplens_download_retries_total), from GCS or image URLs: http_429, "
            "http_5xx, connection, timeout. Retries that stay high mean the storage, not the service, "
            "is the bottleneck.",
            [
                target(
                    "A",
                    f"sum by (source, reason) ({rate('cliplens_download_retries_total')})",
                    "{{source}} {{reason}}",
                )
            ],
            unit="short",
            width=12,
            overrides=[],
        ),
    ]


def served_from_cache() -> str:
    """Lookups answered by any tier over the lookups made, each item counted once.

    An item asks the memory tier first and the redis tier only on a memory miss, so the hits of the
    two tiers add up without double counting, and the lookups made are the first tier's: memory's
    (hit, miss, error), or redis's on the replicas whose memory tier is off (capacity 0), which
    count no memory lookups at all. Bypassed lookups (`"cache": false`) asked no tier.
    """
    memory_off = f"cliplens_cache_capacity_bytes{{{INSTANCE}}} == 0"
    first_tier = (
        f"sum({rate(CACHE_LOOKUPS, MEMORY + ASKED)})"
        f" + (sum({rate(CACHE_LOOKUPS, REDIS + ASKED)} and on (instance) {memory_off}) or vector(0))"
    )
    return f"sum({rate(CACHE_LOOKUPS, HIT)}) / ({first_tier})"


def cache_rows() -> list[Json]:
    hit_or_miss = 'result=~"hit|miss",'
    circuit = f"cliplens_cache_circuit_open{{{REDIS}{INSTANCE}}}"
    return [
        row("Cache: hit ratio, lookup latency, errors and bypasses, memory tier"),
        timeseries(
            "Cache hit ratio, by tier and served from cache",
            "Per tier: hits / (hits + misses) of its lookups (redis is asked only on a memory miss, so "
            "its ratio is of what memory missed). Served from cache: the share of the images that "
            "asked the cache and got their vector from either tier: memory hits + redis hits over the "
            "lookups of each replica's first tier (memory, or redis where CLIPLENS_CACHE_BYTES=0); "
            'images sent with `"cache": false` asked no tier. ' + WITH_A_CACHE,
            [
                target(
                    "A",
                    f"sum by (tier) ({rate(CACHE_LOOKUPS, HIT)})"
                    f" / sum by (tier) ({rate(CACHE_LOOKUPS, hit_or_miss)})",
                    "{{tier}} hits / (hits + misses)",
                ),
                target("B", served_from_cache(), "served from cache"),
            ],
            unit="percentunit",
            width=8,
            overrides=[],
        ),
        timeseries(
            "Cache lookup latency, by tier",
            "One lookup in one tier (cliplens_cache_seconds; one lookup may ask for several images): "
            "mean and p99 from the histogram. A redis lookup longer than CLIPLENS_CACHE_TIMEOUT_MS "
            "counts as an error. The whole `cache` stage (the content's identity, then the lookups) is "
            "in the stage panels.",
            [
                target("A", CACHE_LOOKUP.mean(), "{{tier}} mean"),
                target("B", CACHE_LOOKUP.quantile(0.99), "{{tier}} p99"),
            ],
            width=8,
            overrides=[],
        ),
        timeseries(
            "Cache errors and bypasses per second, by tier",
            "error: the tier failed or timed out, and the item went on as a miss (a failed write only "
            'loses the entry). bypass: the request sent `"cache": false` (every tier on), or the redis '
            "tier's circuit breaker is open, or too many writes were under way. Either way the images "
            "are still served, only slower.",
            [
                target(
                    "A",
                    f"sum by (tier, result) ({rate(CACHE_LOOKUPS, FAILED_OR_SKIPPED)})",
                    "{{tier}} lookup {{result}}",
                ),
                target(
                    "B",
                    f"sum by (tier, result) ({rate(CACHE_WRITES, FAILED_OR_SKIPPED)})",
                    "{{tier}} write {{result}}",
                ),
            ],
            unit="short",
            width=8,
            overrides=[],
        ),
        timeseries(
            "Shared cache circuit breaker (1 = open, bypassed)",
            'cliplens_cache_circuit_open{tier="redis"}: after repeated failures a replica stops asking '
            "the shared tier for a cooldown, then lets one trial through. Replicas with the circuit "
            "open, and each replica.",
            [
                target("A", f"sum({circuit})", "replicas with the circuit open"),
                target("B", circuit, "{{instance}}"),
            ],
            unit="short",
            width=8,
            overrides=[],
        ),
        timeseries(
            "Memory tier: bytes held vs capacity",
            "The in-process tier of each replica holds encoded vectors up to its bound "
            "(CLIPLENS_CACHE_BYTES, 0 = the memory tier is off) and evicts the least recently used "
            "beyond it. Sums over the selected replicas, and each replica.",
            held_against_bound(
                ("cliplens_cache_bytes", "held, selected replicas"),
                ("cliplens_cache_capacity_bytes", "capacity, selected replicas"),
            ),
            unit="bytes",
            width=8,
            overrides=[],
        ),
        timeseries(
            "Memory tier: entries",
            "Vectors held by the in-process tier (cliplens_cache_entries): each replica has its own, so "
            "a hit on one is a miss on the next until the shared tier answers.",
            [
                target("A", f"sum(cliplens_cache_entries{{{INSTANCE}}})", "entries, selected replicas"),
                target("B", f"cliplens_cache_entries{{{INSTANCE}}}", "{{instance}}"),
            ],
            unit="short",
            width=8,
            overrides=[],
        ),
    ]


def request_rows() -> list[Json]:
    return [
        row(
            "Per request: how long each stage held the request (first image in to last out, "
            "waiting or working)"
        ),
        stats_over_range(
            REQUEST_STAGE,
            "Per request, over the selected range",
            "For each stage, the wall time a request had images in it (cliplens_request_stage_seconds, "
            "the Server-Timing numbers). min and max are exact (windowed gauges, min_over_time / "
            "max_over_time over the range); mean is increase(_sum) / increase(_count); p50-p99 come "
            "from the histogram buckets (to a bucket's width, x1.5). Stages overlap because images stream. "
            + WITH_A_CACHE,
        ),
        stats_over_time(
            REQUEST_STAGE,
            "Per request · $stage",
            "min and max: exact, over the service's sliding window (CLIPLENS_EXTREMES_WINDOW_S, 15 s by "
            "default) ending at each point. mean and quantiles: over $__rate_interval. Dots are "
            "exemplars: click one to open its trace.",
            width=6,
            repeat="stage",
        ),
        stats_over_time(
            WHOLE_REQUEST,
            "Whole request, by modality",
            "cliplens_request_seconds: from parsed body to response (the Server-Timing `total`).",
            width=12,
            repeat="",
        ),
        stats_over_range(
            WHOLE_REQUEST,
            "Whole request, over the selected range",
            "Exact min and max, mean from _sum/_count and histogram quantiles, by modality.",
            width=12,
        ),
    ]


def image_rows() -> list[Json]:
    wait_vs_work = [
        target(
            "A",
            f"sum by (stage) (rate({IMAGE_WAIT.series('_seconds_sum')}[$__rate_interval]))"
            f" / sum by (stage) (rate({IMAGE_WAIT.series('_seconds_count')}[$__rate_interval]))",
            "{{stage}} wait",
        ),
        target(
            "B",
            f"sum by (stage) (rate({IMAGE_WORK.series('_seconds_sum')}[$__rate_interval]))"
            f" / sum by (stage) (rate({IMAGE_WORK.series('_seconds_count')}[$__rate_interval]))",
            "{{stage}} work",
        ),
    ]
    return [
        row("Per image: the work of each stage (one download, one decode, one preprocess)"),
        stats_over_range(
            IMAGE_WORK,
            "Per image work, over the selected range",
            "cliplens_image_stage_seconds: from the moment a worker picked the image up to the moment it "
            "finished, without the wait before. `embed` has no per-image work: images are embedded in "
            "shared batches (see Model batches). " + WITH_A_CACHE,
        ),
        stats_over_time(
            IMAGE_WORK,
            "Per image work · $work_stage",
            "Exact windowed min / max, mean over $__rate_interval, histogram quantiles; dots are exemplars.",
            width=8,
            repeat="work_stage",
        ),
        row("Per image: the wait before each stage (download slot, CPU worker, model batch)"),
        stats_over_range(
            IMAGE_WAIT,
            "Per image queue wait, over the selected range",
            "cliplens_stage_queue_seconds: time an image waited for a download slot (load), a CPU "
            "worker (decode, preprocess) or a model batch (embed). " + WITH_A_CACHE,
        ),
        stats_over_time(
            IMAGE_WAIT,
            "Per image wait · $stage",
            "Exact windowed min / max, mean over $__rate_interval, histogram quantiles; dots are exemplars.",
            width=6,
            repeat="stage",
        ),
        timeseries(
            "Queue wait vs work, mean per image",
            "Where an image's time goes as concurrency grows: waiting (dashed when it dominates, the stage "
            "is saturated) or working.",
            wait_vs_work,
            width=24,
            overrides=[
                {
                    "matcher": {"id": "byRegexp", "options": ".* wait$"},
                    "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}],
                }
            ],
        ),
    ]


def batch_rows() -> list[Json]:
    return [
        row("Model batches (one forward pass embeds images from many requests)"),
        timeseries(
            "Batch size",
            "Items per model forward pass: mean and p95, by modality.",
            [
                target(
                    "A",
                    f"sum by (modality) ({rate('cliplens_embed_batch_size_sum')})"
                    f" / sum by (modality) ({rate('cliplens_embed_batch_size_count')})",
                    "{{modality}} mean",
                ),
                target(
                    "B",
                    f"histogram_quantile(0.95, sum by (modality, le) "
                    f"({rate('cliplens_embed_batch_size_bucket')}))",
                    "{{modality}} p95",
                ),
            ],
            unit="short",
            width=9,
            overrides=[],
        ),
        timeseries(
            "Forward pass duration",
            "One model forward pass, including the copy to and from the device; dots are exemplars "
            "(the `embed batch` spans).",
            [
                target(
                    "A",
                    f"sum by (modality) ({rate('cliplens_embed_batch_seconds_sum')})"
                    f" / sum by (modality) ({rate('cliplens_embed_batch_seconds_count')})",
                    "{{modality}} mean",
                ),
                target(
                    "B",
                    f"histogram_quantile(0.95, sum by (modality, le) "
                    f"({rate('cliplens_embed_batch_seconds_bucket')}))",
                    "{{modality}} p95",
                    exemplar=True,
                ),
            ],
            width=9,
            overrides=[],
        ),
        {
            "type": "table",
            "title": "Served model",
            "description": "cliplens_model_info: the model, runtime, device and dtype of each instance "
            "(and int8's cosine to float32, measured at its start).",
            "datasource": PROMETHEUS,
            "gridPos": {"w": 6, "h": 8},
            "targets": [instant("A", f"cliplens_model_info{{{INSTANCE}}}")],
            "transformations": [
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True},
                        "indexByName": {
                            "instance": 0,
                            "model": 1,
                            "runtime": 2,
                            "device": 3,
                            "dtype": 4,
                            "random_weights": 5,
                            "int8_cosine_min": 6,
                            "int8_cosine_mean": 7,
                        },
                    },
                }
            ],
            "fieldConfig": {"defaults": {}, "overrides": []},
            "options": {"showHeader": True, "cellHeight": "sm"},
        },
    ]


HTTP_DURATION = "http_server_request_duration_seconds"
"""OpenTelemetry's stable HTTP server histogram, exported by opentelemetry-exporter-prometheus onto the
app's registry: one observation per response, by method, route template and status code; /metrics,
/healthz and /readyz are not counted."""
HTTP_RESPONSES = f"{HTTP_DURATION}_count"
HTTP_IN_FLIGHT = "http_server_active_requests"
NO_ROUTE = "(no route: unknown path)"
"""The route of the responses to paths that match none (404 probes): OpenTelemetry leaves it empty."""
STATUS_CLASSES = ("1", "2", "3", "4", "5")


def selected(metric: str, match: str = "") -> str:
    """`metric{match,instance=~"$instance"}`: the series of the selected instances."""
    return f"{metric}{{{match}{INSTANCE}}}"


def by_status_class(expr: str) -> str:
    """`expr` with a `status_class` label ("2xx", "5xx", ...) read from http_response_status_code.

    One label_replace per class with a constant replacement rather than one `${1}xx`: every `$` in a
    query is one of the dashboard's variables.
    """
    for digit in STATUS_CLASSES:
        expr = f'label_replace({expr}, "status_class", "{digit}xx", "http_response_status_code", "{digit}..")'
    return expr


def http_ratio(status: str) -> str:
    """The share of the responses whose status code matches `status`: 0, not absent, while none does."""
    matching = rate(HTTP_RESPONSES, f'http_response_status_code=~"{status}",')
    return f"(sum({matching}) or vector(0)) / sum({rate(HTTP_RESPONSES)})"


def http_rows() -> list[Json]:
    def quantile(q: float) -> str:
        by_route = f"histogram_quantile({q}, sum by (http_route, le) ({rate(HTTP_DURATION + '_bucket')}))"
        return f'label_replace({by_route}, "http_route", "{NO_ROUTE}", "http_route", "")'

    source = (
        " From OpenTelemetry's HTTP server metrics (http_server_request_duration_seconds, exported on the "
        "service's /metrics); /metrics, /healthz and /readyz are not counted."
    )
    return [
        row("HTTP: responses by status class, error ratios, latency by route, requests in flight"),
        timeseries(
            "HTTP responses per second, by status class",
            "Responses per second summed over the selected instances, by the first digit of the status "
            "code. 4xx are the callers' (400 and 422 invalid requests, 401 unauthorised, 404 unknown "
            "path or model, 413 too large, 429 overloaded); 5xx are the service's (500 a bug, 503 "
            "model not ready or draining)." + source,
            [
                target(
                    "A",
                    f"sum by (status_class) ({by_status_class(rate(HTTP_RESPONSES))})",
                    "{{status_class}}",
                )
            ],
            unit="reqps",
            width=6,
            overrides=[],
        ),
        timeseries(
            "HTTP 5xx and 4xx ratio",
            "The share of the responses with a 5xx and with a 4xx status (0 while there are none). "
            "CliplensHttp5xxRatioHigh fires on the 5xx ratio over 5 minutes, CliplensHttp4xxSpike on a "
            "4xx rate well above its own hourly average; see the Recorded row." + source,
            [
                target("A", http_ratio("5.."), "5xx / all responses"),
                target("B", http_ratio("4.."), "4xx / all responses"),
            ],
            unit="percentunit",
            width=6,
            overrides=[],
        ),
        timeseries(
            "HTTP response time by route, p50 and p95",
            "From the request's arrival to the end of the response, by route template, from the "
            f"histogram's buckets (to a bucket's width). {NO_ROUTE}: paths that match no route, such as "
            "404 probes." + source,
            [
                target("A", quantile(0.5), "{{http_route}} p50"),
                target("B", quantile(0.95), "{{http_route}} p95"),
            ],
            width=6,
            overrides=[],
        ),
        timeseries(
            "HTTP requests in flight",
            "Requests being served on every route (http_server_active_requests), sampled at each "
            "scrape: the embeddings requests of the Load row plus the others. Sum over the selected "
            "instances, and each instance." + source,
            [
                target("A", f"sum({selected(HTTP_IN_FLIGHT)})", "all selected instances"),
                target("B", f"sum by (instance) ({selected(HTTP_IN_FLIGHT)})", "{{instance}}"),
            ],
            unit="short",
            width=6,
            overrides=[],
        ),
    ]


def process_rows() -> list[Json]:
    fds_share = f"{selected('process_open_fds')} / {selected('process_max_fds')}"
    return [
        row("Process: memory, CPU, file descriptors, garbage collection (each replica)"),
        timeseries(
            "Resident memory (RSS)",
            "process_resident_memory_bytes of each replica, against the limit CliplensMemoryGrowing "
            "compares its 4-hour linear forecast with (cliplens:resident_memory_limit_bytes, the "
            "container's limit). The model, the cache's memory tier and the images in flight are most of "
            "it; a line that keeps rising at a steady load is a leak.",
            [
                target("A", selected("process_resident_memory_bytes"), "{{instance}}"),
                target("B", "cliplens:resident_memory_limit_bytes", "limit (per replica)"),
            ],
            unit="bytes",
            width=6,
            overrides=[],
        ),
        timeseries(
            "CPU cores used",
            "rate(process_cpu_seconds_total): CPU seconds per second, user and system, every thread of "
            "the process (event loop, CPU pools, torch). Near the replica's CPU limit, every stage "
            "slows at once.",
            [
                target("A", f"sum({rate('process_cpu_seconds_total')})", "all selected instances"),
                target("B", rate("process_cpu_seconds_total"), "{{instance}}"),
            ],
            unit="short",
            width=6,
            overrides=[],
        ),
        timeseries(
            "Open file descriptors vs limit",
            "Open file descriptors of each replica (sockets to clients and storage, files), and on the "
            "right axis the fullest replica's share of its limit (process_open_fds / process_max_fds): "
            "at the limit, new connections and file reads fail.",
            [
                target("A", selected("process_open_fds"), "{{instance}} open"),
                target("B", f"max({fds_share})", "fullest replica, share of its limit"),
            ],
            unit="short",
            width=6,
            overrides=[right_axis(".*share of its limit$", "percentunit")],
        ),
        timeseries(
            "Garbage collections per second, by generation",
            "python_gc_collections_total by generation, and on the right axis the objects they "
            "collected (python_gc_objects_collected_total), summed over the selected instances. A "
            "generation-2 collection stops the event loop for its whole length: compare with the "
            "event-loop lag below.",
            [
                target(
                    "A",
                    f"sum by (generation) ({rate('python_gc_collections_total')})",
                    "generation {{generation}}",
                ),
                target("B", f"sum({rate('python_gc_objects_collected_total')})", "objects collected/s"),
            ],
            unit="short",
            width=6,
            overrides=[right_axis("objects collected/s", "short")],
        ),
    ]


LOOP_LAG = "cliplens_event_loop_lag"
"""cliplens_event_loop_lag_seconds: how late the event loop woke a task that sleeps 50 ms, sampled each
time; with exact windowed `_min_seconds` / `_max_seconds` gauges like the stage families."""
LOAD = 'stage="load",'


def runtime_rows() -> list[Json]:
    pool_busy = f"sum by (pool) ({rate('cliplens_cpu_pool_busy_seconds_total')})"
    return [
        row("Threads and event loop: slow storage or busy loop?"),
        timeseries(
            "Slow storage or busy loop? Event-loop lag vs load work",
            "The load stage's work per image (cliplens_image_stage_seconds, stage load: p95, dots "
            "are exemplars, and the exact max) next to the event loop's lag (cliplens_event_loop_lag_"
            "seconds: how late a task sleeping 50 ms was woken: p99, and the exact max), on one time "
            "axis. A load ends only when the loop runs the code that takes its bytes (GCS downloads "
            "run on the loop, local files in the io pool), so a busy loop slows loads as much as a slow "
            "storage does. Load slow + lag low: the loop was free and the bytes came late: slow "
            "storage (or the network to it; see Download retries). Load slow + lag high: busy loop "
            "(work done on the loop instead of a pool, a long garbage collection, a process short of "
            "CPU): see CPU cores used, the pools and garbage collections. For one image, open a p95 "
            "dot's trace: a load event with `loop_lag_ms` says the loop was late while it loaded. "
            "Dashed: exact max over the service's window.",
            [
                target("A", f"max({selected(LOOP_LAG + '_max_seconds')})", "loop lag max"),
                target(
                    "B",
                    f"histogram_quantile(0.99, sum by (le) ({rate(LOOP_LAG + '_seconds_bucket')}))",
                    "loop lag p99",
                ),
                target(
                    "C",
                    "histogram_quantile(0.95, sum by (le) "
                    f"({rate('cliplens_image_stage_seconds_bucket', LOAD)}))",
                    "load work p95",
                    exemplar=True,
                ),
                target("D", f"max({selected('cliplens_image_stage_max_seconds', LOAD)})", "load work max"),
            ],
            width=12,
        ),
        timeseries(
            "Threads by pool",
            "The process's OS threads by pool (cliplens_threads), stacked, summed over the selected "
            "instances: cpu (decode, preprocess), text (tokenising), io (local files, inline data), "
            "model (the batcher's worker), torch (intra-op threads), other (the event loop, exporters, "
            "libraries). A total that keeps growing is a thread leak.",
            [target("A", f"sum by (pool) ({selected('cliplens_threads')})", "{{pool}}")],
            unit="short",
            width=12,
            overrides=[],
            stacked=True,
        ),
        timeseries(
            "CPU pool busy ratio, by pool",
            "Busy worker-seconds per second over the workers (rate(cliplens_cpu_pool_busy_seconds_total) "
            "/ cliplens_cpu_pool_workers), summed over the selected instances: 1 = every worker of the "
            "pool busy all the time. A pool near 1 with a queue (next panel) is the bottleneck; add "
            "workers only where the CPU cores used leave room.",
            [
                target(
                    "A",
                    f"{pool_busy} / sum by (pool) ({selected('cliplens_cpu_pool_workers')})",
                    "{{pool}}",
                )
            ],
            unit="percentunit",
            width=12,
            overrides=[],
        ),
        timeseries(
            "CPU pool queue, by pool",
            "Tasks waiting for a thread of each pool (cliplens_cpu_pool_queue), sampled at each scrape, "
            "summed over the selected instances. The cpu pool's queue is the decode and preprocess "
            "wait of the queue-wait panels.",
            [target("A", f"sum by (pool) ({selected('cliplens_cpu_pool_queue')})", "{{pool}}")],
            unit="short",
            width=12,
            overrides=[],
        ),
    ]


GPU = 'device=~"$gpu",'


def gpu_rows() -> list[Json]:
    cpu_hosts = " Only CUDA replicas export the GPU series: on CPU hosts this row stays empty."

    def held(metric: str) -> str:
        return f"sum({selected(metric, GPU)})"

    def of_total(metric: str) -> str:
        return f"{held(metric)} / {held('cliplens_gpu_memory_total_bytes')}"

    return [
        row(
            "GPU $gpu: utilisation and memory (one row per device; empty on CPU hosts)",
            collapsed=[
                timeseries(
                    "GPU $gpu utilisation",
                    "The share of the last sample period in which the device ran a kernel "
                    "(cliplens_gpu_utilization_ratio, from NVML: absent without it), on each selected "
                    "replica, and the busiest. Low while images wait for a model batch: the GPU is not "
                    "the bottleneck." + cpu_hosts,
                    [
                        target("A", f"max({selected('cliplens_gpu_utilization_ratio', GPU)})", "busiest"),
                        target("B", selected("cliplens_gpu_utilization_ratio", GPU), "{{instance}}"),
                    ],
                    unit="percentunit",
                    width=8,
                    overrides=[],
                ),
                timeseries(
                    "GPU $gpu memory: used, total and the model's",
                    "Device memory used by every process (cliplens_gpu_memory_used_bytes), the device's "
                    "total, and what this process's torch holds on it for the model: weights, "
                    "activations and its allocator's cache (cliplens_gpu_model_memory_bytes), summed "
                    "over the selected replicas." + cpu_hosts,
                    [
                        target("A", held("cliplens_gpu_memory_used_bytes"), "used"),
                        target("B", held("cliplens_gpu_memory_total_bytes"), "total"),
                        target("C", held("cliplens_gpu_model_memory_bytes"), "model"),
                    ],
                    unit="bytes",
                    width=8,
                    overrides=[],
                ),
                timeseries(
                    "GPU $gpu memory: share of the device",
                    "Used memory and the model's memory over the device's total, summed over the "
                    "selected replicas. Used well above the model's: the CUDA context, or another "
                    "process on the device." + cpu_hosts,
                    [
                        target("A", of_total("cliplens_gpu_memory_used_bytes"), "used / total"),
                        target("B", of_total("cliplens_gpu_model_memory_bytes"), "model / total"),
                    ],
                    unit="percentunit",
                    width=8,
                    overrides=[],
                ),
            ],
            repeat="gpu",
        ),
    ]


def recorded_rows() -> list[Json]:
    def recorded(ref: str, name: str, legend: str, stage: str = "") -> Json:
        return target(ref, f'{name}{{stage=~"{stage}"}}' if stage else name, legend)

    request_stage = "job_stage:cliplens_request_stage_seconds"
    return [
        row("Recorded rules and alert thresholds (observability/rules; all instances of the job)"),
        timeseries(
            "p95 per image work (5m) vs objective",
            "What CliplensStageP95OverObjective compares: job_stage:cliplens_image_stage_seconds:p95_5m "
            "against cliplens:image_stage_p95_objective_seconds.",
            [
                recorded(
                    "A", "job_stage:cliplens_image_stage_seconds:p95_5m", "{{stage}} p95", "$work_stage"
                ),
                recorded(
                    "B", "cliplens:image_stage_p95_objective_seconds", "{{stage}} objective", "$work_stage"
                ),
            ],
            width=8,
            overrides=[],
        ),
        timeseries(
            "p95 queue wait (5m) vs objective",
            "What CliplensStageQueueP95OverObjective compares.",
            [
                recorded("A", "job_stage:cliplens_stage_queue_seconds:p95_5m", "{{stage}} p95", "$stage"),
                recorded("B", "cliplens:stage_queue_p95_objective_seconds", "{{stage}} objective", "$stage"),
            ],
            width=8,
            overrides=[],
        ),
        timeseries(
            "Per request stage time, recorded over 1m",
            f"{request_stage}:{{min1m,mean1m,p95_1m,max1m}}.",
            [
                recorded("A", f"{request_stage}:min1m", "{{stage}} min", "$stage"),
                recorded("B", f"{request_stage}:mean1m", "{{stage}} mean", "$stage"),
                recorded("C", f"{request_stage}:p95_1m", "{{stage}} p95", "$stage"),
                recorded("D", f"{request_stage}:max1m", "{{stage}} max", "$stage"),
            ],
            width=8,
        ),
        timeseries(
            "Failed images ratio (5m) vs objective",
            "What CliplensImageErrorRatioHigh compares.",
            [
                recorded("A", "job:cliplens_image_errors:ratio_rate5m", "failed / all images"),
                recorded("B", "cliplens:image_error_ratio_objective", "objective"),
            ],
            unit="percentunit",
            width=12,
            overrides=[],
        ),
        timeseries(
            "Requests in flight vs planned limit",
            "What CliplensRequestsInFlightSaturated compares (sum over the job's instances).",
            [
                recorded("A", "job:cliplens_requests_in_flight:sum", "in flight"),
                recorded("B", "cliplens:requests_in_flight_limit", "limit"),
            ],
            unit="short",
            width=12,
            overrides=[],
        ),
        timeseries(
            "HTTP 5xx ratio (5m) vs objective",
            "What CliplensHttp5xxRatioHigh compares: job:http_server_responses_5xx:ratio_rate5m against "
            "cliplens:http_5xx_ratio_objective, while the job serves more than "
            "cliplens:http_requests_rate_floor requests per second (job:http_server_requests:rate5m).",
            [
                recorded("A", "job:http_server_responses_5xx:ratio_rate5m", "5xx / all responses"),
                recorded("B", "cliplens:http_5xx_ratio_objective", "objective"),
            ],
            unit="percentunit",
            width=12,
            overrides=[],
        ),
        timeseries(
            "Event-loop lag per replica vs objective",
            "What CliplensEventLoopLagHigh compares: each selected replica's exact max lag over 1 minute "
            "(instance:cliplens_event_loop_lag_seconds:max1m) against "
            "cliplens:event_loop_lag_objective_seconds; and its p99 over 5 minutes.",
            [
                target(
                    "A",
                    f"instance:cliplens_event_loop_lag_seconds:max1m{{{INSTANCE}}}",
                    "{{instance}} max 1m",
                ),
                target(
                    "B",
                    f"instance:cliplens_event_loop_lag_seconds:p99_5m{{{INSTANCE}}}",
                    "{{instance}} p99 5m",
                ),
                recorded("C", "cliplens:event_loop_lag_objective_seconds", "objective"),
            ],
            width=12,
            overrides=[],
        ),
    ]


def variables() -> list[Json]:
    all_current = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return [
        {
            "type": "query",
            "name": "instance",
            "label": "instance",
            "description": "Service replicas scraped by Prometheus (on Kubernetes, the pod's name).",
            "datasource": PROMETHEUS,
            "query": "label_values(cliplens_model_info, instance)",
            "definition": "label_values(cliplens_model_info, instance)",
            "refresh": 2,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": all_current,
            "options": [],
            "sort": 1,
            "hide": 0,
        },
        {
            "type": "custom",
            "name": "stage",
            "label": "stage",
            "description": "Pipeline stages, in the order an image goes through them.",
            "query": ",".join(STAGES),
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": all_current,
            "options": [{"selected": False, "text": "All", "value": "$__all"}]
            + [{"selected": False, "text": stage, "value": stage} for stage in STAGES],
            "hide": 0,
        },
        {
            "type": "query",
            "name": "work_stage",
            "label": "stage with per-image work",
            "description": "The selected stages with per-image work (all but embed), for the work panels.",
            "datasource": PROMETHEUS,
            "query": 'label_values(cliplens_image_stage_seconds_count{stage=~"$stage"}, stage)',
            "definition": 'label_values(cliplens_image_stage_seconds_count{stage=~"$stage"}, stage)',
            "refresh": 2,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": all_current,
            "options": [],
            "sort": 0,
            "hide": 2,
        },
        {
            "type": "query",
            "name": "gpu",
            "label": "GPU device",
            "description": "The CUDA devices of the selected replicas, one GPU row each; none on CPU hosts.",
            "datasource": PROMETHEUS,
            "query": f"label_values(cliplens_gpu_memory_total_bytes{{{INSTANCE}}}, device)",
            "definition": f"label_values(cliplens_gpu_memory_total_bytes{{{INSTANCE}}}, device)",
            "refresh": 2,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": all_current,
            "options": [],
            "sort": 3,
            "hide": 2,
        },
    ]


def layout(panels: list[Json]) -> list[Json]:
    """Give each panel an id and a grid position, filling lines of 24 columns left to right.

    A row, and a repeated panel (whose copies fill the line), starts a new line and ends it. The
    panels of a collapsed row are placed below it, where they appear when it opens; the panels after
    the row make no room for them (Grafana moves them down when the row opens).
    """
    ids = itertools.count(1)

    def place(panels: list[Json], y: int) -> None:
        x = line_height = 0
        for panel in panels:
            panel["id"] = next(ids)
            grid = panel["gridPos"]
            whole_line = panel["type"] == "row" or "repeat" in panel
            if whole_line or x + grid["w"] > 24:
                y += line_height
                x = line_height = 0
            grid["x"], grid["y"] = x, y
            x += grid["w"]
            line_height = max(line_height, grid["h"])
            if whole_line:
                y += line_height
                x = line_height = 0
            if panel["type"] == "row":
                place(panel["panels"], y)

    place(panels, 0)
    return panels


def dashboard() -> Json:
    panels = layout(
        [
            *load_row(),
            *http_rows(),
            *cache_rows(),
            *replica_rows(),
            *request_rows(),
            *image_rows(),
            *batch_rows(),
            *process_rows(),
            *runtime_rows(),
            *gpu_rows(),
            *recorded_rows(),
        ]
    )
    return {
        "uid": "cliplens-stage-latency",
        "title": "cliplens — stage latency",
        "description": f"Per stage ({', '.join(STAGES)}): exact min and max, mean, p50, p95 and p99, per "
        "request and per image, as concurrency grows; exemplars link to Jaeger traces; the embedding "
        "cache's hit ratio, lookup latency and errors.",
        "tags": ["cliplens", "latency"],
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "5s",
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {"refresh_intervals": ["5s", "10s", "30s", "1m", "5m"]},
        "schemaVersion": 39,
        "version": 1,
        "links": [
            {
                "type": "link",
                "title": "Jaeger: cliplens traces",
                "url": f"{JAEGER_UI}/search?service=cliplens",
                "targetBlank": True,
                "icon": "external link",
            },
            {
                "type": "link",
                "title": "Jaeger: Monitor (SPM)",
                "url": f"{JAEGER_UI}/monitor",
                "targetBlank": True,
                "icon": "external link",
            },
        ],
        "annotations": {"list": []},
        "templating": {"list": variables()},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            sys.stderr.write(f"{OUTPUT} is stale: run python grafana/generate_dashboard.py\n")
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
