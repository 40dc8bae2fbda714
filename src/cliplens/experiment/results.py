"""results.json: every raw number of a run, and what it was measured on, in one file.

The file keeps the raw per-request records (Server-Timing windows, per-image queue and work
times, client send/receive times, outcomes, trace ids) next to the summaries computed from them,
the service's `/v1/models` answer and settings, the storage and its injected latency, the corpus,
the machine, and the options. `--compare` recomputes the summaries from the records, so two files
written by different versions still compare on the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliplens.experiment.load import RequestRecord, Scenario
from cliplens.experiment.report import ScenarioSummary, summarize
from cliplens.settings import Settings

SCHEMA = "cliplens-experiment/1"


def settings_json(settings: Settings) -> dict[str, Any]:
    """The service's settings as JSON values, without the secret ones (fields kept out of repr)."""
    values: dict[str, Any] = {}
    for item in dataclasses.fields(settings):
        if not item.repr:
            continue
        value = getattr(settings, item.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        values[item.name] = value
    return values


@dataclass
class ScenarioRun:
    """One scenario and the records of all its requests (every round)."""

    scenario: Scenario
    records: list[RequestRecord]

    def summary(self) -> ScenarioSummary:
        return summarize(self.scenario, self.records)


@dataclass
class Results:
    """A run of `cliplens experiment`."""

    runs: list[ScenarioRun]
    label: str = "results"
    service: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=dict)
    corpus: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    started_at: str = ""
    finished_at: str = ""

    def summaries(self) -> list[ScenarioSummary]:
        return [run.summary() for run in self.runs]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "label": self.label,
            "command": self.command,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "service": self.service,
            "storage": self.storage,
            "corpus": self.corpus,
            "machine": self.machine,
            "options": self.options,
            "scenarios": [
                {
                    "key": run.scenario.key,
                    "name": run.scenario.name,
                    "images": run.scenario.images,
                    "concurrency": run.scenario.concurrency,
                    "summary": run.summary().to_json(),
                    "records": [record.to_json() for record in run.records],
                }
                for run in self.runs
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Results:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a cliplens experiment file (schema {data.get('schema')!r}, want {SCHEMA})")
        runs = [
            ScenarioRun(
                Scenario(int(entry["images"]), int(entry["concurrency"])),
                [RequestRecord.from_json(record) for record in entry["records"]],
            )
            for entry in data["scenarios"]
        ]
        return cls(
            runs=runs,
            label=data.get("label", "results"),
            service=dict(data.get("service", {})),
            storage=dict(data.get("storage", {})),
            corpus=dict(data.get("corpus", {})),
            machine=dict(data.get("machine", {})),
            options=dict(data.get("options", {})),
            command=list(data.get("command", [])),
            started_at=data.get("started_at", ""),
            finished_at=data.get("finished_at", ""),
        )


def write(results: Results, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(results.to_json(), indent=1))
    tmp.replace(path)
    return path


def read(path: Path) -> Results:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return Results.from_json(data)
